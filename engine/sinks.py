"""Bytewax sinks: accepted rows to Delta, changed tiles to Redis (dead letters: engine.dead_letter_sink).

Store writes run on one background thread per process and view, so the dataflow computes while a
store is busy. The store sinks are fixed-partitioned (online by shard, offline by source
partition) so that Bytewax calls their ``snapshot`` at the end of every epoch: a snapshot drains
the writer (and flushes buffered rows first), so with recovery enabled an epoch's snapshot is
committed only once everything it produced is stored. Replays after a restart are harmless
either way: Redis writes are guarded by each entity's per-partition positions and Delta commits skip
offsets they already hold.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from bytewax.outputs import (
    FixedPartitionedSink,
    StatefulSinkPartition,
)

from connectors.delta_store import DeltaOfflineStore
from connectors.delta_tiles import append_tiles, tile_table, tiles_uri
from connectors.kafka import partition_count, partition_end, topic_id, topic_reset_error
from connectors.redis_store import RedisOnlineStore
from engine.definitions import FeatureView, duration_ms
from engine.flow_io import STOP
from engine.metrics import BATCH_LATENCY, FRESHNESS, STORE_WRITE_ERRORS, STORE_WRITE_SECONDS
from engine.observe import HEALTH
from engine.snapshots import snapshots_wanted
from engine.state import TileUpdate
from engine.tiles import TileLayout
from engine.writer import BackgroundWriter

__all__ = ["OfflineSink", "OnlineSink", "TimedUpdate", "partition_key", "shard_key"]


def shard_key(shard: int) -> str:
    """Key of an entity shard; zero-padded so sorted keys follow shard numbers."""
    return f"s{shard:04d}"


def partition_key(partition: int) -> str:
    """Key of a source partition's rows."""
    return f"p{partition:05d}"


def _index(item_key: str) -> int:
    return int(item_key[1:])


def _instrument(
    store: str, view: FeatureView, write: Callable[[list[Any]], object]
) -> Callable[[list[Any]], None]:
    """``write``, timed. Each failure is counted and makes ``/healthz`` name the store
    (``store:view:version``) until a write succeeds again; then it is re-raised (the writer
    retries it or stops, see :mod:`engine.writer`)."""
    seconds = STORE_WRITE_SECONDS.labels(store=store, view=view.name)
    errors = STORE_WRITE_ERRORS.labels(store=store, view=view.name)
    sink = f"{store}:{view.name}:{view.version}"

    def timed(items: list[Any]) -> None:
        start = time.perf_counter()
        try:
            write(items)
        except Exception as exc:
            errors.inc()
            HEALTH.writer_failed(sink, exc)
            raise
        seconds.observe(time.perf_counter() - start)
        HEALTH.writer_ok(sink)

    return timed


def _store_writer(
    store: str, view: FeatureView, write: Callable[[list[Any]], None], depth: int
) -> BackgroundWriter[Any]:
    """The background writer of one store and view version: retries while the store is down
    (the dataflow waits), gives up only a grace period after a stop request (``STOP``)."""
    name = f"{store} store of view {view.name} (version {view.version})"
    return BackgroundWriter(write, depth=depth, name=name, stop=STOP)


class _SharedWriters:
    """One background writer per (store, view version) per process, shared by its partitions."""

    _lock = threading.Lock()
    _writers: dict[tuple[str, ...], list[Any]] = {}

    @classmethod
    def acquire(
        cls, key: tuple[str, ...], make: Callable[[], BackgroundWriter[Any]]
    ) -> BackgroundWriter[Any]:
        with cls._lock:
            entry = cls._writers.get(key)
            if entry is None:
                entry = cls._writers[key] = [make(), 0]
            entry[1] += 1
            return entry[0]

    @classmethod
    def release(cls, key: tuple[str, ...]) -> None:
        with cls._lock:
            entry = cls._writers[key]
            entry[1] -= 1
            if entry[1]:
                return
            del cls._writers[key]
        entry[0].close()


class _OfflinePartition(StatefulSinkPartition[pa.Table, None]):
    """Buffers one source partition's rows; flushes by size, by age on arrival, by age on a timer
    when the stream is quiet (Bytewax writes only when rows arrive), and at every snapshot."""

    def __init__(
        self,
        writer: BackgroundWriter[Any],
        release: Callable[[], None],
        rows: int,
        seconds: float,
        size: Callable[[Any], int] = lambda table: table.num_rows,
        join: Callable[[list[Any]], Any] = pa.concat_tables,
    ):
        self.writer = writer
        self.release = release
        self.size = size  # rows in one buffered item
        self.join = join  # buffered items -> the one item the writer gets
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
            self.buffered += sum(self.size(t) for t in items)
            due = self.buffered >= self.flush_rows or time.monotonic() - self.since >= self.flush_seconds
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            tables, self.buffer, self.buffered, self.since = self.buffer, [], 0, time.monotonic()
            if tables:
                self.writer.submit([self.join(tables)])

    def snapshot(self) -> None:
        if snapshots_wanted():
            self.flush()
            self.writer.drain()
        else:  # nothing depends on the epoch: no stall on a Delta commit, but a failure still stops
            self.writer.check()

    def _tick(self) -> None:
        while not self.closed.wait(max(0.05, self.flush_seconds / 2)):
            if self.buffer and time.monotonic() - self.since >= self.flush_seconds:
                try:
                    self.flush()
                except Exception:  # a writer error is raised to the dataflow on its next call
                    return

    def close(self) -> None:
        self.closed.set()
        self.writer.closing()  # a failing store now gets the stop grace, so the timer's flush ends
        self.timer.join()
        with self.lock:
            tables, self.buffer, self.buffered = self.buffer, [], 0
        self.writer.finish([self.join(tables)] if tables else None)
        self.release()


class OfflineSink(FixedPartitionedSink[pa.Table, None]):
    """Accepted events to Delta, keyed by source partition, micro-batched by rows or seconds.

    Delivery: effectively-once (commits carry per-partition offsets and the topic's id; replays
    are filtered). A partition whose stored offsets belong to another topic id, or reach past
    the partition's end, raises :class:`~connectors.kafka.TopicChangedError` when the sink
    starts: the topic was recreated, and its events must not be dropped as replays.
    """

    def __init__(
        self,
        store: DeltaOfflineStore,
        view: FeatureView,
        bootstrap: str,
        rows: int,
        seconds: float,
        kafka_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.view = view
        self.bootstrap = bootstrap
        self.rows = rows
        self.seconds = seconds
        self.kafka_config = dict(kafka_config or {})
        self._topic_id: tuple[str | None] | None = None

    def list_parts(self) -> list[str]:
        topic = self.view.source.topic
        return [
            partition_key(p) for p in range(partition_count(self.bootstrap, topic, config=self.kafka_config))
        ]

    def part_fn(self, item_key: str) -> int:
        return _index(item_key)

    def _check(self, uri: str, app: str, partition: int, tid: str | None) -> None:
        """Refuse a table whose offsets of ``partition`` are not of the topic as it is now."""
        topic = self.view.source.topic
        stored = self.store.stored_position(uri, app, topic, partition, tid)
        if stored.offset is None:
            return
        holds = f"Delta table {uri} holds its events up to offset {stored.offset}"
        if stored.same_topic is False:
            raise topic_reset_error(
                topic, partition, f"{holds}, recorded for another topic id", f"a topic with id {tid}"
            )
        low, end = partition_end(self.bootstrap, topic, partition, stored.offset + 1, self.kafka_config)
        if stored.offset >= end:
            raise topic_reset_error(topic, partition, holds, f"offsets {low} to {end} (its end is below)")

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _OfflinePartition:
        view, store = self.view, self.store
        uri = store.table_uri(view.name, view.version)
        app = f"{view.name}:{view.version}"
        if self._topic_id is None:
            self._topic_id = (topic_id(self.bootstrap, view.source.topic, self.kafka_config),)
        tid = self._topic_id[0]
        self._check(uri, app, _index(for_part), tid)
        ids = {view.source.topic: tid}
        key = ("delta", uri)

        def make() -> BackgroundWriter[pa.Table]:
            write = _instrument(
                "delta", view, lambda tables: store.append(uri, pa.concat_tables(tables), app, ids)
            )
            return _store_writer("delta", view, write, depth=2)

        writer = _SharedWriters.acquire(key, make)
        return _OfflinePartition(writer, lambda: _SharedWriters.release(key), self.rows, self.seconds)


@dataclass
class TimedUpdate:
    """A tile update, when its source batch was read from Kafka (wall clock) and the oldest Kafka
    message timestamp in that batch (NaN if the broker gave none)."""

    update: TileUpdate
    read_at: float
    produced_at: float = float("nan")


class _OnlineWrite:
    """Writes tile updates to Redis and records batch latency and freshness."""

    def __init__(self, url: str, prefix: str, view: FeatureView) -> None:
        self.store = RedisOnlineStore(url, prefix)
        namespace = self.store.namespace(view.name, view.version)
        ttl_ms = duration_ms(view.effective_ttl)
        row_bytes = TileLayout.of(view).row_bytes
        self._write = _instrument(
            "redis", view, lambda updates: self.store.write(namespace, updates, ttl_ms, row_bytes)
        )
        self._latency = BATCH_LATENCY.labels(view=view.name)
        self._freshness = FRESHNESS.labels(view=view.name)

    def __call__(self, items: list[TimedUpdate | TileUpdate]) -> None:
        self._write([i.update if isinstance(i, TimedUpdate) else i for i in items])
        done = time.time()
        # One observation per source batch in this write (a batch spans several shards).
        # Freshness runs from the oldest message's Kafka timestamp (when it was produced) to
        # the store's acknowledgement; without a timestamp, from the newest event time.
        batches: dict[float, float] = {}
        for item in items:
            if isinstance(item, TimedUpdate):
                since = item.produced_at
                if math.isnan(since):
                    since = item.update.max_ts / 1000
                batches[item.read_at] = min(batches.get(item.read_at, since), since)
            else:
                self._freshness.observe(done - item.max_ts / 1000)
        for read_at, since in batches.items():
            self._latency.observe(done - read_at)
            self._freshness.observe(done - since)


class _OnlinePartition(StatefulSinkPartition[TimedUpdate | TileUpdate, None]):
    def __init__(
        self,
        writer: BackgroundWriter[Any],
        release: Callable[[], None],
        tiles: _OfflinePartition | None = None,
    ) -> None:
        self.writer = writer
        self.release = release
        self.tiles = tiles  # the Delta tile table's buffer, when the stream writes one

    def write_batch(self, items: list[TimedUpdate | TileUpdate]) -> None:
        self.writer.submit(items)
        if self.tiles is not None:  # turned into Arrow rows on the tile writer's thread
            self.tiles.write_batch([i.update if isinstance(i, TimedUpdate) else i for i in items])

    def snapshot(self) -> None:
        if self.tiles is not None:
            self.tiles.snapshot()
        if snapshots_wanted():
            self.writer.drain()
        else:
            self.writer.check()

    def close(self) -> None:
        try:
            if self.tiles is not None:
                self.tiles.close()
        finally:
            self.writer.finish()
            self.release()


def tile_rows(layout: TileLayout, updates: list[TileUpdate]) -> pa.Table:
    """The rows of tile updates as tile-table rows (each the full partial of its tile)."""
    if not updates:
        return tile_table(layout, pa.array([], pa.string()), layout.empty(0))
    names = pa.array([e for u in updates for e in u.entities], pa.string())
    counts = np.concatenate([np.diff(np.append(u.starts[: len(u)], len(u.rows))) for u in updates])
    rows = np.concatenate([u.rows for u in updates])
    return tile_table(layout, names.take(np.repeat(np.arange(len(names)), counts)), rows)


class OnlineSink(FixedPartitionedSink[TimedUpdate | TileUpdate, None]):
    """Changed tiles to Redis, keyed by entity shard, written in order per shard; with ``tiles``,
    also to the view version's Delta tile table (see :mod:`connectors.delta_tiles`).

    Delivery: effectively-once per entity, whatever the entity's events' partitions: a write is
    skipped only when every per-partition position in it is at or below the stored guard's, and a
    store that lost its data is rewritten from state (see :mod:`connectors.redis_store`).
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        view: FeatureView,
        shards: int,
        tiles: DeltaOfflineStore | None = None,
        tile_flush: tuple[int, float] = (500_000, 5.0),
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.view = view
        self.shards = shards
        self.tiles = tiles
        self.tile_flush = tile_flush

    def list_parts(self) -> list[str]:
        return [shard_key(i) for i in range(self.shards)]

    def part_fn(self, item_key: str) -> int:
        return _index(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _OnlinePartition:
        key = ("redis", self.url, self.prefix, self.view.name, self.view.version)

        def make() -> BackgroundWriter[Any]:
            write = _OnlineWrite(self.url, self.prefix, self.view)
            # Every shard submits its part of a source batch: room for two batches of every shard,
            # so the dataflow does not wait on one Redis round trip per few shards.
            return _store_writer("redis", self.view, write, depth=max(4, 2 * self.shards))

        writer = _SharedWriters.acquire(key, make)
        buffer = None if self.tiles is None else self._tile_buffer()
        return _OnlinePartition(writer, lambda: _SharedWriters.release(key), buffer)

    def _tile_buffer(self) -> _OfflinePartition:
        """Tile rows to the view version's Delta tile table: buffered like the event table's rows,
        written by one background writer per process and table."""
        store, view = self.tiles, self.view
        assert store is not None
        uri = tiles_uri(store, view.name, view.version)
        key = ("delta-tiles", uri)

        layout = TileLayout.of(view)

        def append(batches: list[list[TileUpdate]]) -> None:
            append_tiles(store, uri, tile_rows(layout, [u for batch in batches for u in batch]))

        def make() -> BackgroundWriter[list[TileUpdate]]:
            write = _instrument("delta-tiles", view, append)
            return _store_writer("delta-tiles", view, write, depth=2)

        writer = _SharedWriters.acquire(key, make)
        rows, seconds = self.tile_flush
        return _OfflinePartition(
            writer, lambda: _SharedWriters.release(key), rows, seconds, size=lambda u: len(u.rows), join=list
        )
