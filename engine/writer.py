"""Store writes on one background thread per sink: the dataflow computes while a store is busy,
and a store outage is backpressure, never a crash or a skip.

A failed write is retried with capped exponential backoff (:class:`Backoff`) until it succeeds.
Meanwhile the batch stays queued, later submissions queue behind it up to the writer's depth,
and then :meth:`BackgroundWriter.submit` blocks: the dataflow stops reading, so the sources keep
their positions and nothing is skipped. Retrying is safe because every store write is idempotent
(Redis: compare-and-set on each entity's positions; Delta: replayed offsets are filtered by the
commits' app transactions).

Which errors are retried (:func:`is_transient`): those that a store coming back can fix, i.e.
connection and I/O failures anywhere in the exception's cause chain (``OSError``, which includes
``ConnectionError``, ``TimeoutError`` and delta-rs object-store errors; redis-py connection,
timeout, loading, read-only-replica and out-of-memory errors; Delta commit conflicts;
:class:`~engine.errors.ServiceUnavailable`). Everything else is a programming error or a
mismatch between the data and the store (a schema mismatch, a Delta protocol error, a Lua
script error, a wrong key type) that retrying cannot fix: it stops the worker with a logged
message.

A stop request while a store is failing waits at most :data:`STOP_GRACE_SECONDS`; then the writer
gives up with :class:`~engine.errors.ServiceUnavailable`. Its data is not lost: the dataflow's
positions were never advanced past it (with recovery, the snapshot that would have covered it
never completed), so a restart replays it.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import redis
from deltalake.exceptions import CommitFailedError

from engine.errors import ServiceUnavailable, StoreError
from engine.redact import describe, redact_text

T = TypeVar("T")

__all__ = ["STOP_GRACE_SECONDS", "BackgroundWriter", "Backoff", "is_transient", "new_run"]

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0
"""How long a stop request waits for a failing store before the worker exits without it."""

_LOG_EVERY_SECONDS = 30.0  # while a store keeps failing, one log line per this many seconds
_POLL = 0.1  # how often blocked calls look at the writer's state and the stop request

_STOP = object()
_surfaced = threading.Event()  # a writer error was raised into the dataflow in this process
_surfaced_lock = threading.Lock()

_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError, TimeoutError, PermissionError, delta-rs object-store I/O
    redis.ConnectionError,  # also AuthenticationError, BusyLoadingError (Redis loading its data)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during failover
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    CommitFailedError,  # concurrent Delta commits kept conflicting
    ServiceUnavailable,
)
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "MISCONF", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def new_run() -> None:
    """A dataflow run starts in this process: forget that a writer of an earlier run raised."""
    _surfaced.clear()


def is_transient(exc: BaseException) -> bool:
    """True if a store coming back could make the write succeed (see the module docstring)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, _TRANSIENT):
            return True
        if isinstance(cur, redis.ResponseError) and str(cur).startswith(_TRANSIENT_REPLIES):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``n`` (1, 2, ...): ``first * 2**(n-1)``, at most ``cap``, with jitter
    (between half and all of it) so writers retrying one store do not hit it in step."""

    first: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        full = min(self.cap, self.first * 2 ** min(attempt - 1, 30))
        return full * (0.5 + random.random() / 2)


class BackgroundWriter(Generic[T]):
    """Runs ``write`` on a worker thread, in submission order, until each write succeeds.

    At most ``depth`` submissions wait (back-pressure on the dataflow). Submissions waiting
    together are written in one call. ``name`` names the store in log lines and errors (e.g.
    ``redis store of view clicks (version ...)``). ``stop`` is the process's stop request: once
    it is set (or :meth:`finish`/:meth:`close` began), a failing store is retried for ``grace``
    seconds more, then abandoned.

    An error that retrying cannot fix, or giving up after a stop, is logged when it happens and
    raised by the next :meth:`submit` or :meth:`drain`, so a failed write is never silently lost.
    :meth:`finish` and :meth:`close` run while the dataflow shuts down, possibly while it unwinds
    from an error already raised; they raise only if no writer error was raised in this process
    yet, because a second error during that unwinding aborts the process before anything logs.
    """

    def __init__(
        self,
        write: Callable[[list[T]], None],
        *,
        depth: int = 4,
        name: str = "writer",
        stop: threading.Event | None = None,
        grace: float = STOP_GRACE_SECONDS,
        backoff: Backoff | None = None,
        transient: Callable[[BaseException], bool] = is_transient,
    ) -> None:
        self._write = write
        self.name = name
        self._stop = stop or threading.Event()
        self._grace = grace
        self._backoff = backoff or Backoff()
        self._transient = transient
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self._raised = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        """Why the writer stopped writing (it then discards what it is given), or None."""
        return self._error

    def submit(self, items: list[T]) -> None:
        """Queue ``items``; blocks while ``depth`` submissions wait (a store outage stalls here)."""
        self._raise()
        if items and not self._put(items):
            self._raise()

    def _put(self, items: list[T]) -> bool:
        """Queue ``items`` unless the writer stopped meanwhile (then False)."""
        while self._error is None:
            try:
                self._queue.put(items, timeout=_POLL)
                return True
            except queue.Full:
                pass
        return False

    def check(self) -> None:
        """Raise the error that stopped the writer, if any, without waiting for anything."""
        self._raise()

    def drain(self) -> None:
        """Block until everything submitted so far is written (or the writer stopped)."""
        self._queue.join()
        self._raise()

    def closing(self) -> None:
        """The dataflow is shutting down: from now on a failing store gets ``grace`` seconds."""
        self._closing.set()

    def finish(self, items: list[T] | None = None) -> None:
        """Last submission and drain at shutdown (a failing store then gets ``grace`` seconds)."""
        self._closing.set()
        if items:
            self._put(items)
        self._queue.join()
        self._raise(final=True)

    def close(self) -> None:
        """Stop the thread once everything submitted is written (or abandoned)."""
        self._closing.set()
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise(final=True)

    def _raise(self, final: bool = False) -> None:
        err = self._error
        if err is None:
            return
        with _surfaced_lock:
            if final and (self._raised or _surfaced.is_set()):
                return
            self._raised = True
            _surfaced.set()
        raise err from None

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._closing.is_set()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch: list[T] = []
            taken, stop = 1, first is _STOP
            if not stop:
                batch.extend(first)  # type: ignore[call-overload]
            while not stop:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is _STOP:
                    stop = True
                else:
                    batch.extend(more)  # type: ignore[call-overload]
            try:
                if batch and self._error is None:
                    self._write_until_stored(batch)
            except BaseException as exc:  # never lose the thread: surface whatever happened
                self._error = StoreError(f"{self.name}: writer failed: {describe(exc)}")
            finally:
                for _ in range(taken):
                    self._queue.task_done()
            if stop:
                return

    def _write_until_stored(self, batch: list[T]) -> None:
        attempt, failing_since, stop_seen, logged = 0, 0.0, None, 0.0
        while True:
            try:
                self._write(batch)
            except BaseException as exc:
                now = time.monotonic()
                if not self._transient(exc):
                    self._fatal(exc)
                    return
                attempt += 1
                if attempt == 1:
                    failing_since = now
                if attempt == 1 or now - logged >= _LOG_EVERY_SECONDS:
                    logged = now
                    log.warning(
                        "%s: write failed (%s); retrying with backoff (attempt %d, failing for %.0f s). "
                        "The dataflow waits for it: nothing is skipped.",
                        self.name,
                        describe(exc),
                        attempt,
                        now - failing_since,
                    )
                if self._stopping():
                    stop_seen = now if stop_seen is None else stop_seen
                    if now - stop_seen >= self._grace:
                        self._give_up(exc, now - failing_since)
                        return
                delay = self._backoff.delay(attempt)
                if stop_seen is not None:
                    delay = min(delay, stop_seen + self._grace - now)
                self._sleep(delay, wake_on_stop=stop_seen is None)
            else:
                if attempt:
                    log.warning(
                        "%s: written again after %d failed attempts over %.1f s",
                        self.name,
                        attempt,
                        time.monotonic() - failing_since,
                    )
                return

    def _sleep(self, seconds: float, wake_on_stop: bool) -> None:
        """Sleep, waking early on a stop request so that its grace starts at once."""
        end = time.monotonic() + max(0.0, seconds)
        while (left := end - time.monotonic()) > 0:
            if wake_on_stop and self._stopping():
                return
            time.sleep(min(_POLL, left))

    def _fatal(self, exc: BaseException) -> None:
        log.error(
            "%s: write failed and retrying cannot fix it; stopping the worker. Unwritten data is "
            "replayed on restart (positions were not advanced past it).\n%s",
            self.name,
            describe(exc, trace=True),
        )
        self._error = StoreError(f"{self.name}: write failed and retrying cannot fix it: {describe(exc)}")

    def _give_up(self, exc: BaseException, failing_for: float) -> None:
        text = (
            f"{self.name} still failing {self._grace:.0f} s after the stop request (failing for "
            f"{failing_for:.0f} s: {describe(exc)}); exiting without writing it. The unwritten data "
            "will be replayed on restart: positions were not advanced past it"
        )
        log.error("%s", text)
        self._error = ServiceUnavailable(redact_text(text))
