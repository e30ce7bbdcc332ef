"""State of table views: the current rows of a CDC source and their aggregates per entity.

Two stages, because a row can move between entities:

1. :class:`RowGuard`, kept by each source partition for its keys (Debezium puts all changes of a
   primary key in one partition), keeps per key the *applied position* (the newest
   change's ``source.lsn``, else Kafka offset) and the entity the row belongs to now. A change at
   or below the applied position (a redelivery, or an older change arriving late) is ignored, so
   the newest position wins whatever the arrival order. An accepted change becomes *moves*:
   remove the key from its old entity, put its new image in its new entity. A delete keeps the
   key's position (a tombstone in memory), so an older insert replayed after it stays ignored.
2. :class:`EntityTables`, sharded by entity, keeps each entity's current rows (primary key ->
   the view's columns) and its position vector (per source partition, the highest offset of a
   change applied to it: the guard of the online store, as for tiles). Aggregates are computed
   from the entity's rows after each batch, so an update or delete retracts exactly, for min, max
   and distinct counts too, and sums are exactly rounded (``math.fsum``).

Memory: stage 1 holds one entry per primary key ever seen (deleted keys included); stage 2 holds
the view's columns of every current row, plus one entry per entity ever seen. A batch costs, per
entity it touches, time proportional to that entity's current rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import numpy as np

from engine.table_definitions import TableView

__all__ = ["EntityTables", "Move", "RowGuard", "TableUpdate", "features_of", "pack", "unpack"]


class Move(NamedTuple):
    """One key's row leaving (``values`` None) or entering/updating an entity. (A named tuple:
    one or two are made per change, and a frozen dataclass costs several times more to build.)"""

    entity: str
    pk: str
    values: tuple[Any, ...] | None
    partition: int
    offset: int
    ts: int


class RowGuard:
    """Per primary key: the applied position and current entity (see module docstring)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, str | None]] = {}

    def apply(
        self,
        changes: Iterable[tuple[str, str, int, str | None, tuple[Any, ...] | None, int, int, int]],
    ) -> list[Move]:
        """``changes``: (pk, op, position, entity, values, partition, offset, ts), in source order.

        ``entity`` is the after image's entity (None: no entity or a delete)."""
        out: list[Move] = []
        rows = self.rows
        for pk, op, position, entity, values, partition, offset, ts in changes:
            held = rows.get(pk)
            if held is not None and position <= held[0]:
                continue  # seen already, or older than what is applied
            old = None if held is None else held[1]
            new = None if op == "d" else entity
            rows[pk] = (position, new)
            if old is not None and old != new:
                out.append(Move(old, pk, None, partition, offset, ts))
            if new is not None:
                out.append(Move(new, pk, values, partition, offset, ts))
        return out


@dataclass(frozen=True)
class TableUpdate:
    """Online values of entities: ``blobs[i]`` for ``entities[i]``, guarded by ``positions[i]``
    (highest applied offset per source partition, -1 for none). ``force``: a resync of a store
    that lost its data, applied whatever its positions."""

    entities: list[str]
    positions: np.ndarray
    blobs: list[bytes]
    max_ts: float
    force: bool = False

    def __len__(self) -> int:
        return len(self.entities)


@dataclass
class _Entity:
    rows: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    pos: dict[int, int] = field(default_factory=dict)
    ts: int = -1


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()


def pack(ts: int, values: list[Any]) -> bytes:
    """An entity's online value: its newest change time (ms) and feature values, as msgpack."""
    return _ENCODER.encode([ts, values])


def unpack(blob: bytes) -> tuple[int | None, list[Any] | None]:
    if not blob:
        return None, None
    ts, values = _DECODER.decode(blob)
    return ts, values


def features_of(view: TableView, rows: Iterable[tuple[Any, ...]]) -> list[Any]:
    """The view's feature values over ``rows`` (tuples of ``view.columns``)."""
    rows = list(rows)
    index = {c: i for i, c in enumerate(view.columns)}
    present: dict[int, list[Any]] = {}  # a column's non-null values, shared by its features
    out = []
    for f in view.features:
        if f.column is None:
            out.append(len(rows))
            continue
        j = index[f.column]
        vals = present.get(j)
        if vals is None:
            vals = present[j] = [r[j] for r in rows if r[j] is not None]
        out.append(_feature(f.function, vals))
    return out


def _feature(fn: str, vals: list[Any]) -> Any:
    if fn == "count":
        return len(vals)
    if fn == "count_distinct":
        return len(set(vals))
    if fn == "latest":
        return vals[0] if vals else None
    if fn == "sum":
        return math.fsum(vals)
    if not vals:
        return None
    if fn == "mean":
        return math.fsum(vals) / len(vals)
    return float(min(vals) if fn == "min" else max(vals))


class EntityTables:
    """Current rows and position vector of every entity of one shard (see module docstring)."""

    def __init__(self, view: TableView) -> None:
        self.view = view
        self.entities: dict[str, _Entity] = {}
        self.online_epoch: str | None = None

    def apply(self, moves: Iterable[Move]) -> TableUpdate:
        touched: dict[str, _Entity] = {}
        entities = self.entities
        for entity, pk, values, partition, offset, ts in moves:
            ent = entities.get(entity)
            if ent is None:
                ent = entities[entity] = _Entity()
            if values is None:
                ent.rows.pop(pk, None)
            else:
                ent.rows[pk] = values
            if offset > ent.pos.get(partition, -1):
                ent.pos[partition] = offset
            if ts > ent.ts:
                ent.ts = ts
            touched[entity] = ent
        return self._update(touched)

    def resync(self) -> TableUpdate:
        """Every entity's values as a forced write: rebuilds a store that lost its data."""
        update = self._update(self.entities)
        return TableUpdate(update.entities, update.positions, update.blobs, update.max_ts, force=True)

    def values(self, entity: str) -> list[Any] | None:
        ent = self.entities.get(entity)
        return None if ent is None else features_of(self.view, ent.rows.values())

    def _update(self, touched: dict[str, _Entity]) -> TableUpdate:
        names = list(touched)
        width = 1 + max((p for e in touched.values() for p in e.pos), default=0)
        positions = np.full((len(names), width), -1, dtype=np.int64)
        blobs = []
        max_ts = -1
        for i, name in enumerate(names):
            ent = touched[name]
            for p, o in ent.pos.items():
                positions[i, p] = o
            blobs.append(pack(ent.ts, features_of(self.view, ent.rows.values())))
            max_ts = max(max_ts, ent.ts)
        return TableUpdate(names, positions, blobs, float(max_ts))
