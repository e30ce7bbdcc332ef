"""State of table views: the current rows of a CDC source and their aggregates per entity.

Two stages, because a row can move between entities:

1. :class:`~engine.table_columns.RowGuard`, kept by each source partition for its keys (Debezium
   puts all changes of a primary key in one partition), keeps per key the applied position and
   the entity the row belongs to now, and turns each batch into :class:`~engine.table_columns.Moves`
   (newest position wins, whatever the arrival order).
2. :class:`EntityTables`, sharded by entity, keeps the current rows in columns (arrays indexed by
   a row slot, ``pk -> slot`` the only per-row Python object; strings as codes of a per-column
   vocabulary) and per entity its newest change time and position vector (per source partition,
   the highest offset of a change applied to it: the guard of the online store, as for tiles).
   After each batch the aggregates of the entities it touched are recomputed from their rows, in
   numpy over all of them at once, so an update or delete retracts exactly, for min, max and
   distinct counts too, and sums are exactly rounded (``math.fsum`` per entity).

Memory: stage 1 holds one entry per primary key ever seen (deleted keys included, about 100
bytes each); stage 2 holds the aggregated columns of every current row (8 bytes a column plus a
validity byte, plus the ``pk -> slot`` entry), one entry per entity ever seen (its time and
position vector) and each distinct string of a string column ever seen. A batch costs, per row
of the shard, a few array operations (finding the touched entities' rows), and per entity it
touches, time proportional to that entity's current rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from engine.cdc_decode import ARROW_TYPES
from engine.table_columns import Column, Moves, RowGuard, codes_of, column_of, take
from engine.table_definitions import TableView

__all__ = ["EntityTables", "Moves", "RowGuard", "TableUpdate", "pack", "stored_columns", "unpack"]


def stored_columns(view: TableView) -> tuple[str, ...]:
    """The columns the view's features aggregate, each once (what the row store keeps)."""
    return tuple(dict.fromkeys(f.column for f in view.features if f.column is not None))


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


def _grow(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
    """``a`` with room for ``n`` items along its first axis (doubling), new room set to ``fill``."""
    if n <= len(a):
        return a
    more = np.full((max(n, 2 * len(a)) - len(a), *a.shape[1:]), fill, dtype=a.dtype)
    return np.concatenate((a, more))


class _Entity:
    """An entity as recovery snapshots held it before rows were kept in columns (``rows``: pk ->
    values of ``view.columns``, ``pos``: partition -> offset, ``ts``); read by
    :meth:`EntityTables.__setstate__` only."""

    rows: dict[str, tuple[Any, ...]]
    pos: dict[int, int]
    ts: int


class EntityTables:
    """Current rows and per-entity positions of one shard (see module docstring)."""

    def __init__(self, view: TableView) -> None:
        self.view = view
        self.online_epoch: str | None = None
        self.columns = stored_columns(view)
        self.dtypes = tuple(view.source.field(c).dtype for c in self.columns)  # type: ignore[union-attr]
        # entities
        self.entity_of: dict[str, int] = {}
        self.names: list[str] = []
        self.ts = np.zeros(0, np.int64)
        self.pos = np.zeros((0, 1), np.int64)
        # rows
        self.row_of: dict[str, int] = {}
        self.row_ent = np.zeros(0, np.int64)  # -1: a free slot
        self.free: list[int] = []
        self.top = 0  # slots ever used
        self.values = [np.zeros(0, np.int64 if t in ("int", "str") else np.float64) for t in self.dtypes]
        self.valid = [np.zeros(0, bool) for _ in self.dtypes]
        self.vocab: list[dict[str | None, int]] = [{None: -1} for _ in self.dtypes]  # str value -> code
        self.words: list[list[str]] = [[] for _ in self.dtypes]

    @property
    def entities(self) -> list[str]:
        """Every entity seen: what the online epoch watch asks of a state."""
        return self.names

    def apply(self, batches: Iterable[Moves]) -> TableUpdate:
        """Apply guard batches in order; the values of every entity they touched."""
        touched: list[np.ndarray] = []
        for m in batches:
            touched.extend(self._apply(m))
        if not touched:
            return self._update(np.zeros(0, np.int64))
        return self._update(np.unique(np.concatenate(touched)))

    def resync(self) -> TableUpdate:
        """Every entity's values as a forced write: rebuilds a store that lost its data."""
        update = self._update(np.arange(len(self.names), dtype=np.int64))
        return TableUpdate(update.entities, update.positions, update.blobs, update.max_ts, force=True)

    def entity_values(self, entity: str) -> list[Any] | None:
        """The feature values of one entity (None: never seen)."""
        code = self.entity_of.get(entity)
        return None if code is None else [col[0] for col in self._features(np.array([code]))]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restores a snapshot; one taken before rows were kept in columns is converted."""
        old = state.get("entities")
        if not isinstance(old, dict):
            self.__dict__.update(state)
            return
        self.__init__(state["view"])  # type: ignore[misc]
        self.online_epoch = state.get("online_epoch")
        names = list(old)
        codes = codes_of(names, self.entity_of, self.names)
        self.ts = _grow(self.ts, len(self.names), -1)
        self.pos = _grow(self.pos, len(self.names), -1)
        width = 1 + max((p for e in old.values() for p in e.pos), default=0)
        if width > self.pos.shape[1]:
            self.pos = np.concatenate((self.pos, np.full((len(self.pos), width - 1), -1, np.int64)), axis=1)
        pks: list[str] = []
        ent: list[int] = []
        rows: list[tuple[Any, ...]] = []
        for code, name in zip(codes.tolist(), names, strict=True):
            e = old[name]
            self.ts[code] = e.ts
            for p, o in e.pos.items():
                self.pos[code, p] = o
            pks += e.rows
            rows += e.rows.values()
            ent += [code] * len(e.rows)
        at = [self.view.columns.index(c) for c in self.columns]
        cols = [
            column_of(pa.array([r[i] for r in rows], ARROW_TYPES[t]), t)
            for i, t in zip(at, self.dtypes, strict=True)
        ]
        if pks:
            self._add(pks, np.asarray(ent, np.int64), cols)

    # -- applying moves -------------------------------------------------------------------------

    def _apply(self, m: Moves) -> list[np.ndarray]:
        codes = codes_of(m.names, self.entity_of, self.names)
        n_ent = len(self.names)
        self.ts = _grow(self.ts, n_ent, -1)
        self.pos = _grow(self.pos, n_ent, -1)
        out = []
        if m.rm_pk:
            slots = np.fromiter(map(self.row_of.pop, m.rm_pk, repeat(-1)), np.int64, len(m.rm_pk))
            slots = slots[slots >= 0]
            out.append(self.row_ent[slots])
            self.row_ent[slots] = -1
            self.free.extend(slots.tolist())
        if m.add_pk:
            out.append(self._add(m.add_pk, codes[m.add_ent], m.add_cols))
        if len(m.st_ent):
            ent = codes[m.st_ent]
            width = int(m.st_part.max()) + 1
            if width > self.pos.shape[1]:
                more = np.full((len(self.pos), width - self.pos.shape[1]), -1, np.int64)
                self.pos = np.concatenate((self.pos, more), axis=1)
            np.maximum.at(self.pos, (ent, m.st_part), m.st_off)
            np.maximum.at(self.ts, ent, m.st_ts)
            out.append(ent)
        return out

    def _add(self, pks: list[str], ent: np.ndarray, cols: Sequence[Column]) -> np.ndarray:
        slots = np.fromiter(map(self.row_of.get, pks, repeat(-1)), np.int64, len(pks))
        held = slots >= 0
        before = self.row_ent[slots[held]]  # rows replaced in place (their entity is touched)
        new = np.flatnonzero(~held)
        if len(new):
            reuse = min(len(new), len(self.free))
            fresh = np.asarray(self.free[len(self.free) - reuse :], np.int64)
            del self.free[len(self.free) - reuse :]
            more = len(new) - reuse
            fresh = np.concatenate((fresh, np.arange(self.top, self.top + more, dtype=np.int64)))
            self.top += more
            slots[new] = fresh
            self.row_of.update(zip(take(pks, new), fresh.tolist(), strict=True))
            size = int(slots.max()) + 1
            self.row_ent = _grow(self.row_ent, size, -1)
            for j in range(len(self.values)):
                self.values[j] = _grow(self.values[j], size, 0)
                self.valid[j] = _grow(self.valid[j], size, False)
        self.row_ent[slots] = ent
        for j, (v, ok) in enumerate(cols):
            if self.dtypes[j] == "str":
                v = codes_of(v.tolist(), self.vocab[j], self.words[j])
            self.values[j][slots] = v
            self.valid[j][slots] = ok
        return np.concatenate((before, ent))

    # -- values ---------------------------------------------------------------------------------

    def _update(self, touched: np.ndarray) -> TableUpdate:
        if not len(touched):
            return TableUpdate([], np.zeros((0, self.pos.shape[1]), np.int64), [], -1.0)
        ts = self.ts[touched]
        # (ts, values) tuples encode as msgpack arrays, as pack's lists do; map: a C loop.
        values = zip(*self._features(touched), strict=True)
        blobs = list(map(_ENCODER.encode, zip(ts.tolist(), values, strict=True)))
        names = self.names
        return TableUpdate(take(names, touched), self.pos[touched], blobs, float(ts.max()))

    def _features(self, touched: np.ndarray) -> list[list[Any]]:
        """Per feature, its value for each of ``touched`` (entity codes), from their current rows."""
        k = len(touched)
        group = np.full(len(self.names) + 1, -1, np.int64)  # entity code -> index in touched
        group[touched] = np.arange(k)
        n_rows = len(self.row_ent)
        g_all = group[self.row_ent[:n_rows]]  # a free slot (-1) reads the padding
        sel = np.flatnonzero(g_all >= 0)
        g = g_all[sel]
        order = np.argsort(g, kind="stable")
        sel, g = sel[order], g[order]
        rows = np.bincount(g, minlength=k)
        per_column: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        sums: dict[int, list[float]] = {}
        out = []
        for f in self.view.features:
            if f.column is None:
                out.append(rows.tolist())
                continue
            j = self.columns.index(f.column)
            if j not in per_column:
                ok = self.valid[j][sel]
                gv = g[ok]
                per_column[j] = (self.values[j][sel[ok]], gv, np.bincount(gv, minlength=k))
            vals, gv, counts = per_column[j]
            if f.function in ("sum", "mean"):  # one exact sum per column serves both
                if j not in sums:
                    sums[j] = self._sums(vals.astype(np.float64, copy=False), counts)
                total = sums[j]
                if f.function == "sum":
                    out.append(total)
                elif counts.all():
                    out.append((np.asarray(total) / counts).tolist())
                else:
                    out.append([t / c if c else None for t, c in zip(total, counts.tolist(), strict=True)])
                continue
            out.append(self._feature(f.function, j, vals, gv, counts))
        return out

    @staticmethod
    def _sums(f: np.ndarray, counts: np.ndarray) -> list[float]:
        """Exactly rounded sums of each group, as ``math.fsum`` gives them; one value, or two (one
        IEEE addition is exactly rounded), need no fsum (``+ 0.0``: fsum's zero is positive)."""
        ends = np.cumsum(counts)
        starts = ends - counts
        quick = np.zeros(len(counts))
        one, two = counts == 1, counts == 2
        quick[one] = f[starts[one]]
        quick[two] = f[starts[two]] + f[starts[two] + 1]
        sums = (quick + 0.0).tolist()
        many = np.flatnonzero(counts > 2).tolist()
        if many:
            lst, fsum = f.tolist(), math.fsum
            a, b = starts.tolist(), ends.tolist()
            for i in many:
                sums[i] = fsum(lst[a[i] : b[i]])
        return sums

    def _feature(self, fn: str, j: int, vals: np.ndarray, gv: np.ndarray, counts: np.ndarray) -> list[Any]:
        """One feature over each group's non-null values ``vals`` (sorted by group ``gv``)."""
        k = len(counts)
        if fn == "count":
            return counts.tolist()
        has = counts > 0
        starts = (np.cumsum(counts) - counts)[has]
        if fn == "count_distinct":
            order = np.lexsort((vals, gv))
            v, gs = vals[order], gv[order]
            new = np.ones(len(v), bool)
            new[1:] = (gs[1:] != gs[:-1]) | (v[1:] != v[:-1])
            return np.bincount(gs[new], minlength=k).tolist()
        if fn == "latest":
            first = vals[starts]
            dtype = self.dtypes[j]
            if dtype == "str":
                words = self.words[j]
                picked: list[Any] = [words[c] for c in first.tolist()]
            elif dtype == "bool":
                picked = [bool(x) for x in first.tolist()]
            else:
                picked = first.tolist()
            out: list[Any] = [None] * k
            for i, x in zip(np.flatnonzero(has).tolist(), picked, strict=True):
                out[i] = x
            return out
        f = vals.astype(np.float64, copy=False)
        red = np.minimum if fn == "min" else np.maximum
        got = np.full(k, np.nan)
        if len(starts):
            got[has] = red.reduceat(f, starts)
        if has.all():
            return got.tolist()
        return [x if h else None for x, h in zip(got.tolist(), has.tolist(), strict=True)]
