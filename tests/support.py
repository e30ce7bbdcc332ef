"""Helpers shared by tests: producing events, reading topics, running views to completion."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from connectors.kafka import ensure_topic, partition_count
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.definitions import FeatureView


def worker_env(
    kafka: str, redis_url: str, tmp_path: Path, prefix: str, metrics_port: int = 0
) -> dict[str, str]:
    """Environment of a worker subprocess using the test services, its own key prefix and Delta dir."""
    return {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "FEATURESTREAM_REDIS_URL": redis_url,
        "FEATURESTREAM_DELTA_URI": str(tmp_path / "delta"),
        "FEATURESTREAM_REDIS_PREFIX": prefix,
        "FEATURESTREAM_STATE_DIR": str(tmp_path / "state"),
        "FEATURESTREAM_METRICS_PORT": str(metrics_port),
    }


_PAY_PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="{name}", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float")),
)
views = [FeatureView(
    name="{name}", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=(
{aggregations}
    ),
    tile_size="1m", allowed_lateness="1d",
)]


def __getattr__(name):
    if name == "flow":
        from featurestream.runtime import dataflow
        return dataflow(*views)
    raise AttributeError(name)
"""


def pay_pipeline(topic: str, functions: tuple[str, ...] = ("count", "sum", "last"), name: str = "pay") -> str:
    """A pipeline file's text: one view of ``user_id``/``amount`` events with 1-day aggregations
    (``count`` of events, the others of ``amount``); ``flow`` for ``python -m bytewax.run``."""
    aggs = "\n".join(
        f'        Aggregation(function="{f}", window="1d"),'
        if f == "count"
        else f'        Aggregation(function="{f}", column="amount", window="1d"),'
        for f in functions
    )
    return _PAY_PIPELINE.format(name=name, topic=topic, aggregations=aggs)


def make_runtime(kafka: str, redis_url: str, delta_dir: Path, prefix: str) -> RuntimeConfig:
    """A bounded runtime isolated by its own Redis key prefix and Delta root, small batches."""
    return RuntimeConfig(
        kafka_bootstrap_servers=kafka,
        redis_url=redis_url,
        redis_prefix=unique(prefix),
        delta_uri=str(delta_dir / "delta"),
        stop_at_end=True,
        batch_size=5_000,
        poll_timeout_seconds=0.02,
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> str:
    ensure_topic(bootstrap, topic, partitions)
    ensure_topic(bootstrap, f"{topic}.dlq", 1)
    return topic


def produce(bootstrap: str, topic: str, events: Iterable[Any], key_field: str | None = None) -> int:
    """Publish events in order; dicts are JSON-encoded, bytes are sent as they are.

    With ``key_field``, dict events are keyed (and so partitioned) by that field.
    """
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    n = 0
    for e in events:
        if isinstance(e, bytes | bytearray):
            p.produce(topic, value=bytes(e))
        else:
            key = str(e[key_field]).encode() if key_field and key_field in e else None
            p.produce(topic, key=key, value=json.dumps(e).encode())
        n += 1
        if n % 10_000 == 0:
            p.poll(0)
    assert p.flush(30) == 0, "broker did not acknowledge every test event"
    return n


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every message currently in ``topic`` (all partitions), as confluent_kafka Messages."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("t"), "enable.auto.commit": False})
    parts = partition_count(bootstrap, topic)
    out = []
    for p in range(parts):
        low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high <= low:
            continue
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
        # Some brokers (Tansu) report a high watermark below the true end, so read on past it
        # until the partition stays quiet.
        last = -1
        while True:
            msgs = c.consume(1000, 2.0 if last < high - 1 else 0.5)
            good = [m for m in msgs if m.error() is None]
            out.extend(good)
            last = good[-1].offset() if good else last
            if not msgs:
                break
    c.close()
    return out


def headers(msg: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (msg.headers() or [])}


def run_views(views: list[FeatureView], runtime: RuntimeConfig, workers: int = 1) -> None:
    """Run the views' dataflow over everything currently in their topics, then return."""
    run_dataflow(build_dataflow(views, runtime.model_copy(update={"stop_at_end": True})), workers=workers)
