"""Columnar tile state of one shard of entities.

Python touches each batch once per distinct (entity, tile), never per event: partials come from
numpy in :func:`engine.tiles.partials_from_events` and merge into contiguous arrays.

Each live tile is a float64 row plus 12 bytes of index (engine.tile_index: sorted numpy keys,
looked up a batch at a time); no Python object per tile, so snapshots copy flat arrays.

The online store keeps, per entity, an append-only log of tile rows (the newest version of a
tile wins). The state knows how long each entity's log is, and asks for a full rewrite (only the
live tiles) once the log outgrows twice the live tiles, which bounds the log and drops evicted
tiles without ever deleting them one by one.

Each entity also carries its *position*: per source partition, the highest offset of its events
applied. Positions order writes of one entity even when its events come from several partitions
and a restart replays them in another interleaving: a store skips a write only when every
position in it is at or below what it holds (a replay of data it already has).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from itertools import repeat

import numpy as np

from engine.object_tiles import apply_events, encode_record
from engine.tile_index import TileIndex
from engine.tiles import TILE, TileLayout, merge, partials_from_events

__all__ = ["TileState", "TileUpdate"]

_LOG_SLACK = 16


@functools.lru_cache(maxsize=64)
def _identity(layout: TileLayout) -> np.ndarray:
    row = layout.empty(1)
    row.flags.writeable = False
    return row


@dataclass(frozen=True)
class TileUpdate:
    """Tile rows one batch produced for the online store, grouped by entity.

    ``rows[starts[i]:starts[i+1]]`` are the rows of ``entities[i]``: appended to its log, or,
    where ``rewrite[i]``, replacing it (then they are all its live tiles). ``positions[i]`` is the
    entity's position vector (highest applied offset per source partition, -1 for none), so a
    store can refuse a replay of what it already holds, whatever the partitioning. ``ops[i]``
    counts the events applied to the entity. ``force`` marks a resync of every entity (the store
    lost its data): applied whatever the store's positions. ``objects[i]``, for views with
    object aggregations, holds the entity's object-tile records (engine.object_tiles) for the
    same tiles as its rows, written with them.
    """

    entities: list[str]
    ops: np.ndarray
    rows: np.ndarray
    starts: np.ndarray
    rewrite: np.ndarray
    max_ts: float
    positions: np.ndarray
    force: bool = False
    objects: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.entities)


class TileState:
    """Tiles of every entity of one shard, with per-entity event counts and log lengths.

    Tiles older than ``retention_ms`` behind the newest event time seen are evicted, with slack
    so eviction runs once per several tiles of event time rather than every batch.
    """

    def __init__(self, layout: TileLayout, retention_ms: int, ttl_ms: int = 0) -> None:
        self.layout = layout
        self.retention_ms = retention_ms
        self.ttl_ms = ttl_ms  # the online keys' TTL (0: none), see _stale
        self.written = np.zeros(64, dtype=np.float64)  # wall clock of each entity's last write
        self.slack_tiles = max(4, (retention_ms // layout.tile_ms) // 8)
        self.entities: list[str] = []
        self.entity_index: dict[str, int] = {}
        self.ops = np.zeros(64, dtype=np.int64)
        self.pos = np.full((64, 1), -1, dtype=np.int64)
        self.online_epoch: str | None = None
        self.live = np.zeros(64, dtype=np.int64)
        self.logged = np.zeros(64, dtype=np.int64)
        self.tile_index = TileIndex()  # (entity << 32 | tile) -> row of every live tile
        self.rows = layout.empty(1024)  # rows[:n] are live; a row past n is set when a tile takes it
        self.n = 0
        self.max_ts = -np.inf
        self.min_tile = np.inf
        self.objects: dict[int, list] = {}  # (entity << 32 | tile) -> object-tile states

    def apply(
        self,
        keys: list[str],
        codes: np.ndarray,
        ts: np.ndarray,
        columns: list[np.ndarray],
        partition: int = 0,
        offsets: np.ndarray | None = None,
        text: dict[str, list] | None = None,
    ) -> TileUpdate:
        """Add events (entity ``keys[codes[i]]``, time ``ts[i]`` ms, column values) to the tiles.

        The events come from source ``partition`` at ``offsets`` (ascending). Without offsets,
        each entity's event count stands in for its position in ``partition``. ``text`` holds
        the values of the text columns object aggregations read.
        """
        ent = self._entity_ids(keys)[codes]
        records = None
        if self.layout.objects:
            records = self._apply_objects(ent, ts, columns, partition, offsets, text or {})
        if partition >= self.pos.shape[1]:
            grow = np.full((len(self.pos), partition + 1 - self.pos.shape[1]), -1, dtype=np.int64)
            self.pos = np.concatenate((self.pos, grow), axis=1)
        tile_no = ts // self.layout.tile_ms
        ukeys, part = partials_from_events(self.layout, (ent << 32) | tile_no, tile_no, ts, columns)
        rows = self._rows_for(ukeys)
        self.rows[rows] = merge(self.layout, self.rows[rows], part)
        self.ops[: len(self.entities)] += np.bincount(ent, minlength=len(self.entities))
        column = self.pos[:, partition]
        if offsets is None:
            column[ent] = self.ops[ent] - 1
        else:
            np.maximum.at(column, ent, np.asarray(offsets, dtype=np.int64))
        self.max_ts = max(self.max_ts, float(ts.max()))
        self.min_tile = min(self.min_tile, float(tile_no.min()))
        changed = self.rows[rows]  # a copy: row numbers change if eviction compacts below
        self._evict()
        # ukeys are sorted, so rows come grouped by entity.
        row_ent = ukeys >> 32
        cut = np.flatnonzero(np.concatenate(([True], row_ent[1:] != row_ent[:-1])))
        touched = row_ent[cut]
        counts = np.diff(np.concatenate((cut, [len(rows)])))
        live = self.live[touched]
        # An entity's first write replaces (all its tiles are in it): the store refuses an append
        # to an entity without keys, as its older tiles would be missing (expired keys).
        logged = self.logged[touched]
        rewrite = (logged + counts > 2 * live + _LOG_SLACK) | (logged == 0) | self._stale(touched)
        self.logged[touched] += counts
        if not rewrite.any():
            return self._with_objects(self._update(touched, changed, cut, rewrite), records)
        keep = np.repeat(~rewrite, counts)
        parts = [changed[keep]]
        starts = [cut[~rewrite] - np.concatenate(([0], np.cumsum(~keep)))[cut[~rewrite]]]
        again = touched[rewrite]
        mine, counts = self.tile_index.rows_of(again)
        parts.append(self.rows[mine])
        starts.append(int(keep.sum()) + np.concatenate(([0], np.cumsum(counts)[:-1])))
        self.logged[again] = counts
        order = np.concatenate((touched[~rewrite], touched[rewrite]))
        flags = np.concatenate((np.zeros((~rewrite).sum(), bool), np.ones(rewrite.sum(), bool)))
        return self._with_objects(
            self._update(order, np.concatenate(parts), np.concatenate(starts), flags), records
        )

    def _apply_objects(
        self,
        ent: np.ndarray,
        ts: np.ndarray,
        columns: list[np.ndarray],
        partition: int,
        offsets: np.ndarray | None,
        text: dict[str, list],
    ) -> dict[int, list[bytes]]:
        """Merge the events into the object tiles; the changed tiles' records, by entity."""
        specs = self.layout.objects
        if offsets is None:  # the entity's event count before this batch, plus the rank in it
            rank = np.zeros(len(ent), dtype=np.int64)
            order = np.argsort(ent, kind="stable")
            e = ent[order]
            first = np.flatnonzero(np.concatenate(([True], e[1:] != e[:-1])))
            rank[order] = np.arange(len(e)) - np.repeat(first, np.diff(np.concatenate((first, [len(e)]))))
            offsets = self.ops[ent] + rank
        store = getattr(self, "objects", None)
        if store is None:  # a state saved before object tiles existed
            store = self.objects = {}
        tile_no = ts // self.layout.tile_ms
        keys = (ent << 32) | tile_no
        values: dict[str, list] = {}
        for s in specs:
            if s.column not in values:
                if s.column in text:
                    values[s.column] = list(text[s.column])
                else:
                    values[s.column] = columns[self.layout.columns.index(s.column)].tolist()
        part = np.full(len(ent), partition, dtype=np.int64)
        apply_events(specs, store, keys, ts, part, np.asarray(offsets, dtype=np.int64), values)
        out: dict[int, list[bytes]] = {}
        for k in np.unique(keys).tolist():
            out.setdefault(k >> 32, []).append(encode_record(specs, k & 0xFFFFFFFF, store[k]))
        return out

    def _stale(self, ents: np.ndarray) -> np.ndarray:
        """Entities whose online keys may have expired since their last write (idle for most of
        the TTL): they get a whole rewrite, not an append the store would refuse. The store's
        refusal (``{ns}#lost``) stays the backstop; this keeps a bounded run that ends right
        after such an append from leaving the entity missing online."""
        now = time.time()
        written = getattr(self, "written", None)
        if written is None or len(written) < len(self.ops):  # a state saved before, or grown
            old = written if written is not None else np.zeros(0)
            written = self.written = np.full(len(self.ops), now)
            written[: len(old)] = old
        ttl = getattr(self, "ttl_ms", 0)
        stale = (now - written[ents]) * 1000 >= 0.8 * ttl if ttl else np.zeros(len(ents), bool)
        written[ents] = now
        return stale

    def _live_records(self, ents: np.ndarray) -> list[bytes]:
        """Each entity's object-tile records for all its live tiles, in its rows' order."""
        specs, store = self.layout.objects, self.objects
        rows, counts = self.tile_index.rows_of(ents)
        tiles = self.rows[rows, TILE].astype(np.int64).tolist()
        out, at = [], 0
        for e, c in zip(ents.tolist(), counts.tolist(), strict=True):
            mine = [(t, (e << 32) | t) for t in tiles[at : at + c]]
            out.append(b"".join(encode_record(specs, t, store[k]) for t, k in mine if k in store))
            at += c
        return out

    def _with_objects(self, update: TileUpdate, records: dict[int, list[bytes]] | None) -> TileUpdate:
        if records is None:
            return update
        ents = np.asarray([self.entity_index[name] for name in update.entities], dtype=np.int64)
        again = iter(self._live_records(ents[update.rewrite]))
        blobs = [
            next(again) if rewrite else b"".join(records.get(e, []))
            for e, rewrite in zip(ents.tolist(), update.rewrite.tolist(), strict=True)
        ]
        return replace(update, objects=blobs)

    def _update(
        self, ents: np.ndarray, rows: np.ndarray, starts: np.ndarray, rewrite: np.ndarray
    ) -> TileUpdate:
        return TileUpdate(
            entities=[self.entities[e] for e in ents.tolist()],
            ops=self.ops[ents].copy(),
            rows=rows,
            starts=np.concatenate((starts, [len(rows)])).astype(np.int64),
            rewrite=rewrite,
            max_ts=self.max_ts,
            positions=self.pos[ents].copy(),
        )

    def resync(self) -> TileUpdate:
        """Every entity's live tiles as a forced rewrite: rebuilds a store that lost its data."""
        ents = np.arange(len(self.entities), dtype=np.int64)
        return replace(self._replacing(ents), force=True)

    def rewrite(self, names: list[str]) -> TileUpdate:
        """The live tiles of the named entities (those this state holds) as replacing writes:
        rebuilds entities whose keys expired in the store."""
        ents = np.asarray([self.entity_index[n] for n in names if n in self.entity_index], np.int64)
        return self._replacing(ents)

    def _replacing(self, ents: np.ndarray) -> TileUpdate:
        rows, counts = self.tile_index.rows_of(ents)
        self.logged[ents] = counts
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        update = self._update(ents, self.rows[rows], starts[: len(ents)], np.ones(len(ents), dtype=bool))
        if self.layout.objects:
            update = replace(update, objects=self._live_records(ents))
        return update

    def tiles_of(self, entity: str) -> np.ndarray:
        """Live tile rows of one entity (for inspection and tests)."""
        e = self.entity_index.get(entity)
        if e is None:
            return self.layout.empty(0)
        return self.rows[self.tile_index.rows_of(np.array([e], dtype=np.int64))[0]]

    @property
    def index(self) -> dict[int, int]:
        """``entity << 32 | tile`` -> row of every live tile (built on demand, for inspection)."""
        return self.tile_index.items()

    def _entity_ids(self, keys: list[str]) -> np.ndarray:
        idx = self.entity_index
        found = list(map(idx.get, keys, repeat(-1)))  # no bytecode per key when all are known
        if -1 in found:
            for i, k in enumerate(keys):
                if found[i] < 0:
                    e = idx.get(k)
                    if e is None:
                        e = idx[k] = len(self.entities)
                        self.entities.append(k)
                    found[i] = e
        out = np.array(found, dtype=np.int64)
        if len(self.entities) > len(self.ops):
            grow = len(self.entities) * 2 - len(self.ops)
            self.ops = np.concatenate((self.ops, np.zeros(grow, dtype=np.int64)))
            self.live = np.concatenate((self.live, np.zeros(grow, dtype=np.int64)))
            self.logged = np.concatenate((self.logged, np.zeros(grow, dtype=np.int64)))
            more = np.full((grow, self.pos.shape[1]), -1, dtype=np.int64)
            self.pos = np.concatenate((self.pos, more))
        return out

    def _rows_for(self, keys: np.ndarray) -> np.ndarray:
        """Rows of the sorted distinct ``keys``; new keys get new identity rows, in key order."""
        rows = self.tile_index.find(keys)
        new = (rows < 0).nonzero()[0]
        m = len(new)
        if m == 0:
            return rows
        n = self.n
        if n + m > len(self.rows):
            # np.empty: the capacity beyond the live rows stays untouched (not resident) until used
            grown = np.empty((max(n + m, 2 * len(self.rows)), self.layout.width), dtype=np.float64)
            grown[:n] = self.rows[:n]
            self.rows = grown
        self.rows[n : n + m] = _identity(self.layout)
        fresh = np.arange(n, n + m, dtype=np.int64)
        rows[new] = fresh
        self.n = n + m
        self.tile_index.add(keys[new], fresh)
        np.add.at(self.live, keys[new] >> 32, 1)
        return rows

    def _evict(self) -> None:
        horizon = (self.max_ts - self.retention_ms) // self.layout.tile_ms
        if self.min_tile >= horizon - self.slack_tiles:
            return
        n = self.n
        keep = self.rows[:n, TILE] >= horizon
        kept = int(keep.sum())
        self.rows[:kept] = self.rows[:n][keep]
        self.n = kept
        self.tile_index.keep(keep)
        self.live[:] = 0
        self.live[: len(self.entities)] = np.bincount(
            self.tile_index.entities(), minlength=len(self.entities)
        )
        if getattr(self, "objects", None):
            live = self.tile_index.contains(np.fromiter(self.objects, np.int64, len(self.objects))).tolist()
            self.objects = {k: v for (k, v), ok in zip(self.objects.items(), live, strict=True) if ok}
        self.min_tile = float(self.rows[:kept, TILE].min()) if kept else np.inf

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["rows"] = self.rows[: self.n]  # the live rows only: capacity is not state
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        index = state.pop("index", None)
        if index is not None:  # saved with a dict index and per-entity row lists: convert
            del state["rows_of"], state["row_entity"]
            keys = np.fromiter(index.keys(), dtype=np.int64, count=len(index))
            rows = np.fromiter(index.values(), dtype=np.int64, count=len(index))
            state["tile_index"] = TileIndex.of(keys, rows)
        self.__dict__.update(state)
