"""Prometheus metrics of the dataflow (names follow Prometheus conventions).

Labels are bounded: a view, a source topic and partition, a dead-letter reason, a store, a
feature. Never an entity.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCH_LATENCY",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "DRIFT_KS",
    "DRIFT_PSI",
    "DUPLICATES",
    "EVENTS_ACCEPTED",
    "EVENTS_IN",
    "FRESHNESS",
    "LATE_EVENTS",
    "STORE_WRITE_ERRORS",
    "STORE_WRITE_SECONDS",
    "WATERMARK",
    "total",
]

# 1 ms .. 30 s: a micro-batch normally takes milliseconds; seconds mean back-pressure.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Freshness also includes the time an event took to reach Kafka, so it reaches further.
FRESHNESS_BUCKETS = (*LATENCY_BUCKETS, 60.0, 300.0, 900.0, 3600.0)

EVENTS_IN = Counter(
    "featurestream_events_in", "Messages read from a source topic", ["view", "topic", "partition"]
)
EVENTS_ACCEPTED = Counter(
    "featurestream_events_accepted", "Events that passed validation and lateness checks", ["view"]
)
DEAD_LETTERS = Counter(
    "featurestream_dead_letters", "Events sent to the dead-letter topic", ["view", "reason"]
)
LATE_EVENTS = Counter(
    "featurestream_late_events",
    "Events older than the watermark (also counted as dead letters with reason=late)",
    ["view"],
)
DUPLICATES = Counter(
    "featurestream_duplicates",
    "Redelivered events dropped by the source's dedup_key (an id already accepted recently)",
    ["view"],
)
WATERMARK = Gauge(
    "featurestream_watermark_seconds",
    "Event-time watermark per source partition (newest event time minus allowed lateness)",
    ["view", "topic", "partition"],
)
CONSUMER_LAG = Gauge(
    "featurestream_consumer_lag_messages",
    "Messages between the read position and the partition's end (as of the latest fetch)",
    ["view", "topic", "partition"],
)
BATCH_LATENCY = Histogram(
    "featurestream_batch_latency_seconds",
    "From reading a micro-batch from Kafka to its tiles being written to Redis",
    ["view"],
    buckets=LATENCY_BUCKETS,
)
FRESHNESS = Histogram(
    "featurestream_feature_freshness_seconds",
    "Redis acknowledgement time minus the Kafka timestamp of the oldest message of the batch",
    ["view"],
    buckets=FRESHNESS_BUCKETS,
)
STORE_WRITE_SECONDS = Histogram(
    "featurestream_store_write_seconds",
    "Duration of one online (redis) or offline (delta) store write",
    ["store", "view"],
    buckets=LATENCY_BUCKETS,
)
STORE_WRITE_ERRORS = Counter(
    "featurestream_store_write_errors",
    "Failed online (redis) or offline (delta) store writes",
    ["store", "view"],
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
