"""Bytewax adapters: the decoding Kafka source and the dead-letter, offline and online sinks.

Each source partition is one Kafka partition. It emits one item per micro-batch (columns, not
events), so Bytewax's per-item cost is paid per batch. Its snapshot is the next offset and the
partition's newest event time, so after recovery it resumes at the same position with the same
watermark.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.delta_store import DeltaOfflineStore, event_schema
from connectors.kafka import DeadLetterProducer, PartitionReader, partition_count
from connectors.redis_store import RedisOnlineStore
from engine.decode import DeadLetter, EventDecoder, Reason
from engine.definitions import FeatureView, duration_ms, format_duration
from engine.metrics import (
    BATCH_LATENCY,
    CONSUMER_LAG,
    DEAD_LETTERS,
    EVENTS_ACCEPTED,
    EVENTS_IN,
    FRESHNESS,
    LATE_EVENTS,
    STORE_WRITE_ERRORS,
    STORE_WRITE_SECONDS,
    WATERMARK,
)
from engine.observe import HEALTH
from engine.state import TileUpdate
from engine.tiles import TileLayout
from engine.writer import BackgroundWriter

_NO_TS = -(2.0**62)

STOP = threading.Event()
"""Set to end every source at its current position; sinks then flush and the dataflow returns."""


def request_stop() -> None:
    """End the running dataflow cleanly (as on SIGTERM): no event is half-written."""
    STOP.set()


def _instrument(store: str, view: str, write: Callable[[list[Any]], object]) -> Callable[[list[Any]], None]:
    """``write``, timed; a failure is counted and reported to the health registry, then re-raised."""
    seconds = STORE_WRITE_SECONDS.labels(store=store, view=view)
    errors = STORE_WRITE_ERRORS.labels(store=store, view=view)

    def timed(items: list[Any]) -> None:
        start = time.perf_counter()
        try:
            write(items)
        except Exception as exc:
            errors.inc()
            HEALTH.writer_failed(f"{store}:{view}", exc)
            raise
        seconds.observe(time.perf_counter() - start)

    return timed


@dataclass
class SourceBatch:
    """One decoded micro-batch of one Kafka partition."""

    topic: str
    partition: int
    entity: list[str]
    ts: np.ndarray
    columns: list[np.ndarray]
    offsets: np.ndarray
    dead: list[DeadLetter] = field(default_factory=list)
    text: dict[str, list[str | None]] = field(default_factory=dict)
    read: int = 0
    watermark: float = _NO_TS
    read_at: float = 0.0  # wall-clock time the batch came from Kafka (for the latency histogram)

    def rows(self, columns: tuple[str, ...]) -> pa.Table:
        """The accepted events as offline-store rows."""
        n = len(self.entity)
        return pa.Table.from_arrays(
            [
                pa.array(self.entity, pa.string()),
                pa.array(self.ts, pa.int64()).view(pa.timestamp("ms", tz="UTC")),
                *[
                    pa.array(self.text[name], pa.string())
                    if name in self.text
                    else pa.array(c, pa.float64(), from_pandas=True)
                    for name, c in zip(columns, self.columns, strict=True)
                ],
                pa.array([self.topic] * n, pa.string()),
                pa.array(np.full(n, self.partition, np.int32)),
                pa.array(self.offsets),
                pa.array((self.ts // 86_400_000).astype(np.int32), pa.int32()).view(pa.date32()),
            ],
            schema=event_schema(columns, tuple(self.text)),
        )


class _DecodingPartition(StatefulSourcePartition[SourceBatch, dict]):
    def __init__(
        self,
        view: FeatureView,
        reader: PartitionReader,
        max_ts: float,
        batch_size: int,
        poll_timeout: float,
    ) -> None:
        self.view = view
        self.reader = reader
        self.decoder = EventDecoder(view)
        self.lateness = float(duration_ms(view.allowed_lateness))
        self.max_ts = max_ts
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        labels = {"view": view.name, "topic": reader.topic, "partition": str(reader.partition)}
        self._in = EVENTS_IN.labels(**labels)
        self._wm = WATERMARK.labels(**labels)
        self._ok = EVENTS_ACCEPTED.labels(view=view.name)
        self._late = LATE_EVENTS.labels(view=view.name)
        self._lag = CONSUMER_LAG.labels(**labels)
        self._key = (view.name, reader.topic, reader.partition)
        HEALTH.source_polled(*self._key)

    def next_batch(self) -> list[SourceBatch]:
        if self.reader.at_end or STOP.is_set():
            raise StopIteration
        raw = self.reader.read(self.batch_size, self.poll_timeout)
        read_at = time.time()
        HEALTH.source_polled(*self._key)
        self._lag.set(self.reader.lag())
        if raw is None:
            return []
        dec = self.decoder.decode(raw.values)
        ts = dec.ts
        dead = [
            DeadLetter(raw.topic, raw.partition, int(raw.offsets[i]), raw.keys[i], raw.values[i], why, msg)
            for i, why, msg in dec.failures
        ]
        keep = None
        if len(ts):
            seen = np.maximum.accumulate(np.concatenate(([self.max_ts], ts.astype(np.float64))))
            late = ts < seen[:-1] - self.lateness
            self.max_ts = float(seen[-1])
            if late.any():
                self._late.inc(int(late.sum()))
                lag = format_duration(self.view.allowed_lateness)
                for j in np.flatnonzero(late).tolist():
                    i = int(dec.index[j])
                    wm = datetime.fromtimestamp((seen[j] - self.lateness) / 1000, UTC).isoformat()
                    dead.append(
                        DeadLetter(
                            raw.topic,
                            raw.partition,
                            int(raw.offsets[i]),
                            raw.keys[i],
                            raw.values[i],
                            Reason.LATE,
                            f"{self.view.source.timestamp_field}: event time is behind the watermark "
                            f"{wm} (newest event time minus allowed_lateness {lag}); raise the view's "
                            f"allowed_lateness to accept it",
                        )
                    )
                keep = ~late
        entity, columns, index, text = dec.entity, dec.columns, dec.index, dec.text
        if keep is not None:
            ts, index = ts[keep], index[keep]
            flags = keep.tolist()
            entity = [e for e, k in zip(entity, flags, strict=True) if k]
            columns = [c[keep] for c in columns]
            text = {name: [v for v, k in zip(vals, flags, strict=True) if k] for name, vals in text.items()}
        dead.sort(key=lambda d: d.offset)
        self._in.inc(len(raw.values))
        self._ok.inc(len(ts))
        for letter in dead:
            DEAD_LETTERS.labels(view=self.view.name, reason=letter.reason).inc()
        if self.max_ts > _NO_TS:
            self._wm.set((self.max_ts - self.lateness) / 1000)
        return [
            SourceBatch(
                topic=raw.topic,
                partition=raw.partition,
                entity=entity,
                ts=ts,
                columns=columns,
                offsets=raw.offsets[index] if len(index) else raw.offsets[:0],
                dead=dead,
                text=text,
                read=len(raw.values),
                watermark=self.max_ts - self.lateness,
                read_at=read_at,
            )
        ]

    def snapshot(self) -> dict:
        return {"offset": self.reader.position, "max_ts": self.max_ts}

    def close(self) -> None:
        HEALTH.source_closed(*self._key)
        self.reader.close()


class DecodingKafkaSource(FixedPartitionedSource[SourceBatch, dict]):
    """Reads a view's source topic, every partition, as decoded micro-batches.

    Delivery: each message exactly once into the dataflow's state when recovery is enabled
    (positions live in snapshots); from the topic's start on a fresh run.
    """

    def __init__(
        self,
        view: FeatureView,
        bootstrap: str,
        *,
        batch_size: int,
        poll_timeout: float,
        stop_at_end: bool,
        consumer_config: dict[str, Any],
    ) -> None:
        self.view = view
        self.bootstrap = bootstrap
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.stop_at_end = stop_at_end
        self.consumer_config = consumer_config

    def list_parts(self) -> list[str]:
        return [str(p) for p in range(partition_count(self.bootstrap, self.view.source.topic))]

    def build_part(self, step_id: str, for_part: str, resume_state: dict | None) -> _DecodingPartition:
        state = resume_state or {}
        reader = PartitionReader(
            self.bootstrap,
            self.view.source.topic,
            int(for_part),
            state.get("offset"),
            stop_at_end=self.stop_at_end,
            config=self.consumer_config,
        )
        return _DecodingPartition(
            self.view, reader, state.get("max_ts", _NO_TS), self.batch_size, self.poll_timeout
        )


class _DeadLetterPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, bootstrap: str, topic: str, view: str, version: str) -> None:
        self.producer = DeadLetterProducer(bootstrap)
        self.topic = topic
        self.view = view
        self.version = version

    def write_batch(self, items: list[DeadLetter]) -> None:
        for letter in items:
            self.producer.send(self.topic, letter, self.view, self.version)
        self.producer.flush()

    def close(self) -> None:
        self.producer.flush()


class DeadLetterSink(DynamicSink[DeadLetter]):
    """Dead letters to ``<topic>.dlq``. Delivery: at least once (flushed per batch)."""

    def __init__(self, bootstrap: str, topic: str, view: str, version: str = "") -> None:
        self.args = (bootstrap, topic, view, version)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        return _DeadLetterPartition(*self.args)


class _OfflinePartition(StatelessSinkPartition[pa.Table]):
    """Buffers rows; flushes by size, by age on arrival, and by age on a timer when the stream is
    quiet (Bytewax calls ``write_batch`` only when rows arrive)."""

    def __init__(self, store: DeltaOfflineStore, view: FeatureView, rows: int, seconds: float) -> None:
        uri = store.table_uri(view.name, view.version)
        app = f"{view.name}:{view.version}"
        self.writer: BackgroundWriter[pa.Table] = BackgroundWriter(
            _instrument("delta", view.name, lambda tables: store.append(uri, pa.concat_tables(tables), app)),
            depth=2,
            name="offline-writer",
        )
        self.flush_rows = rows
        self.flush_seconds = seconds
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.since = time.monotonic()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.timer = threading.Thread(target=self._tick, name="offline-flush", daemon=True)
        self.timer.start()

    def write_batch(self, items: list[pa.Table]) -> None:
        with self.lock:
            self.buffer.extend(items)
            self.buffered += sum(t.num_rows for t in items)
            due = self.buffered >= self.flush_rows or time.monotonic() - self.since >= self.flush_seconds
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            tables, self.buffer, self.buffered, self.since = self.buffer, [], 0, time.monotonic()
            if tables:
                self.writer.submit([pa.concat_tables(tables)])

    def _tick(self) -> None:
        while not self.closed.wait(max(0.05, self.flush_seconds / 2)):
            if self.buffer and time.monotonic() - self.since >= self.flush_seconds:
                try:
                    self.flush()
                except Exception:  # a writer error is raised to the dataflow on its next call
                    return

    def close(self) -> None:
        self.closed.set()
        self.timer.join()
        self.flush()
        self.writer.close()


class OfflineSink(DynamicSink[pa.Table]):
    """Accepted events to Delta, micro-batched by rows or seconds, committed off the dataflow thread.

    Delivery: effectively-once (commits carry per-partition offsets; replays are filtered).
    """

    def __init__(self, store: DeltaOfflineStore, view: FeatureView, rows: int, seconds: float) -> None:
        self.args = (store, view, rows, seconds)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OfflinePartition:
        return _OfflinePartition(*self.args)


@dataclass(frozen=True)
class TimedUpdate:
    """A tile update and the wall-clock time its source batch was read from Kafka."""

    update: TileUpdate
    read_at: float


class _OnlinePartition(StatelessSinkPartition[TimedUpdate | TileUpdate]):
    def __init__(self, url: str, prefix: str, view: FeatureView) -> None:
        self.store = RedisOnlineStore(url, prefix)
        namespace = self.store.namespace(view.name, view.version)
        ttl_ms = duration_ms(view.effective_ttl)
        row_bytes = TileLayout.of(view).row_bytes
        self._write = _instrument(
            "redis", view.name, lambda updates: self.store.write(namespace, updates, ttl_ms, row_bytes)
        )
        self._latency = BATCH_LATENCY.labels(view=view.name)
        self._freshness = FRESHNESS.labels(view=view.name)
        self.writer: BackgroundWriter[TimedUpdate | TileUpdate] = BackgroundWriter(
            self._write_timed, depth=4, name="online-writer"
        )

    def _write_timed(self, items: list[TimedUpdate | TileUpdate]) -> None:
        self._write([i.update if isinstance(i, TimedUpdate) else i for i in items])
        done = time.time()
        # One observation per source batch in this write (a batch spans several shards).
        newest: dict[float | None, float] = {}
        for item in items:
            read_at, update = (item.read_at, item.update) if isinstance(item, TimedUpdate) else (None, item)
            newest[read_at] = max(newest.get(read_at, update.max_ts), update.max_ts)
        for read_at, max_ts in newest.items():
            if read_at is not None:
                self._latency.observe(done - read_at)
            self._freshness.observe(done - max_ts / 1000)

    def write_batch(self, items: list[TimedUpdate | TileUpdate]) -> None:
        self.writer.submit(items)

    def close(self) -> None:
        self.writer.close()
        self.store.client.close()


class OnlineSink(DynamicSink[TimedUpdate | TileUpdate]):
    """Changed tiles to Redis, written off the dataflow thread in submission order.

    Delivery: effectively-once per entity (compare-and-set on the entity's event count).
    """

    def __init__(self, url: str, prefix: str, view: FeatureView) -> None:
        self.args = (url, prefix, view)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OnlinePartition:
        return _OnlinePartition(*self.args)
