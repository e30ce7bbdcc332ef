"""Columnar tile state of one shard of entities.

Python touches each batch once per distinct (entity, tile), never per event: partials come from
numpy in :func:`engine.tiles.partials_from_events` and merge into contiguous arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.tiles import TILE, TileLayout, merge, partials_from_events

__all__ = ["TileState", "TileUpdate"]


@dataclass(frozen=True)
class TileUpdate:
    """Tiles one batch changed, grouped by entity, ready for the online store.

    ``rows`` holds the changed tile rows of ``entities[i]`` at ``rows[starts[i]:starts[i+1]]``;
    ``ops[i]`` counts every event ever applied to that entity, so a store can refuse a write
    older than what it holds (replays after recovery never move a value back).
    """

    entities: list[str]
    ops: np.ndarray
    rows: np.ndarray
    starts: np.ndarray
    deleted: dict[str, list[float]]
    max_ts: float

    def __len__(self) -> int:
        return len(self.rows)


class TileState:
    """Tiles of every entity of one shard, plus each entity's applied-event count.

    Tiles older than ``retention_ms`` behind the newest event time seen are evicted (and reported
    as deleted), with slack so eviction runs once per several tiles rather than every batch.
    """

    def __init__(self, layout: TileLayout, retention_ms: int) -> None:
        self.layout = layout
        self.retention_ms = retention_ms
        self.slack_tiles = max(4, (retention_ms // layout.tile_ms) // 8)
        self.entities: list[str] = []
        self.entity_index: dict[str, int] = {}
        self.ops = np.zeros(64, dtype=np.int64)
        self.index: dict[int, int] = {}
        self.rows = layout.empty(1024)
        self.row_entity = np.zeros(1024, dtype=np.int64)
        self.n = 0
        self.max_ts = -np.inf
        self.min_tile = np.inf

    def apply(
        self, keys: list[str], codes: np.ndarray, ts: np.ndarray, columns: list[np.ndarray]
    ) -> TileUpdate:
        """Add events (entity ``keys[codes[i]]``, time ``ts[i]`` ms, column values) to the tiles."""
        ent = self._entity_ids(keys)[codes]
        tile_no = ts // self.layout.tile_ms
        group = (ent << 32) | tile_no
        ukeys, part = partials_from_events(self.layout, group, tile_no, ts, columns)
        rows = self._rows_for(ukeys.tolist())
        self.rows[rows] = merge(self.layout, self.rows[rows], part)
        self.ops[: len(self.entities)] += np.bincount(ent, minlength=len(self.entities))
        self.max_ts = max(self.max_ts, float(ts.max()))
        self.min_tile = min(self.min_tile, float(tile_no.min()))
        changed = self.rows[rows]  # fancy indexing copies: safe across eviction below
        # ukeys are sorted, so changed rows come grouped by entity.
        row_ent = ukeys >> 32
        cut = np.flatnonzero(np.concatenate(([True], row_ent[1:] != row_ent[:-1])))
        touched = row_ent[cut]
        return TileUpdate(
            entities=[self.entities[e] for e in touched.tolist()],
            ops=self.ops[touched].copy(),
            rows=changed,
            starts=np.concatenate((cut, [len(rows)])),
            deleted=self._evict(),
            max_ts=self.max_ts,
        )

    def tiles_of(self, entity: str) -> np.ndarray:
        e = self.entity_index.get(entity)
        if e is None:
            return self.layout.empty(0)
        mask = self.row_entity[: self.n] == e
        return self.rows[: self.n][mask].copy()

    def _entity_ids(self, keys: list[str]) -> np.ndarray:
        idx = self.entity_index
        out = np.empty(len(keys), dtype=np.int64)
        for i, k in enumerate(keys):
            e = idx.get(k)
            if e is None:
                e = idx[k] = len(self.entities)
                self.entities.append(k)
            out[i] = e
        if len(self.entities) > len(self.ops):
            self.ops = np.concatenate((self.ops, np.zeros(len(self.entities) * 2, dtype=np.int64)))
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
                self.row_entity[r] = keys[i] >> 32
        return rows

    def _evict(self) -> dict[str, list[float]]:
        horizon = (self.max_ts - self.retention_ms) // self.layout.tile_ms
        if self.min_tile >= horizon - self.slack_tiles:
            return {}
        live = self.rows[: self.n]
        old = live[:, TILE] < horizon
        deleted: dict[str, list[float]] = {}
        for r in np.flatnonzero(old).tolist():
            e = int(self.row_entity[r])
            deleted.setdefault(self.entities[e], []).append(float(live[r, TILE]))
        keep = ~old
        kept = int(keep.sum())
        self.rows[:kept] = live[keep]
        self.rows[kept : self.n] = self.layout.empty(self.n - kept)
        self.row_entity[:kept] = self.row_entity[: self.n][keep]
        self.n = kept
        tiles = self.rows[:kept, TILE].astype(np.int64)
        ents = self.row_entity[:kept]
        self.index = dict(zip(((ents << 32) | tiles).tolist(), range(kept), strict=True))
        self.min_tile = float(tiles.min()) if kept else np.inf
        return deleted
