"""A single background thread per sink, so the dataflow computes while a store is busy."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["BackgroundWriter"]

_STOP = object()


class BackgroundWriter(Generic[T]):
    """Runs ``write`` on a worker thread, in submission order.

    At most ``depth`` submissions wait (back-pressure on the dataflow). Submissions waiting
    together are written in one call. An error stops the writer and is raised by the next
    :meth:`submit`, :meth:`drain` or :meth:`close`, so a failed write is never silently lost.
    """

    def __init__(self, write: Callable[[list[T]], None], *, depth: int = 4, name: str = "writer") -> None:
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: list[T]) -> None:
        self._raise()
        if items:
            self._queue.put(items)

    def drain(self) -> None:
        """Block until everything submitted so far is written."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch, taken, stop = [], 1, first is _STOP
            if not stop:
                batch.extend(first)  # type: ignore[arg-type]
            while not stop:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if more is _STOP:
                    stop = True
                else:
                    batch.extend(more)  # type: ignore[arg-type]
            try:
                if batch and self._error is None:
                    self._write(batch)
            except BaseException as exc:  # surfaced to the dataflow thread
                self._error = exc
            finally:
                for _ in range(taken):
                    self._queue.task_done()
            if stop:
                return
