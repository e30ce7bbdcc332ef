"""The worker processes of ``featurestream run -p N``: one Bytewax cluster on this machine.

:func:`run_cluster` starts N processes of ``python -m featurestream.workers``, each one process of
a Bytewax (timely) cluster talking TCP on 127.0.0.1, and supervises them:

* SIGINT or SIGTERM asks every process to stop, through its stdin (closed by the launcher), not
  by a second signal: a process that got the signal already (Ctrl-C reaches the whole process
  group) would take a second one as "exit now". Every process stops its sources and the cluster
  ends as one dataflow: every batch read is written to both stores before any process exits 0.
* A timely cluster cannot continue without one of its processes, so the first process that
  fails (an exit code, or a signal such as ``kill -9``) is named, the others are asked to stop
  (killed after a grace period: one still connecting to the dead process never would), and the
  launcher exits non-zero. Nothing is lost: a restart resumes from the last snapshot with
  ``--recovery-dir``, else from the start of the topics, and both stores drop what they already
  hold.
* A worker process whose launcher died sees its stdin close and stops the same way, so none is
  left behind. A second signal (to the launcher or a process) exits at once, as with one process.

Every process builds the same dataflow: the launcher passes the view versions it resolved, so a
registry change between the starts of two processes cannot make them differ. With a recovery
directory, the launcher creates its partitions once (one per worker thread of the cluster)
before any process starts; the processes share them and Bytewax gives each to one worker.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

__all__ = ["STOP_GRACE_SECONDS", "run_cluster"]

STOP_GRACE_SECONDS = 20.0
"""How long the other processes get to stop after one failed, before they are killed."""

_POLL_SECONDS = 0.1


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_cluster(
    pipeline: Path,
    *,
    workers: int,
    processes: int,
    versions: Sequence[str],
    env: dict[str, str],
    recovery_dir: Path | None,
    snapshot_seconds: float,
    echo: Callable[[str], None],
    grace: float = STOP_GRACE_SECONDS,
) -> int:
    """Run ``processes`` worker processes of one cluster until all end; returns the exit code.

    0 when every process exited 0; otherwise the first failing process's code (128 + the signal
    number when it was killed), after the others were stopped.
    """
    from engine.dataflow import recovery_config
    from featurestream.local.processes import HOST, _free_port

    if recovery_dir is not None:
        recovery_config(recovery_dir, partitions=processes * workers)
    addresses = ";".join(f"{HOST}:{_free_port()}" for _ in range(processes))
    command = [sys.executable, "-m", "featurestream.workers", str(pipeline), "--workers", str(workers)]
    command += ["--addresses", addresses, "--versions", ",".join(versions)]
    if recovery_dir is not None:
        command += ["--recovery-dir", str(recovery_dir), "--snapshot-seconds", str(snapshot_seconds)]
    procs = [
        subprocess.Popen(
            [*command, "--process-id", str(i)],
            stdin=subprocess.PIPE,
            env={**env, "BYTEWAX_PROCESS_ID": str(i)},
        )
        for i in range(processes)
    ]
    asked: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if asked:  # asked before: now like a second signal to one process, exit at once
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)
        asked.append(signum)
        for p in procs:
            _ask_stop(p)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(procs, echo, grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ask_stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask a worker process to stop cleanly: close its stdin (see the module docstring)."""
    if proc.stdin is not None and not proc.stdin.closed:
        with suppress(OSError):
            proc.stdin.close()


def _supervise(procs: list[subprocess.Popen[bytes]], echo: Callable[[str], None], grace: float) -> int:
    """Wait for every process; on the first failure stop the others (asked, then killed after
    ``grace``) and return that failure's exit code."""
    failure: tuple[int, int] | None = None
    kill_at = 0.0
    while True:
        running = [p for p in procs if p.poll() is None]
        if failure is None:
            failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)
            if failed is not None:
                failure = (failed, procs[failed].returncode)
                echo(
                    f"worker process {failed} of {len(procs)} {_describe_exit(failure[1])}; "
                    "stopping the others (the cluster cannot continue without it)"
                )
                for p in running:
                    _ask_stop(p)
                kill_at = time.monotonic() + grace
        elif running and time.monotonic() >= kill_at:
            for p in running:
                p.kill()
        if not running:
            break
        time.sleep(_POLL_SECONDS)
    if failure is None:
        return 0
    code = failure[1]
    return code if code > 0 else 128 - code


# ------------------------------------------------------------------------------------------------
# One worker process
# ------------------------------------------------------------------------------------------------

_stop_asked = threading.Event()  # by a signal while starting, or by the launcher (stdin closed)
_signals: list[int] = []  # stop signals received


def _count_signals_once() -> None:
    """Wrap the engine's handlers (first signal: stop cleanly; next: exit at once) so that a
    signal coming after the launcher asked to stop is that same stop, not a second one: on
    Ctrl-C the launcher and every worker process get SIGINT at the same moment."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        engine_handler = signal.getsignal(sig)

        def on_signal(signum: int, frame: object, engine_handler: object = engine_handler) -> None:
            first = not _signals
            _signals.append(signum)
            if first and _stop_asked.is_set():
                return
            engine_handler(signum, frame)  # type: ignore[operator]

        signal.signal(sig, on_signal)


def _watch_launcher() -> None:
    """Set :data:`_stop_asked` when stdin ends: the launcher asked to stop, or died."""

    def watch() -> None:
        # The raw descriptor, not sys.stdin: a daemon thread blocked in a buffered read holds
        # its lock, and the interpreter aborts when it cannot take that lock at exit.
        with suppress(OSError):
            while os.read(0, 4096):
                pass
        _stop_asked.set()

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _stop_when_asked(request_stop: Callable[[], None]) -> None:
    def wait() -> None:
        _stop_asked.wait()
        request_stop()

    threading.Thread(target=wait, name="stop-when-asked", daemon=True).start()


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m featurestream.workers",
        description="One worker process of `featurestream run -p N` (started by it, not by hand).",
    )
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--addresses", required=True, help="host:port of every process, ';'-separated")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--versions", required=True, help="view versions to compute, ','-separated")
    parser.add_argument("--recovery-dir", type=Path)
    parser.add_argument("--snapshot-seconds", type=float, default=10.0)
    return parser.parse_args(argv)


def _select(served: list, versions: list[str]) -> list:
    by_version = {v.version: v for v in served}
    missing = [v for v in versions if v not in by_version]
    if missing:
        from engine.errors import DefinitionError

        raise DefinitionError(
            f"view versions {missing} are no longer served here (the pipeline file or the registry "
            "changed while the run started); start the run again"
        )
    return [by_version[v] for v in versions]


def _worker(argv: Sequence[str]) -> int:
    # A stop signal may come while the process is still starting: keep it for later.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: (_signals.append(signum), _stop_asked.set()))
    args = _parse(argv)
    _watch_launcher()
    me = f"worker process {args.process_id}"

    from engine.dataflow import build_dataflow, request_stop, run_dataflow, stop_on_signals
    from engine.errors import FeaturestreamError
    from engine.observe import configure_logging
    from engine.redact import describe, redact_text
    from featurestream.config import Settings
    from featurestream.registered import served_views, start_drift_watch
    from featurestream.runtime import load_views, run_summary, runtime_config, start_metrics

    configure_logging()
    try:
        settings = Settings()
        views = _select(served_views(load_views(args.pipeline), settings), args.versions.split(","))
        flow = build_dataflow(views, runtime_config(settings))
        start_metrics(settings, args.process_id)
        if args.process_id == 0 and not settings.bounded:
            start_drift_watch(views, settings)
        stop_on_signals()
        _count_signals_once()
        _stop_when_asked(request_stop)
        started = time.monotonic()
        run_dataflow(
            flow,
            workers=args.workers,
            process_id=args.process_id,
            addresses=args.addresses.split(";"),
            recovery_dir=args.recovery_dir,
            snapshot_seconds=args.snapshot_seconds,
            handle_signals=False,
        )
        # Each process read its own share of the partitions: its summary is of that share.
        for line in run_summary(views, time.monotonic() - started):
            print(f"{me}: {line}", flush=True)
    except BaseException as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, FeaturestreamError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            print(f"{me}: error: {redact_text(str(cause))}", file=sys.stderr, flush=True)
            return 2
        if type(exc).__name__ == "PanicException":  # Bytewax's, when the cluster lost a process
            print(f"{me}: the cluster stopped: {describe(exc)}", file=sys.stderr, flush=True)
            return 1
        print(f"{me}: error: {describe(exc, chain=True)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
