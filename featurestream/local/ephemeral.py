"""Private services for tests and benchmarks: a fresh broker and redis-server, stopped on exit."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from featurestream.local.processes import _kafka_address, _redis_address, _terminate
from featurestream.local.services import _launch

__all__ = ["EphemeralServices"]


class EphemeralServices:
    """A fresh Tansu broker and redis-server owned by the caller, both stopped on exit.

    For tests and benchmarks that must not share (or leave behind) state::

        with EphemeralServices(tmp_path) as eps:
            eps.kafka_bootstrap_servers, eps.redis_url
    """

    def __init__(self, work_dir: str | os.PathLike[str], broker_storage: str | None = None) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.broker_storage = broker_storage
        self._pids: dict[str, int] = {}
        self._ports: dict[str, int] = {}

    def __enter__(self) -> EphemeralServices:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            for kind in ("kafka", "redis"):
                proc, port = _launch(kind, self.work_dir, self.broker_storage)
                self._pids[kind], self._ports[kind] = proc.pid, port
        except BaseException:
            self.close()
            raise
        return self

    def restart_kafka(self) -> str:
        """Stop the broker and start a new one on its storage; returns the new address.

        With memory storage the new broker is empty, as after a crash or `services down`/`up`.
        """
        _terminate(self._pids.pop("kafka"))
        proc, port = _launch("kafka", self.work_dir, self.broker_storage)
        self._pids["kafka"], self._ports["kafka"] = proc.pid, port
        return self.kafka_bootstrap_servers

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Terminate both servers (idempotent)."""
        for kind in list(self._pids):
            _terminate(self._pids.pop(kind))

    @property
    def kafka_bootstrap_servers(self) -> str:
        return _kafka_address(self._ports["kafka"])

    @property
    def redis_url(self) -> str:
        return _redis_address(self._ports["redis"])

    @property
    def kafka_port(self) -> int:
        return self._ports["kafka"]

    @property
    def redis_port(self) -> int:
        return self._ports["redis"]

    @property
    def pids(self) -> dict[str, int]:
        """Pids of the running servers by kind ("kafka", "redis"); empty after exit."""
        return dict(self._pids)
