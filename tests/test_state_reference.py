"""The tile state's compact index against the dict/list form it replaced.

:class:`ReferenceTileState` is that form, kept as the oracle: the same events must give the same
updates, row for row. States pickled by it (Bytewax recovery snapshots, backfill handoffs) must
load into :class:`engine.state.TileState` and carry on as if nothing had changed.
"""

from __future__ import annotations

import copy
import copyreg
import pickle
import time
from dataclasses import replace

import numpy as np

from engine.object_tiles import apply_events, encode_record
from engine.state import TileState, TileUpdate
from engine.tiles import TILE, TileLayout, merge, partials_from_events
from tests.aggregations_helpers import view

_LOG_SLACK = 16


class ReferenceTileState:
    """engine.state.TileState as it was with a dict index and per-entity row lists (verbatim but
    for docstrings): the oracle, and the maker of pickles in that form."""

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
        self.rows_of: list[list[int]] = []
        self.index: dict[int, int] = {}
        self.rows = layout.empty(1024)
        self.row_entity = np.zeros(1024, dtype=np.int64)
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
        rows = np.asarray(self._rows_for(ukeys.tolist()), dtype=np.int64)
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
        offset = int(keep.sum())
        for e in touched[rewrite].tolist():
            mine = self.rows[self.rows_of[e]]
            parts.append(mine)
            starts.append(np.array([offset]))
            offset += len(mine)
            self.logged[e] = len(mine)
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

    def _live_records(self, e: int) -> bytes:
        specs, store = self.layout.objects, self.objects
        tiles = self.rows[self.rows_of[e], TILE].astype(np.int64).tolist()
        return b"".join(
            encode_record(specs, t, store[(e << 32) | t]) for t in tiles if (e << 32) | t in store
        )

    def _with_objects(self, update: TileUpdate, records: dict[int, list[bytes]] | None) -> TileUpdate:
        if records is None:
            return update
        blobs = []
        for name, rewrite in zip(update.entities, update.rewrite.tolist(), strict=True):
            e = self.entity_index[name]
            blobs.append(self._live_records(e) if rewrite else b"".join(records.get(e, [])))
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
        parts = [self.rows[self.rows_of[e]] for e in ents.tolist()]
        counts = np.fromiter((len(p) for p in parts), np.int64, len(parts))
        self.logged[: len(ents)] = counts
        rows = np.concatenate(parts) if parts else self.layout.empty(0)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(parts) else np.zeros(0, np.int64)
        update = self._update(ents, rows, starts.astype(np.int64), np.ones(len(ents), dtype=bool))
        if self.layout.objects:
            update = replace(update, objects=[self._live_records(e) for e in ents.tolist()])
        return replace(update, force=True)

    def rewrite(self, names: list[str]) -> TileUpdate:
        """The live tiles of the named entities (those this state holds) as replacing writes:
        rebuilds entities whose keys expired in the store."""
        ents = np.asarray([self.entity_index[n] for n in names if n in self.entity_index], np.int64)
        parts = [self.rows[self.rows_of[e]] for e in ents.tolist()]
        counts = np.fromiter((len(p) for p in parts), np.int64, len(parts))
        self.logged[ents] = counts
        rows = np.concatenate(parts) if parts else self.layout.empty(0)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(parts) else np.zeros(0, np.int64)
        update = self._update(ents, rows, starts.astype(np.int64), np.ones(len(ents), dtype=bool))
        if self.layout.objects:
            update = replace(update, objects=[self._live_records(e) for e in ents.tolist()])
        return update

    def tiles_of(self, entity: str) -> np.ndarray:
        """Live tile rows of one entity (for inspection and tests)."""
        e = self.entity_index.get(entity)
        if e is None:
            return self.layout.empty(0)
        return self.rows[self.rows_of[e]].copy()

    def _entity_ids(self, keys: list[str]) -> np.ndarray:
        idx = self.entity_index
        out = np.empty(len(keys), dtype=np.int64)
        for i, k in enumerate(keys):
            e = idx.get(k)
            if e is None:
                e = idx[k] = len(self.entities)
                self.entities.append(k)
                self.rows_of.append([])
            out[i] = e
        if len(self.entities) > len(self.ops):
            grow = len(self.entities) * 2 - len(self.ops)
            self.ops = np.concatenate((self.ops, np.zeros(grow, dtype=np.int64)))
            self.live = np.concatenate((self.live, np.zeros(grow, dtype=np.int64)))
            self.logged = np.concatenate((self.logged, np.zeros(grow, dtype=np.int64)))
            more = np.full((grow, self.pos.shape[1]), -1, dtype=np.int64)
            self.pos = np.concatenate((self.pos, more))
        return out

    def _rows_for(self, keys: list[int]) -> list[int]:
        index = self.index
        rows = [index.get(k, -1) for k in keys]
        missing = [i for i, r in enumerate(rows) if r < 0]
        if missing:
            need = self.n + len(missing)
            if need > len(self.rows):
                cap = max(need, 2 * len(self.rows))
                grown = self.layout.empty(cap)
                grown[: self.n] = self.rows[: self.n]
                self.rows = grown
                ent = np.zeros(cap, dtype=np.int64)
                ent[: self.n] = self.row_entity[: self.n]
                self.row_entity = ent
            for i in missing:
                r = self.n
                self.n += 1
                index[keys[i]] = r
                rows[i] = r
                e = keys[i] >> 32
                self.row_entity[r] = e
                self.rows_of[e].append(r)
                self.live[e] += 1
        return rows

    def _evict(self) -> None:
        horizon = (self.max_ts - self.retention_ms) // self.layout.tile_ms
        if self.min_tile >= horizon - self.slack_tiles:
            return
        live = self.rows[: self.n]
        keep = live[:, TILE] >= horizon
        kept = int(keep.sum())
        self.rows[:kept] = live[keep]
        self.rows[kept : self.n] = self.layout.empty(self.n - kept)
        self.row_entity[:kept] = self.row_entity[: self.n][keep]
        self.n = kept
        tiles = self.rows[:kept, TILE].astype(np.int64)
        ents = self.row_entity[:kept]
        self.index = dict(zip(((ents << 32) | tiles).tolist(), range(kept), strict=True))
        self.live[:] = 0
        self.live[: len(self.entities)] = np.bincount(ents, minlength=len(self.entities))
        self.rows_of = [[] for _ in self.entities]
        for r, e in enumerate(ents.tolist()):
            self.rows_of[e].append(r)
        if getattr(self, "objects", None):
            self.objects = {k: v for k, v in self.objects.items() if k in self.index}
        self.min_tile = float(tiles.min()) if kept else np.inf


class _AsTileState:
    """Pickles as TileState with the given attributes: what pickle wrote for that class before
    it had __getstate__ (``copyreg.__newobj__``, the class, its ``__dict__``)."""

    def __init__(self, attrs: dict) -> None:
        self.attrs = attrs

    @property
    def __class__(self) -> type:  # pickle checks the class given to __newobj__ against this
        return TileState

    def __reduce_ex__(self, protocol: int) -> tuple:
        return copyreg.__newobj__, (TileState,), self.attrs


def legacy_pickle(state: ReferenceTileState) -> bytes:
    """``state`` pickled as engine.state.TileState pickled itself with a dict index (the same
    bytes: the class reference, then its attribute dict, rows with all their capacity)."""
    return pickle.dumps(_AsTileState(vars(state)))


def _batch(rng: np.random.Generator, layout: TileLayout, now: int, names: list[str], offset: int) -> tuple:
    """One source batch: several entities, times up to 4 s behind ``now``, a tenth 20 s late."""
    n = int(rng.integers(1, 60))
    used = sorted({names[i] for i in rng.integers(0, len(names), n)})
    codes = rng.integers(0, len(used), n)
    ts = np.maximum(0, now - rng.integers(0, 4_000, n) - 20_000 * (rng.random(n) < 0.1))
    text = [None if v < 0.2 else f"t{int(v * 5)}" for v in rng.random(n).tolist()]
    x = np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n))
    m = np.array([np.nan if t is None else 0.0 for t in text])
    cols = [x if c == "x" else m for c in layout.columns]
    return used, codes, ts, cols, int(rng.integers(0, 3)), offset + np.arange(n), {"m": text}


def _apply(state: TileState | ReferenceTileState, batch: tuple) -> TileUpdate:
    return state.apply(*copy.deepcopy(batch))


def _same(a: TileUpdate, b: TileUpdate) -> None:
    assert a.entities == b.entities and a.force == b.force and a.max_ts == b.max_ts
    for f in ("ops", "rows", "starts", "rewrite", "positions"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.objects == b.objects


def test_states_pickled_with_a_dict_index_load_and_carry_on() -> None:
    """Snapshots of every age of a stream (evictions, rewrites, object tiles), pickled by the
    dict-index class, restore into TileState, which then gives the updates that class gives;
    and the restored state copies and pickles in its own form."""
    layout = TileLayout.of(view())
    rng = np.random.default_rng(11)
    names = [f"u{i}" for i in range(30)]
    batches = [_batch(rng, layout, 1_000 + 700 * i, names, 100 * i) for i in range(80)]
    for at in (0, 1, 10, 40, 79):
        ref = ReferenceTileState(layout, 6_000, ttl_ms=10**9)
        for b in batches[:at]:
            _apply(ref, b)
        blob = legacy_pickle(ref)
        assert b"engine.state" in blob and b"rows_of" in blob
        restored = pickle.loads(blob)
        assert type(restored) is TileState and not hasattr(restored, "rows_of")
        assert restored.index == ref.index
        for name in names:
            np.testing.assert_array_equal(restored.tiles_of(name), ref.tiles_of(name))
        copied = pickle.loads(pickle.dumps(copy.deepcopy(restored)))
        for b in batches[at:]:
            u = _apply(ref, b)
            _same(_apply(restored, b), u)
            _same(_apply(copied, b), u)
        assert set(restored.objects) == set(ref.objects) == set(ref.index)
        some = [*names[:7], "nobody", names[3]]
        _same(restored.rewrite(some), ref.rewrite(some))
        _same(restored.resync(), ref.resync())
        np.testing.assert_array_equal(restored.logged, ref.logged)
