"""The worker's HTTP endpoint: ``/metrics`` (Prometheus text format) and ``/healthz`` (JSON).

Source partitions and sinks report into one process-wide :data:`HEALTH` registry; ``/healthz``
answers 200 while every source partition polled Kafka within :data:`STALE_SOURCE_SECONDS` and no
store is failing, else 503. A store that fails and comes back (writes are retried) turns it 503
and then 200 again. Error texts are redacted (:mod:`engine.redact`): no password in an answer.

The endpoint listens on 127.0.0.1 unless told otherwise (``FEATURESTREAM_METRICS_HOST``), so a
worker does not expose its internals to the network by default.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from engine.errors import ServiceUnavailable
from engine.redact import describe, redact

__all__ = [
    "DEFAULT_HOST",
    "HEALTH",
    "STALE_SOURCE_SECONDS",
    "Health",
    "MetricsPortError",
    "configure_logging",
    "serve",
    "stop",
]

STALE_SOURCE_SECONDS = 60.0
DEFAULT_HOST = "127.0.0.1"


class MetricsPortError(ServiceUnavailable):
    """The metrics endpoint cannot listen on its port."""


class Health:
    """What ``/healthz`` reports: source partitions' last polls and store writers' errors."""

    def __init__(self, stale_after: float = STALE_SOURCE_SECONDS) -> None:
        self.stale_after = stale_after
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._polled: dict[tuple[str, str, int], float] = {}
        self._errors: dict[str, str] = {}

    def source_polled(self, view: str, topic: str, partition: int) -> None:
        """A source partition asked Kafka for messages without an error (also on opening)."""
        with self._lock:
            self._polled[(view, topic, partition)] = time.monotonic()

    def source_closed(self, view: str, topic: str, partition: int) -> None:
        with self._lock:
            self._polled.pop((view, topic, partition), None)

    def writer_failed(self, sink: str, exc: BaseException) -> None:
        """A write to ``sink`` (``store:view:version``) failed; failing until :meth:`writer_ok`."""
        with self._lock:
            self._errors[sink] = describe(exc)[:500]

    def writer_ok(self, sink: str) -> None:
        """A write to ``sink`` succeeded (the store is back, if it was failing)."""
        if sink in self._errors:
            with self._lock:
                self._errors.pop(sink, None)

    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            polled = sorted(self._polled.items())
            errors = dict(self._errors)
        sources = [
            {"view": v, "topic": t, "partition": p, "seconds_since_poll": round(now - at, 3)}
            for (v, t, p), at in polled
        ]
        stale = [s for s in sources if s["seconds_since_poll"] > self.stale_after]
        return {
            "status": "failing" if errors or stale else "ok",
            "uptime_seconds": round(now - self.started, 3),
            "sources": sources,
            "writer_errors": errors,
        }


HEALTH = Health()

_OUR_LOGGERS = ("engine", "connectors", "featurestream", "registry")


def configure_logging() -> None:
    """Worker log lines (store outages and recoveries, why the worker exits) to stderr, with time
    and level, unless the application configured logging itself."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
        elif path == "/healthz":
            try:
                report = self.server.health()
                code = 200 if report.get("status") == "ok" else 503
            except Exception as exc:  # a broken health check is itself a failure
                report, code = {"status": "failing", "error": describe(exc)}, 503
            self._send(code, "application/json", json.dumps(redact(report)).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found; try /metrics or /healthz\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, health: Callable[[], dict]) -> None:
        self.health = health
        if ":" in host:  # an IPv6 address
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


_servers: dict[int, _Server] = {}
_lock = threading.Lock()


def serve(
    port: int, health: Callable[[], dict] | None = None, host: str = DEFAULT_HOST
) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` from a daemon thread.

    ``host`` defaults to the loopback address; ``0.0.0.0`` listens on every interface (e.g. in a
    container, for a Prometheus in another one). Serving the same port again in this process
    returns the running server. Port 0 picks a free port (``server.server_address[1]``).
    """
    with _lock:
        if port and port in _servers:
            return _servers[port]
        try:
            server = _Server(host, port, health or HEALTH.report)
        except OSError as exc:
            raise MetricsPortError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}. Another process "
                f"(another worker?) may hold the port; set FEATURESTREAM_METRICS_PORT to a free port "
                f"(worker processes add their process id to it), or to 0 to disable the metrics "
                f"endpoint. FEATURESTREAM_METRICS_HOST must be an address of this machine "
                f"(default {DEFAULT_HOST}; 0.0.0.0 for every interface)"
            ) from None
        bound = server.server_address[1]
        threading.Thread(target=server.serve_forever, name=f"metrics-{bound}", daemon=True).start()
        _servers[bound] = server
        return server


def stop(server: ThreadingHTTPServer) -> None:
    """Stop a server :func:`serve` started and free its port."""
    with _lock:
        _servers.pop(server.server_address[1], None)
    server.shutdown()
    server.server_close()
