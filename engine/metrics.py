"""Prometheus metrics of the dataflow (names follow Prometheus conventions)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["DEAD_LETTERS", "EVENTS_ACCEPTED", "EVENTS_IN", "WATERMARK", "total"]

EVENTS_IN = Counter(
    "featurestream_events_in", "Messages read from a source topic", ["view", "topic", "partition"]
)
EVENTS_ACCEPTED = Counter(
    "featurestream_events_accepted", "Events that passed validation and lateness checks", ["view"]
)
DEAD_LETTERS = Counter(
    "featurestream_dead_letters", "Events sent to the dead-letter topic", ["view", "reason"]
)
WATERMARK = Gauge(
    "featurestream_watermark_seconds",
    "Event-time watermark per source partition (newest event time minus allowed lateness)",
    ["view", "topic", "partition"],
)


DRIFT_PSI = Gauge(
    "featurestream_drift_psi",
    "Latest PSI of a feature's live distribution vs its baseline",
    ["view", "feature"],
)
DRIFT_KS = Gauge(
    "featurestream_drift_ks",
    "Latest KS distance of a feature's live distribution vs its baseline",
    ["view", "feature"],
)


def total(counter: Counter, **labels: str) -> float:
    """Sum of a counter over every label set matching ``labels``."""
    out = 0.0
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                out += s.value
    return out
