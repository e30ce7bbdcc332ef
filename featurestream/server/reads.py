"""Online reads for the server: every requested feature of a view in one pass, with a status.

:func:`engine.reads.online_values` combines tiles once per window. A request for 50 features over
five windows would pay that fixed cost (tens of numpy calls) five times per request, which is most
of a request's time for a single entity. Here the rows of every window are gathered at once and
combined with one :func:`engine.tiles.combine` call (group = entity x window), then each distinct
(function, column) is finalized once. The rows, their order within each group, ``combine`` and
``finalize`` are the engine's own, so the values equal ``online_values`` (a test checks it).
Derived features are evaluated afterwards by the engine's own :func:`engine.reads.with_derived`,
on the aggregations they read (which join the same pass), so they equal the client's too.

Session windows (engine.sessions) and object aggregations (engine.object_tiles: text, lists,
sketches) are read apart from that pass, by the client's own :func:`engine.reads.online_values`,
from the tile rows, object records and session values fetched in one MGET (see
:mod:`featurestream.server.batch`); a request for numeric tile features only never takes that path.

Status per value (the names Feast uses):

* ``NOT_FOUND``: Redis holds nothing for the entity (never seen, or its keys expired).
* ``OUTSIDE_MAX_AGE``: the entity's newest event is older than the view's TTL as of the read
  (``ttl``, default longest lookback + one tile): its state is stale, every window is empty.
* ``NULL_VALUE``: the entity is live but this feature's window holds no value (a mean of nothing),
  or a derived feature is null (a null input, a division by zero).
* ``PRESENT``: a value (0 is a value for ``count`` and ``sum``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from engine.definitions import Aggregation, Derived, FeatureView, duration_ms
from engine.levels import window_precision_ms
from engine.object_tiles import is_object, numeric_result
from engine.reads import LevelBlobs, _current_tiles, online_values, with_derived
from engine.sessions import is_session
from engine.tiles import MAXTS, TILE, N, TileLayout, combine, event_time, finalize, window_tile_range

__all__ = ["STATUSES", "Block", "Plan", "ReadCache", "ViewReader"]

PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE, NULL_VALUE = range(4)
_NONE = np.zeros(0, np.int64)
STATUSES = np.array(["PRESENT", "NOT_FOUND", "OUTSIDE_MAX_AGE", "NULL_VALUE"], dtype=object)


@dataclass(frozen=True)
class Block:
    """Values of ``F`` features for ``n`` entities: rows are features, columns entities."""

    values: np.ndarray  # (F, n) float64, NaN = null
    times: np.ndarray  # (F, n) float64 epoch ms of the newest event behind each value, NaN = none
    status: np.ndarray  # (F, n) int8 index into STATUSES
    counts: np.ndarray  # (F,) bool: a count (integer values)
    types: tuple[pa.DataType | None, ...] = ()  # per feature, the Arrow type of object values


class ViewReader:
    """Reads features of one view version from packed tile logs (see module docstring)."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self.layout = TileLayout.of(view)
        self.ttl_ms = duration_ms(view.effective_ttl)
        windows: dict[tuple, int] = {}
        self._window: dict[str, int] = {}  # feature -> window index
        self._first: list[Aggregation] = []  # one aggregation per window, for its tile range
        for a in view.aggregations:
            w = (a.window.kind, a.window.size, a.window.hop)
            if w not in windows:
                windows[w] = len(windows)
                self._first.append(a)
            self._window[a.feature_name] = windows[w]
        self.n_windows = len(windows)
        # Numeric tile aggregations: read here; sessions and object aggregations: see plan().
        # Long windows (engine.levels) read coarse tiles too: by online_values, like sessions.
        tile_ms = self.layout.tile_ms
        tiled = [
            a
            for a in view.aggregations
            if not is_session(a) and not is_object(a, view) and window_precision_ms(a, tile_ms) == tile_ms
        ]
        self._index = {a.feature_name: i for i, a in enumerate(tiled)}
        self._full: Plan | None = None

    def plan(self, features: list[Aggregation | Derived]) -> Plan:
        """Index arrays to read ``features`` in one pass (made once per distinct request shape).
        The pass reads the aggregations requested and those derived features read, transitively.
        Session windows (engine.sessions) and object aggregations (engine.object_tiles) are read
        by the engine's own :func:`engine.reads.online_values`, as the Python client reads them."""
        aggs = self._inputs(features)
        if all(a.feature_name in self._index for a in aggs):
            return self._plan(features)
        return Plan(
            features=list(features),
            derived=any(isinstance(f, Derived) for f in features),
            aggs=aggs,
            windows=[],
            final_aggs=[],
            time_aggs=[],
            final_idx=_NONE,
            time_idx=_NONE,
            window_idx=_NONE,
            counts=np.array([getattr(f, "function", None) == "count" for f in features], bool),
            feature_idx=_NONE,
            sessions=any(is_session(a) for a in aggs),
            objects=any(is_object(a, self.view) for a in aggs),
            general=True,
        )

    def _plan(self, features: list[Aggregation | Derived]) -> Plan:
        aggs = self._inputs(features)
        finals: dict[tuple[str, str | None], int] = {}
        times: dict[str | None, int] = {}
        first: list[Aggregation] = []
        time_first: list[Aggregation] = []
        for a in aggs:
            if (a.function, a.column) not in finals:
                finals[(a.function, a.column)] = len(finals)
                first.append(a)
            if a.column not in times:
                times[a.column] = len(times)
                time_first.append(a)
        return Plan(
            features=list(features),
            derived=any(isinstance(f, Derived) for f in features),
            aggs=aggs,
            windows=sorted({self._window[a.feature_name] for a in aggs}),
            final_aggs=first,
            time_aggs=time_first,
            final_idx=np.array([finals[(a.function, a.column)] for a in aggs], np.int64),
            time_idx=np.array([times[a.column] for a in aggs], np.int64),
            window_idx=np.array([self._window[a.feature_name] for a in aggs], np.int64),
            counts=np.array([getattr(f, "function", None) == "count" for f in features], bool),
            feature_idx=np.array([self._index[a.feature_name] for a in aggs], np.int64),
        )

    def _inputs(self, features: list[Aggregation | Derived]) -> list[Aggregation]:
        """The aggregations among ``features``, then those their derived features read."""
        if not any(isinstance(f, Derived) for f in features):
            return list(features)  # type: ignore[arg-type]
        out = {f.feature_name: f for f in features if isinstance(f, Aggregation)}
        todo = [f for f in features if isinstance(f, Derived)]
        seen = {f.name for f in todo}
        while todo:
            for name in todo.pop().inputs:
                f = self.view.aggregation(name)
                if isinstance(f, Aggregation):
                    out.setdefault(name, f)
                elif name not in seen:
                    seen.add(name)
                    todo.append(f)
        return list(out.values())

    def read(
        self,
        blobs: list[bytes],
        at_ms: int,
        features: list[Aggregation | Derived] | Plan,
        ids: list[str] | None = None,
        cache: ReadCache | None = None,
        objects: list[bytes] | None = None,
        sessions: list[bytes] | None = None,
        levels: LevelBlobs | None = None,
    ) -> Block:
        """Values of ``features`` (or a :meth:`plan` of them) for the entities whose tile logs
        are ``blobs``, as of ``at_ms``; with ``ids`` and a ``cache``, unchanged entities are not
        recomputed within a tile (the cache holds aggregations; derived values are evaluated
        from them on every read, so they can never disagree)."""
        plan = features if isinstance(features, Plan) else self.plan(features)
        if plan.general:
            return self._general(blobs, at_ms, plan, objects, sessions, levels)
        if ids is None or cache is None or not cache.enabled:
            values, times, has_data, newest = self._compute(blobs, at_ms, plan)
        else:
            values, times, has_data, newest = self._cached(ids, blobs, at_ms, plan, cache)
        if plan.derived:
            values, times = self._derive(plan, values, times)
        with np.errstate(invalid="ignore"):
            stale = has_data & (newest < at_ms - self.ttl_ms)
        status = np.where(np.isnan(values), NULL_VALUE, PRESENT).astype(np.int8)
        status[:, stale] = OUTSIDE_MAX_AGE
        status[:, ~has_data] = NOT_FOUND
        return Block(values, times, status, plan.counts)

    def _general(
        self,
        blobs: list[bytes],
        at_ms: int,
        plan: Plan,
        objects: list[bytes] | None,
        sessions: list[bytes] | None,
        levels: LevelBlobs | None = None,
    ) -> Block:
        """Values of a plan with session or object features, by :func:`engine.reads.online_values`
        (the client's own read, derived features included), with the statuses of :meth:`read`.
        Object values (str, lists, structs) make the block's values an object array."""
        n = len(blobs)
        found = online_values(
            self.view, blobs, at_ms, plan.features, session_blobs=sessions, objects=objects, levels=levels
        )
        cols = [found[f.feature_name][0] for f in plan.features]
        mixed = any(c.dtype == object for c in cols)
        values = np.empty((len(cols), n), dtype=object if mixed else np.float64)
        null = np.zeros((len(cols), n), bool)
        for i, col in enumerate(cols):
            values[i] = col
            if col.dtype == object:
                null[i] = [v is None or (isinstance(v, float) and v != v) for v in col.tolist()]
            else:
                null[i] = np.isnan(col)
        times = np.stack([found[f.feature_name][1] for f in plan.features]).astype(np.float64)
        counts = np.fromiter((len(b) // self.layout.row_bytes for b in blobs), np.int64, n)
        rows, gid = _current_tiles(self.layout, blobs, counts)
        has_data = np.bincount(gid, minlength=n) > 0
        newest = np.full(n, np.nan)
        np.fmax.at(newest, gid, rows[:, MAXTS])
        for extra in (objects, sessions, *(tiles for tiles, _ in (levels or {}).values())):
            if extra is not None:
                has_data |= np.fromiter((len(b) > 0 for b in extra), bool, n)
        for tiles, _ in (levels or {}).values():  # an entity idle for days has coarse tiles only
            counts = np.fromiter((len(b) // self.layout.row_bytes for b in tiles), np.int64, n)
            rows, gid = _current_tiles(self.layout, tiles, counts)
            np.fmax.at(newest, gid, rows[:, MAXTS])
        if sessions is not None:
            np.fmax(newest, self._session_newest(sessions), out=newest)
        with np.errstate(invalid="ignore"):
            stale = has_data & (newest < at_ms - self.ttl_ms)
        status = np.where(null, NULL_VALUE, PRESENT).astype(np.int8)
        status[:, stale] = OUTSIDE_MAX_AGE
        status[:, ~has_data] = NOT_FOUND
        types = tuple(_arrow_type(f, self.view) for f in plan.features) if mixed else ()
        return Block(values, times, status, plan.counts, types)

    def _session_newest(self, sessions: list[bytes]) -> np.ndarray:
        """Each entity's newest event among its kept sessions (NaN for none)."""
        width, out = self.layout.width, np.full(len(sessions), np.nan)
        for i, blob in enumerate(sessions):
            if blob and len(blob) % self.layout.row_bytes == 0:
                rows = np.frombuffer(blob, dtype="<f8").reshape(-1, width)
                live = rows[rows[:, N] > 0]
                if len(live):
                    out[i] = live[:, MAXTS].max()
        return out

    def _derive(self, plan: Plan, values: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, times) of ``plan.features`` from those of ``plan.aggs``, by the engine's
        :func:`engine.reads.with_derived` (the same evaluation as the Python client's)."""
        read = {a.feature_name: (values[i], times[i]) for i, a in enumerate(plan.aggs)}
        found = with_derived(self.view, plan.features, lambda _aggs: read)
        rows = [found[f.feature_name] for f in plan.features]
        return np.stack([v for v, _ in rows]), np.stack([t for _, t in rows])

    def _cached(
        self, ids: list[str], blobs: list[bytes], at_ms: int, plan: Plan, cache: ReadCache
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every feature of the view per entity, from the cache where the entity's tile log and
        the current tile are those it was computed for (then the values are the same), the rest
        computed in one pass and cached."""
        n, width = len(blobs), len(self._index)
        tile_no = at_ms // self.layout.tile_ms
        values = np.empty((n, width))
        times = np.empty((n, width))
        has_data = np.zeros(n, bool)
        newest = np.full(n, np.nan)
        miss: list[int] = []
        version = self.view.version
        for i, blob in enumerate(blobs):
            hit = cache.get(version, ids[i], blob, tile_no) if blob else None
            if hit is None:
                miss.append(i)
            else:
                values[i], times[i], has_data[i], newest[i] = hit
        cache.count(n - len(miss), len(miss))
        if miss:
            full = self._full or self._plan([self.view.aggregation(f) for f in self._index])  # type: ignore[misc]
            self._full = full
            v, t, h, nw = self._compute([blobs[i] for i in miss], at_ms, full)
            values[miss], times[miss], has_data[miss], newest[miss] = v.T, t.T, h, nw
            for j, i in enumerate(miss):
                if blobs[i]:
                    cache.put(
                        version, ids[i], blobs[i], tile_no, (v[:, j].copy(), t[:, j].copy(), h[j], nw[j])
                    )
        return values[:, plan.feature_idx].T, times[:, plan.feature_idx].T, has_data, newest

    def _compute(
        self, blobs: list[bytes], at_ms: int, plan: Plan
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(values (F, n), event times (F, n), has data (n,), newest event (n,)), computed."""
        layout, n, g_count = self.layout, len(blobs), self.n_windows
        counts = np.fromiter((len(b) // layout.row_bytes for b in blobs), np.int64, n)
        rows, gid = _current_tiles(layout, blobs, counts)
        t = np.array([at_ms], dtype=np.int64)
        lo = np.empty(len(plan.windows), np.int64)
        hi = np.empty(len(plan.windows), np.int64)
        for j, g in enumerate(plan.windows):
            lo_g, hi_g, _ = window_tile_range(self._first[g], layout.tile_ms, t)
            lo[j], hi[j] = lo_g[0], hi_g[0]
        tile = rows[:, TILE]
        member = (tile[None, :] >= lo[:, None]) & (tile[None, :] <= hi[:, None])
        which, ri = np.nonzero(member)  # window-major; rows keep their order within each window
        windows = np.asarray(plan.windows, np.int64)[which]
        partial = combine(layout, rows[ri], gid[ri] * g_count + windows, n * g_count)
        finals = np.stack([finalize(layout, partial, a) for a in plan.final_aggs]).reshape(-1, n, g_count)
        stamps = np.stack([event_time(layout, partial, a) for a in plan.time_aggs]).reshape(-1, n, g_count)
        values = finals[plan.final_idx, :, plan.window_idx]  # (F, n)
        times = stamps[plan.time_idx, :, plan.window_idx]
        has_data = np.bincount(gid, minlength=n) > 0
        newest = np.full(n, np.nan)
        np.fmax.at(newest, gid, rows[:, MAXTS])
        return values, times, has_data, newest


class ReadCache:
    """Computed features per (view version, entity), valid while the entity's tile log and the
    current tile number are unchanged: a value as of ``t`` depends on nothing else, because
    window sizes and hops are multiples of the tile size (see :func:`engine.tiles.window_tile_range`).
    Bounded by bytes (the logs it keeps to compare); oldest entries go first."""

    def __init__(self, max_bytes: int, on_count: Any = None) -> None:
        self.max_bytes = max_bytes
        self.enabled = max_bytes > 0
        self._entries: dict[tuple[str, str], tuple[bytes, int, Any]] = {}
        self._bytes = 0
        self._on_count = on_count

    def get(self, version: str, entity: str, blob: bytes, tile_no: int) -> Any:
        hit = self._entries.get((version, entity))
        if hit is None or hit[1] != tile_no or hit[0] != blob:
            return None
        return hit[2]

    def put(self, version: str, entity: str, blob: bytes, tile_no: int, value: Any) -> None:
        key = (version, entity)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _size(old[0], old[2])
        self._entries[key] = (blob, tile_no, value)
        self._bytes += _size(blob, value)
        while self._bytes > self.max_bytes and self._entries:
            first = next(iter(self._entries))
            gone = self._entries.pop(first)
            self._bytes -= _size(gone[0], gone[2])

    def count(self, hits: int, misses: int) -> None:
        if self._on_count is not None:
            self._on_count(hits, misses)

    def __len__(self) -> int:
        return len(self._entries)


def _arrow_type(feature: Aggregation | Derived, view: FeatureView) -> pa.DataType | None:
    """The Arrow type of an object feature's values (so a column of nulls keeps its type);
    None for numeric features."""
    if not isinstance(feature, Aggregation) or not is_object(feature, view) or numeric_result(feature, view):
        return None
    value = pa.string() if feature.column in view.text_columns else pa.float64()
    if feature.function == "last_n":
        return pa.list_(value)
    if feature.function == "top_k":
        return pa.list_(pa.struct([("value", value), ("count", pa.int64())]))
    return value  # first, last


def _size(blob: bytes, value: Any) -> int:
    return len(blob) + value[0].nbytes + value[1].nbytes + 200


@dataclass(frozen=True)
class Plan:
    """How to read a list of features of one view in one pass (see :meth:`ViewReader.plan`)."""

    features: list[Aggregation | Derived]  # requested, in answer order
    derived: bool  # some of ``features`` are derived: evaluated after ``aggs`` are read
    aggs: list[Aggregation]  # read from the tiles: ``features``' own and their derived inputs
    windows: list[int]
    final_aggs: list[Aggregation]
    time_aggs: list[Aggregation]
    final_idx: np.ndarray
    time_idx: np.ndarray
    window_idx: np.ndarray
    counts: np.ndarray  # per feature: a count (integer values)
    feature_idx: np.ndarray  # position of each of ``aggs`` in the view's aggregations
    sessions: bool = False  # reads session features: the entities' session values too
    objects: bool = False  # reads object aggregations: the entities' object-tile records too
    general: bool = False  # read by engine.reads.online_values (sessions, objects, long windows)
