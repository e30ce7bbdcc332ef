"""The raw side of ``featurestream verify``: a view's accepted events, read from its topic.

Read independently of the dataflow (every partition from its log start, a plain consumer with
its own group id, nothing committed) and judged by the rules docs/windows.md states: a message
that is not a JSON object with the source's fields and types is a dead letter; an event below
its partition's newest earlier event time minus ``allowed_lateness`` is late; with ``dedup_key``,
an id already accepted in the same partition is dropped (the engine forgets ids older than
lateness plus a tile, but a copy that old is late anyway, unless its own time differs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as _TP

from connectors.kafka import _client, _reader_config, partition_count
from engine.decode import entity_id
from engine.definitions import FeatureView, duration_ms

__all__ = ["SourceEvents", "moved_entities", "read_source"]


@dataclass
class SourceEvents:
    """Accepted events of a view's topic: entity, event time (ms), column values, partition and
    offset, ordered by (entity, time, partition, offset); and the offsets read up to."""

    entity: np.ndarray
    ts: np.ndarray
    columns: dict[str, np.ndarray]
    partition: np.ndarray
    offset: np.ndarray
    ends: dict[int, int]
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # entity -> its join key values
    read: int = 0
    dead: int = 0
    late: int = 0
    duplicates: int = 0


def _ends(consumer: Consumer, topic: str, partitions: int) -> dict[int, int]:
    return {p: consumer.get_watermark_offsets(_TP(topic, p), timeout=10)[1] for p in range(partitions)}


def _messages(consumer: Consumer, topic: str, p: int) -> list[Any]:
    """Every message of a partition up to its end (read on past a high watermark some brokers
    understate, until the partition stays quiet)."""
    low, high = consumer.get_watermark_offsets(_TP(topic, p), timeout=10)
    if high <= low:
        return []
    consumer.assign([_TP(topic, p, low)])
    out: list[Any] = []
    try:
        while True:
            msgs = consumer.consume(5000, 1.0 if not out or out[-1].offset() < high - 1 else 0.3)
            good = [m for m in msgs if m.error() is None]
            out.extend(good)
            if not msgs:
                return out
    finally:
        consumer.unassign()


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _event_time(value: Any, fmt: str) -> int | None:
    if fmt == "iso8601":
        if not isinstance(value, str):
            return None
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if fmt == "epoch_millis":
        return int(value) if isinstance(value, int) else None
    return int(np.floor(value * 1000))


def _parse(view: FeatureView, raw: bytes) -> tuple[str, int, dict[str, Any]] | None:
    """(entity, time ms, fields) of a valid event, else None (a dead letter)."""
    src = view.source
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    ts = _event_time(event.get(src.timestamp_field), src.timestamp_format)
    if ts is None:
        return None
    for f in src.fields:
        v = event.get(f.name)
        if v is None:
            if not f.nullable:
                return None
            continue
        if (isinstance(v, bool) and f.dtype != "bool") or not isinstance(v, _TYPES[f.dtype]):
            return None
    keys = view.entity.join_keys
    entity = str(event[keys[0]]) if len(keys) == 1 else entity_id([event[k] for k in keys])
    return entity, ts, event


def read_source(
    view: FeatureView, bootstrap: str, kafka_config: dict[str, Any] | None = None
) -> SourceEvents:
    """The view's accepted events, read from its topic now (own group id, nothing committed)."""
    topic = view.source.topic
    conf = {**(kafka_config or {}), "group.id": f"featurestream-verify-{view.name}"}
    consumer = _client(Consumer, _reader_config(bootstrap, topic, conf))
    lateness = duration_ms(view.allowed_lateness)
    dedup = view.source.dedup_key
    cols = view.columns
    rows: list[tuple[str, int, int, int, list[Any]]] = []
    out = SourceEvents(np.array([]), np.array([]), {}, np.array([]), np.array([]), {})
    try:
        parts = partition_count(bootstrap, topic, config=kafka_config)
        for p in range(parts):
            newest = -np.inf
            seen: set[Any] = set()
            end = 0
            for m in _messages(consumer, topic, p):
                out.read += 1
                end = m.offset() + 1
                parsed = _parse(view, m.value() or b"")
                if parsed is None:
                    out.dead += 1
                    continue
                entity, ts, event = parsed
                if entity not in out.keys:
                    out.keys[entity] = {k: event[k] for k in view.entity.join_keys}
                late = ts < newest - lateness
                if dedup is not None and not late:
                    if event[dedup] in seen:
                        out.duplicates += 1
                        continue
                    seen.add(event[dedup])
                newest = max(newest, ts)
                if late:
                    out.late += 1
                    continue
                rows.append((entity, ts, p, m.offset(), [event.get(c) for c in cols]))
            out.ends[p] = end
    finally:
        consumer.close()
    rows.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    out.entity = np.array([r[0] for r in rows], dtype=object)
    out.ts = np.array([r[1] for r in rows], dtype=np.int64)
    out.partition = np.array([r[2] for r in rows], dtype=np.int64)
    out.offset = np.array([r[3] for r in rows], dtype=np.int64)
    for i, c in enumerate(cols):
        values = [r[4][i] for r in rows]
        text = any(isinstance(v, str) for v in values)
        out.columns[c] = np.array(
            values if text else [np.nan if v is None else float(v) for v in values],
            dtype=object if text else np.float64,
        )
    return out


def _topic_ends(view: FeatureView, bootstrap: str, kafka_config: dict[str, Any] | None) -> dict[int, int]:
    conf = {**(kafka_config or {}), "group.id": f"featurestream-verify-{view.name}"}
    consumer = _client(Consumer, _reader_config(bootstrap, view.source.topic, conf))
    try:
        return _ends(
            consumer, view.source.topic, partition_count(bootstrap, view.source.topic, config=kafka_config)
        )
    finally:
        consumer.close()


def moved_entities(
    view: FeatureView,
    bootstrap: str,
    kafka_config: dict[str, Any] | None,
    events: SourceEvents,
) -> set[str]:
    """Entities with messages that arrived after the source was read (up to the store reads)."""
    after = _topic_ends(view, bootstrap, kafka_config)
    if all(end <= events.ends.get(p, 0) for p, end in after.items()):
        return set()
    conf = {**(kafka_config or {}), "group.id": f"featurestream-verify-{view.name}"}
    consumer = _client(Consumer, _reader_config(bootstrap, view.source.topic, conf))
    moved: set[str] = set()
    try:
        for p, end in after.items():
            start = events.ends.get(p, 0)
            if end <= start:
                continue
            consumer.assign([_TP(view.source.topic, p, start)])
            while True:
                msgs = [m for m in consumer.consume(5000, 0.5) if m.error() is None]
                if not msgs:
                    break
                for m in msgs:
                    parsed = _parse(view, m.value() or b"")
                    if parsed is not None:
                        moved.add(parsed[0])
            consumer.unassign()
    finally:
        consumer.close()
    return moved
