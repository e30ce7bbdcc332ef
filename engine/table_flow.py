"""The dataflow of a table view: Debezium changes to current-row aggregates (Redis) and a change
log (Delta).

Per view::

    Kafka partitions ─► decode (columns) ─► RowGuard ─┬─► dead letters ─► <topic>.dlq
                                                      ├─► change log ─► Delta (micro-batched)
                                                      └─► moves, by entity shard ─► EntityTables ─► Redis

The row guard (per primary key: applied position and entity) lives in the source partition and
is snapshotted with its read position, so both always agree: Debezium keys change events by
primary key, so a key's changes are all in one partition. (A second keyed stateful step would
not do: Bytewax may snapshot it an epoch apart from the first, and a move between the two would
be lost on resume.) Positions, snapshots and the topic-identity checks are otherwise those of
the event source (:mod:`engine.flow_io`); the sinks are the event path's (:mod:`engine.sinks`).
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
from engine.cdc_columns import ColumnDecoder
from engine.cdc_decode import ARROW_TYPES
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
from engine.table_columns import Moves, RowGuard, column_of
from engine.table_definitions import TableView
from engine.table_state import EntityTables, TableUpdate, stored_columns

__all__ = ["ChangeBatch", "add_table_view", "change_log_schema"]

_ARROW = ARROW_TYPES


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
    """Decoded changes of one Kafka partition's micro-batch, in columns (``after[j]``/``before[j]``:
    the source's ``fields[j]``), and the moves its row guard made of them."""

    topic: str
    partition: int
    op: list[str]
    pk: list[str]
    entity: list[str | None]
    position: np.ndarray
    lsn: list[int | None]
    ts: np.ndarray
    after: list[pa.Array]
    before: list[pa.Array]
    offsets: np.ndarray
    dead: list[DeadLetter] = field(default_factory=list)
    read_at: float = 0.0
    moves: Moves | None = None

    def by_entity_shard(self, shards: int) -> list[tuple[str, Moves]]:
        """The batch's moves per entity shard."""
        if self.moves is None or not len(self.moves):
            return []
        return [(shard_key(s), m) for s, m in self.moves.split(_shards_of(self.moves.names, shards))]

    def rows(self, fields: tuple[Field, ...]) -> pa.Table:
        n = len(self.op)
        cols: list[pa.Array] = [
            pa.array(self.op, pa.string()),
            pa.array(self.pk, pa.string()),
            pa.array(self.entity, pa.string()),
            pa.array(self.position, pa.int64()),
            pa.array(self.lsn, pa.int64()),
            pa.array(self.ts, pa.int64()).view(pa.timestamp("ms", tz="UTC")),
            *self.after,
            *self.before,
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
        self.decoder = ColumnDecoder(view.source)
        self.batch_size = batch_size
        self.poll = poll
        names = [f.name for f in view.source.fields]
        dtypes = {f.name: f.dtype for f in view.source.fields}
        self.entity_at = [names.index(k) for k in view.entity.join_keys]
        self.entity_str = len(self.entity_at) == 1 and dtypes[view.entity.join_keys[0]] == "str"
        self.stored = [(names.index(c), dtypes[c]) for c in stored_columns(view)]
        self.partition = reader.partition
        labels = {"view": view.name, "topic": reader.topic, "partition": str(reader.partition)}
        self._in = EVENTS_IN.labels(**labels)
        self._ok = EVENTS_ACCEPTED.labels(view=view.name)
        self._key = (view.name, reader.topic, reader.partition)
        self._awake: datetime | None = None
        HEALTH.source_polled(*self._key)

    def next_batch(self) -> list[ChangeBatch]:
        if self.reader.at_end or STOP.is_set():
            raise StopIteration
        # Never wait inside the read (the client fetches in the background): a partition with
        # nothing yet is polled again after ``poll`` seconds, and never holds up the others.
        raw = self.reader.read(self.batch_size, 0.0)
        read_at = time.time()
        HEALTH.source_polled(*self._key)
        if raw is None:
            self._awake = datetime.now(UTC) + timedelta(seconds=self.poll)
            return []
        self._awake = None
        dec = self.decoder.decode_columns(raw.keys, raw.values, raw.offsets)
        dead = [
            DeadLetter(raw.topic, raw.partition, int(raw.offsets[i]), raw.keys[i], raw.values[i], why, msg)
            for i, why, msg in dec.failures
        ]
        entity = self._entities(dec.op, dec.after)
        offsets = raw.offsets[dec.index] if len(dec.index) else raw.offsets[:0]
        n = len(dec.op)
        moves = self.guard.apply(
            dec.pk,
            dec.position,
            entity,
            [column_of(dec.after[j], dtype) for j, dtype in self.stored],
            np.full(n, self.partition, np.int64),
            offsets,
            dec.ts,
        )
        self._in.inc(len(raw.values))
        self._ok.inc(n)
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
                offsets=offsets,
                dead=dead,
                read_at=read_at,
                moves=moves,
            )
        ]

    def next_awake(self) -> datetime | None:
        """After an empty read, poll again in ``poll`` seconds; else at once."""
        return self._awake

    def _entities(self, ops: list[str], after: list[pa.Array]) -> list[str | None]:
        """The entity of each change's after image (None: a delete, or a null entity column)."""
        if len(self.entity_at) == 1:
            entity: list[Any] = after[self.entity_at[0]].to_pylist()
            if not self.entity_str:  # entity_id of one part is str(part)
                entity = [None if e is None else str(e) for e in entity]
        else:
            parts = zip(*(after[j].to_pylist() for j in self.entity_at), strict=True)
            entity = [None if None in p else entity_id(list(p)) for p in parts]
        if "d" in ops:
            for i in np.flatnonzero(np.asarray(ops) == "d").tolist():
                entity[i] = None
        return entity

    def snapshot(self) -> dict:
        # Skipped when recovery is off, as Bytewax asks for snapshots anyway.
        guard = self.guard.copy() if snapshots_wanted() else None
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
        held = state.get("guard")
        # A dict: ``pk -> (position, entity)``, as snapshots held before the guard was in columns.
        guard = RowGuard.from_rows(held) if isinstance(held, dict) else held.copy() if held else RowGuard()
        return _ChangePartition(self.view, reader, self.batch_size, self.poll, current, guard)


def _shard(key: str, shards: int) -> int:
    return zlib.crc32(key.encode()) % shards


_SHARDS: dict[int, dict[str, int]] = {}  # shards -> entity -> its shard
_SHARDS_KEPT = 1 << 20  # entities remembered per shard count; beyond, the memory starts over


def _shards_of(entities: list[str], shards: int) -> np.ndarray:
    """The shard of each entity, remembered (an entity's changes come again and again): a dict
    lookup in a C loop for an entity seen before, a CRC-32 for a new one."""
    known = _SHARDS.setdefault(shards, {})
    got: list[Any] = list(map(known.get, entities))
    if None in got:
        if len(known) > _SHARDS_KEPT:
            known.clear()
        for i in [i for i, g in enumerate(got) if g is None]:
            got[i] = known[entities[i]] = _shard(entities[i], shards)
    return np.fromiter(got, np.int64, len(got))


class _EntityLogic(StatefulBatchLogic[Moves, TableUpdate, EntityTables]):
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

    def on_batch(self, values: list[Moves]) -> tuple[list[TableUpdate], bool]:
        out = self._resync()
        update = self.state.apply(values)
        if update.entities:
            out.append(update)
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[TableUpdate], bool]:
        return self._resync(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> Any:
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
    from engine.dataflow import dead_letters
    from engine.tile_logic import OnlineEpochWatch

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
