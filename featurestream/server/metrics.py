"""Prometheus metrics of the feature server, in a registry of its own (served at ``/metrics``).

Labels carry route templates, view names and status codes only: never a key, a key id, an
entity or anything else a client chooses (an unknown view is labelled ``-``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServerMetrics"]

# Fine buckets below 10 ms: the latency targets are in single milliseconds.
_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class ServerMetrics:
    """The server's collectors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            "featurestream_server_request_seconds",
            "Request latency, by route, feature view (or source for pushes) and status code; a "
            "request reading several views is observed once under each",
            ["route", "view", "code"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.entities = Histogram(
            "featurestream_server_entities_per_request",
            "Entities per online read",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.batch = Histogram(
            "featurestream_server_read_batch_requests",
            "Requests served by one coalesced Redis read and combine",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.decisions = Counter(
            "featurestream_server_access_decisions_total",
            "Access decisions, by action (read, produce), outcome and reason",
            ["action", "allowed", "reason"],
            registry=r,
        )
        self.audit_pending = Gauge(
            "featurestream_server_audit_pending",
            "Access decisions not yet written to the registry",
            registry=r,
        )
        self.audit_errors = Counter(
            "featurestream_server_audit_write_errors_total", "Failed writes of the access audit", registry=r
        )
        self.redis_errors = Counter(
            "featurestream_server_redis_errors_total",
            "Online reads that failed because Redis did not answer",
            registry=r,
        )
        self.cache = Counter(
            "featurestream_server_read_cache_total",
            "Entities read from the cache of computed values (hit) or computed (miss)",
            ["result"],
            registry=r,
        )
        self.pushed = Counter(
            "featurestream_server_pushed_events_total",
            "Events accepted by POST /push, by source",
            ["source"],
            registry=r,
        )
