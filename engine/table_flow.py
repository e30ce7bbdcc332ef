"""The dataflow of a table view: Debezium changes to current-row aggregates (Redis) and a change
log (Delta).

Per view::

    Kafka partitions ─► decode Debezium ─► RowGuard ─┬─► dead letters ─► <topic>.dlq
                                                     ├─► change log ─► Delta (micro-batched)
                                                     └─► moves, shard by entity ─► EntityTables ─► Redis

The row guard (per primary key: applied position and entity) lives in the source partition and
is snapshotted with its read position, so both always agree: Debezium keys change events by
primary key, so a key's changes are all in one partition. (A second keyed stateful step would
not do: Bytewax may snapshot it an epoch apart from the first, and a move between the two would
be lost on resume.) Positions, snapshots and the topic-identity checks are otherwise those of
the event source (:mod:`engine.flow_io`); the sinks are the event path's (:mod:`engine.sinks`).
"""

from __future__ import annotations

import copy
import functools
import operator
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import bytewax.operators as op
import numpy as np
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import FixedPartitionedSink

from connectors.delta_store import DeltaOfflineStore
from connectors.kafka import PartitionReader, partition_count, topic_id, topic_reset_error
from connectors.redis_table_store import RedisTableStore
from engine.cdc_decode import CdcDecoder
from engine.decode import DeadLetter, entity_id
from engine.definitions import Field
from engine.flow_io import STOP
from engine.metrics import DEAD_LETTERS, EVENTS_ACCEPTED, EVENTS_IN
from engine.observe import HEALTH
from engine.sinks import (
    OfflineSink,
    _index,
    _instrument,
    _OnlinePartition,
    _SharedWriters,
    _store_writer,
    partition_key,
    shard_key,
)
from engine.snapshots import snapshots_wanted
from engine.table_definitions import TableView
from engine.table_state import EntityTables, Move, RowGuard, TableUpdate

__all__ = ["ChangeBatch", "add_table_view", "change_log_schema"]

_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}


def change_log_schema(fields: tuple[Field, ...]) -> pa.Schema:
    """The stored change log: one row per accepted change, with both row images."""
    return pa.schema(
        [
            ("op", pa.string()),
            ("pk", pa.string()),
            ("entity", pa.string()),
            ("position", pa.int64()),
            ("lsn", pa.int64()),
            ("event_ts", pa.timestamp("ms", tz="UTC")),
            *[(f.name, _ARROW[f.dtype]) for f in fields],
            *[(f"before_{f.name}", _ARROW[f.dtype]) for f in fields],
            ("_topic", pa.string()),
            ("_partition", pa.int32()),
            ("_offset", pa.int64()),
            ("date", pa.date32()),
        ]
    )


@dataclass
class ChangeBatch:
    """Decoded changes of one Kafka partition's micro-batch."""

    topic: str
    partition: int
    op: list[str]
    pk: list[str]
    entity: list[str | None]
    position: np.ndarray
    lsn: list[int | None]
    ts: np.ndarray
    after: list[tuple[Any, ...] | None]
    before: list[tuple[Any, ...] | None]
    offsets: np.ndarray
    dead: list[DeadLetter] = field(default_factory=list)
    read_at: float = 0.0
    moves: list[Move] = field(default_factory=list)

    def by_entity_shard(self, shards: int) -> list[tuple[str, list[Move]]]:
        """The batch's moves per entity shard, in source order."""
        out: dict[str, list[Move]] = {}
        for m in self.moves:
            out.setdefault(_entity_shard(m.entity, shards), []).append(m)
        return list(out.items())

    def rows(self, fields: tuple[Field, ...]) -> pa.Table:
        n = len(self.op)
        cols: list[pa.Array] = [
            pa.array(self.op, pa.string()),
            pa.array(self.pk, pa.string()),
            pa.array(self.entity, pa.string()),
            pa.array(self.position, pa.int64()),
            pa.array(self.lsn, pa.int64()),
            pa.array(self.ts, pa.int64()).view(pa.timestamp("ms", tz="UTC")),
        ]
        for images in (self.after, self.before):
            for j, f in enumerate(fields):
                cols.append(pa.array([None if r is None else r[j] for r in images], _ARROW[f.dtype]))
        cols += [
            pa.array([self.topic] * n, pa.string()),
            pa.array(np.full(n, self.partition, np.int32)),
            pa.array(self.offsets, pa.int64()),
            pa.array((self.ts // 86_400_000).astype(np.int32), pa.int32()).view(pa.date32()),
        ]
        return pa.Table.from_arrays(cols, schema=change_log_schema(fields))


class _ChangePartition(StatefulSourcePartition[ChangeBatch, dict]):
    def __init__(
        self,
        view: TableView,
        reader: PartitionReader,
        batch_size: int,
        poll: float,
        tid: str | None,
        guard: RowGuard,
    ) -> None:
        self.view = view
        self.guard = guard
        self.reader = reader
        self.topic_id = tid
        self.decoder = CdcDecoder(view.source)
        self.batch_size = batch_size
        self.poll = poll
        names = [f.name for f in view.source.fields]
        self.entity_at = [names.index(k) for k in view.entity.join_keys]
        self.column_at = [names.index(c) for c in view.columns]
        cols = self.column_at
        self.pick: Callable[[tuple[Any, ...]], tuple[Any, ...]] = (
            operator.itemgetter(*cols) if len(cols) > 1 else lambda a: (a[cols[0]],)
        )
        self.partition = reader.partition
        labels = {"view": view.name, "topic": reader.topic, "partition": str(reader.partition)}
        self._in = EVENTS_IN.labels(**labels)
        self._ok = EVENTS_ACCEPTED.labels(view=view.name)
        self._key = (view.name, reader.topic, reader.partition)
        HEALTH.source_polled(*self._key)

    def next_batch(self) -> list[ChangeBatch]:
        if self.reader.at_end or STOP.is_set():
            raise StopIteration
        raw = self.reader.read(self.batch_size, self.poll)
        read_at = time.time()
        HEALTH.source_polled(*self._key)
        if raw is None:
            return []
        dec = self.decoder.decode(raw.keys, raw.values, raw.offsets)
        dead = [
            DeadLetter(raw.topic, raw.partition, int(raw.offsets[i]), raw.keys[i], raw.values[i], why, msg)
            for i, why, msg in dec.failures
        ]
        # This runs for every change: comprehensions and zip, no generator frame per change.
        if len(self.entity_at) == 1:  # entity_id of one part is str(part)
            k = self.entity_at[0]
            entity: list[str | None] = [
                None if o == "d" or a is None or a[k] is None else str(a[k])
                for o, a in zip(dec.op, dec.after, strict=True)
            ]
        else:
            entity = []
            for o, a in zip(dec.op, dec.after, strict=True):
                parts = None if o == "d" or a is None else [a[j] for j in self.entity_at]
                entity.append(None if parts is None or any(p is None for p in parts) else entity_id(parts))
        pick = self.pick
        values = [None if a is None else pick(a) for a in dec.after]
        offsets = raw.offsets[dec.index].tolist() if len(dec.index) else []
        n = len(dec.op)
        moves = self.guard.apply(
            zip(dec.pk, dec.op, dec.position.tolist(), entity, values, repeat(self.partition, n), offsets,
                dec.ts.tolist(), strict=True)
        )  # fmt: skip
        self._in.inc(len(raw.values))
        self._ok.inc(len(dec.op))
        for letter in dead:
            DEAD_LETTERS.labels(view=self.view.name, reason=letter.reason).inc()
        return [
            ChangeBatch(
                topic=raw.topic,
                partition=raw.partition,
                op=dec.op,
                pk=dec.pk,
                entity=entity,
                position=dec.position,
                lsn=dec.lsn,
                ts=dec.ts,
                after=dec.after,
                before=dec.before,
                offsets=raw.offsets[dec.index] if len(dec.index) else raw.offsets[:0],
                dead=dead,
                read_at=read_at,
                moves=moves,
            )
        ]

    def snapshot(self) -> dict:
        # The guard's values are immutable tuples: a shallow copy is a snapshot (skipped when
        # recovery is off, as Bytewax asks for snapshots anyway).
        guard = dict(self.guard.rows) if snapshots_wanted() else None
        return {"offset": self.reader.position, "topic_id": self.topic_id, "guard": guard}

    def close(self) -> None:
        HEALTH.source_closed(*self._key)
        self.reader.close()


class CdcKafkaSource(FixedPartitionedSource[ChangeBatch, dict]):
    """Reads a CDC topic, every partition, as decoded change batches.

    Delivery: as :class:`engine.flow_io.DecodingKafkaSource` (exactly once into state with
    recovery, from the topic's start otherwise; a recreated topic stops the worker).
    """

    def __init__(self, view: TableView, bootstrap: str, runtime: Any) -> None:
        self.view = view
        self.bootstrap = bootstrap
        self.batch_size = runtime.batch_size
        self.poll = runtime.poll_timeout_seconds
        self.stop_at_end = runtime.stop_at_end
        self.kafka_config = dict(runtime.kafka_config or {})
        self.consumer_config = {**self.kafka_config, **runtime.consumer_config}
        self._tid: tuple[str | None] | None = None

    def list_parts(self) -> list[str]:
        n = partition_count(self.bootstrap, self.view.source.topic, config=self.kafka_config)
        return [str(p) for p in range(n)]

    def build_part(self, step_id: str, for_part: str, resume_state: dict | None) -> _ChangePartition:
        state = resume_state or {}
        topic, partition = self.view.source.topic, int(for_part)
        if self._tid is None:
            self._tid = (topic_id(self.bootstrap, topic, self.kafka_config),)
        current, stored = self._tid[0], state.get("topic_id")
        if stored and current and stored != current:
            raise topic_reset_error(
                topic,
                partition,
                f"the recovery snapshot of view {self.view.name} ({self.view.version}) holds read "
                f"position {state.get('offset')} of the topic with id {stored}",
                f"a topic with id {current}",
            )
        reader = PartitionReader(
            self.bootstrap, topic, partition, state.get("offset"), stop_at_end=self.stop_at_end,
            config=self.consumer_config,
        )  # fmt: skip
        guard = RowGuard()
        guard.rows = dict(state.get("guard") or {})
        return _ChangePartition(self.view, reader, self.batch_size, self.poll, current, guard)


def _shard(key: str, shards: int) -> int:
    return zlib.crc32(key.encode()) % shards


@functools.lru_cache(maxsize=1 << 16)
def _entity_shard(entity: str, shards: int) -> str:
    """The shard key of an entity (cached: an entity's changes come again and again)."""
    return shard_key(_shard(entity, shards))


class _EntityLogic(StatefulBatchLogic[list[Move], TableUpdate, EntityTables]):
    """One entity shard's rows; emits the values of the entities each batch changed, and every
    entity's values when the online store lost its data."""

    def __init__(self, state: EntityTables, watch: Any) -> None:
        self.state = state
        self.watch = watch

    def _resync(self) -> list[TableUpdate]:
        if not self.watch.lost_data(self.state):
            return []
        update = self.state.resync()
        return [update] if update.entities else []

    def on_batch(self, values: list[list[Move]]) -> tuple[list[TableUpdate], bool]:
        out = self._resync()
        update = self.state.apply(m for moves in values for m in moves)
        if update.entities:
            out.append(update)
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[TableUpdate], bool]:
        return self._resync(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> Any:
        from datetime import UTC, datetime, timedelta

        wait = max(0.0, self.watch.next_check - time.monotonic())
        return datetime.now(UTC) + timedelta(seconds=wait)

    def snapshot(self) -> EntityTables | None:
        return copy.deepcopy(self.state) if snapshots_wanted() else None


class OnlineTableSink(FixedPartitionedSink[TableUpdate, None]):
    """Table-view values to Redis, keyed by entity shard, written in order per shard.

    Delivery: effectively-once per entity (see :mod:`connectors.redis_table_store`).
    """

    def __init__(self, url: str, prefix: str, view: TableView, shards: int) -> None:
        self.url, self.prefix, self.view, self.shards = url, prefix, view, shards

    def list_parts(self) -> list[str]:
        return [shard_key(i) for i in range(self.shards)]

    def part_fn(self, item_key: str) -> int:
        return _index(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _OnlinePartition:
        key = ("redis-table", self.url, self.prefix, self.view.name, self.view.version)
        view = self.view

        def make() -> Any:
            store = RedisTableStore(self.url, self.prefix)
            ns = store.namespace(view.name, view.version)
            ttl = int(view.effective_ttl.total_seconds() * 1000)
            write = _instrument("redis", view, lambda items: store.write_values(ns, items, ttl))  # type: ignore[arg-type]
            return _store_writer("redis", view, write, depth=4)  # type: ignore[arg-type]

        writer = _SharedWriters.acquire(key, make)
        return _OnlinePartition(writer, lambda: _SharedWriters.release(key))


def add_table_view(flow: Dataflow, view: TableView, runtime: Any, offline: DeltaOfflineStore) -> None:
    """Add one table view's steps to ``flow`` (see module docstring)."""
    from engine.dataflow import OnlineEpochWatch, dead_letters

    v = f"{view.name}_{view.version}"
    batches = op.input(f"{v}_source", flow, CdcKafkaSource(view, runtime.kafka_bootstrap_servers, runtime))
    dead_letters(batches, v, view, runtime)
    fields = view.source.fields
    rows = op.filter_map(
        f"{v}_rows", batches, lambda b: (partition_key(b.partition), b.rows(fields)) if b.op else None
    )
    op.output(
        f"{v}_offline",
        rows,
        OfflineSink(
            offline,
            view,  # type: ignore[arg-type]
            runtime.kafka_bootstrap_servers,
            runtime.offline_flush_rows,
            runtime.offline_flush_seconds,
            runtime.kafka_config,
        ),
    )
    shards = runtime.shards
    by_entity = op.flat_map(f"{v}_entity_shard", batches, lambda b: b.by_entity_shard(shards))
    namespace = RedisTableStore.namespace_of(runtime.redis_prefix, view.name, view.version)

    def builder(resume: EntityTables | None) -> _EntityLogic:
        state = resume if resume is not None else EntityTables(view)
        return _EntityLogic(state, OnlineEpochWatch(runtime.redis_url, namespace))

    updates = op.stateful_batch(f"{v}_entities", by_entity, builder)
    op.output(f"{v}_online", updates, OnlineTableSink(runtime.redis_url, runtime.redis_prefix, view, shards))
