"""Feature values from tiles: as of one time (online) and as of each row's time (offline).

Both paths build tile partials with :func:`engine.tiles.partials_from_events` (the stream's code)
and turn them into values with :func:`engine.tiles.combine` and :func:`engine.tiles.finalize`,
which is why online and offline values agree.

Online, the newest tile is taken whole, which is exact whenever the read time is at or after the
entity's newest event (reads "as of now"). Offline, the newest tile holds only events up to each
row's time, so a training row never sees a later event.

Derived features are evaluated last, on the finalised values of the features they read, by the
same function online, offline and in the HTTP server (:func:`with_derived`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.definitions import Aggregation, Derived, FeatureView, duration_ms
from engine.errors import StoreError
from engine.levels import window_ranges
from engine.object_tiles import build_states, decode_records, is_object, window_values
from engine.tiles import (
    TILE,
    TileLayout,
    combine,
    event_time,
    finalize,
    partials_from_events,
    window_tile_range,
)

__all__ = ["FeatureValues", "LevelBlobs", "online_values", "point_in_time_values", "with_derived"]

FeatureValues = dict[str, tuple[np.ndarray, np.ndarray]]
"""feature name -> (values, event times in ms); NaN marks a null."""

_MAX_PAIRS = 4_000_000


def _by_window(aggs: list[Aggregation]) -> dict[tuple, list[Aggregation]]:
    groups: dict[tuple, list[Aggregation]] = {}
    for a in aggs:
        w = a.window
        groups.setdefault((w.kind, w.size, w.hop), []).append(a)
    return groups


def with_derived(
    view: FeatureView,
    wanted: list[Aggregation | Derived],
    compute: Callable[[list[Aggregation]], FeatureValues],
) -> FeatureValues:
    """``compute(aggregations)`` for the aggregations ``wanted`` needs (its own and those its
    derived features read, transitively), then each derived feature from finalised values.

    A derived value's event time is the newest of its inputs' (NaN when all are empty).
    """
    derived = [f for f in wanted if isinstance(f, Derived)]
    if not derived:
        return compute(wanted)
    needed: dict[str, Aggregation | Derived] = {}

    def need(f: Aggregation | Derived) -> None:
        if f.feature_name in needed:
            return
        if isinstance(f, Derived):
            for name in f.inputs:
                need(view.aggregation(name))
        needed[f.feature_name] = f  # after its inputs: a topological order

    for f in wanted:
        need(f)
    values = compute([f for f in needed.values() if isinstance(f, Aggregation)])
    for f in needed.values():
        if isinstance(f, Derived):
            inputs = {n: values[n][0] for n in f.inputs}
            times = [values[n][1] for n in f.inputs]
            with np.errstate(invalid="ignore"):
                newest = np.fmax.reduce(times) if len(times) > 1 else times[0].copy()
            values[f.name] = (f.parsed.evaluate(inputs, len(newest)), newest)
    names = {f.feature_name for f in wanted}
    return {k: v for k, v in values.items() if k in names}


LevelBlobs = dict[int, tuple[list[bytes], list[bytes] | None]]
"""Coarse tile size (ms) -> each entity's packed tiles of that level, and its object records
(None for a view without object aggregations): what :func:`online_values` needs for views with
long windows (engine.levels)."""


def online_values(
    view: FeatureView,
    blobs: list[bytes],
    at_ms: int,
    aggs: list[Aggregation | Derived],
    session_blobs: list[bytes] | None = None,
    objects: list[bytes] | None = None,
    levels: LevelBlobs | None = None,
) -> FeatureValues:
    """Values for each entity whose packed tiles are ``blobs[i]``, as of ``at_ms``; session
    features come from its online session value ``session_blobs[i]`` (:mod:`engine.sessions`).

    Object aggregations (engine.object_tiles) need each entity's object-tile records
    ``objects[i]`` (``RedisOnlineStore.read_objects``); their values are str, list or float.
    Long windows (engine.levels) read the coarse tiles in ``levels`` too
    (``RedisOnlineStore.read_spaces`` under each ``engine.levels.level_namespace``).
    """
    from engine.sessions import online_session_values, with_sessions

    return with_derived(
        view,
        aggs,
        lambda a: with_sessions(
            a,
            lambda t: _online_values(view, blobs, at_ms, t, objects, levels),
            lambda s: online_session_values(view, session_blobs, at_ms, s),
        ),
    )


def _online_values(
    view: FeatureView,
    blobs: list[bytes],
    at_ms: int,
    aggs: list[Aggregation],
    objects: list[bytes] | None = None,
    levels: LevelBlobs | None = None,
) -> FeatureValues:
    layout = TileLayout.of(view)
    want_objects = any(is_object(a, view) for a in aggs)
    if want_objects and objects is None:
        raise StoreError(
            f"view {view.name!r} has object aggregations; read them with "
            "RedisOnlineStore.read_objects and pass objects= to online_values"
        )
    n = len(blobs)
    tiers: dict[int, tuple[np.ndarray, np.ndarray, list[dict[int, list]] | None]] = {}

    def tier(level_ms: int) -> tuple[np.ndarray, np.ndarray, list[dict[int, list]] | None]:
        """The current tiles (and object records) of one level, decoded once per read."""
        if level_ms not in tiers:
            if level_ms == layout.tile_ms:
                tile_blobs, objs = blobs, objects
            elif levels is None or level_ms not in levels:
                raise StoreError(
                    f"view {view.name!r} has windows read from {level_ms // 1000}s tiles; read them "
                    "under engine.levels.level_namespace and pass levels= to online_values"
                )
            else:
                tile_blobs, objs = levels[level_ms]
            counts = np.fromiter((len(b) // layout.row_bytes for b in tile_blobs), np.int64, n)
            rows, gid = _current_tiles(layout, tile_blobs, counts)
            records = [decode_records(layout.objects, b) for b in objs] if want_objects and objs else None
            tiers[level_ms] = (rows, gid, records)
        return tiers[level_ms]

    # One combine for every window: rows of window g and entity e go to partial g * n + e.
    groups = list(_by_window(aggs).values())
    picked, owners = [], []
    found: dict[str, np.ndarray] = {}
    for g, group in enumerate(groups):
        objs = [a for a in group if is_object(a, view)]
        windows: list[dict[int, list]] = [{} for _ in range(n)] if objs else []
        for level_ms, lo, hi in window_ranges(view, group[0], at_ms):
            rows, gid, records = tier(level_ms)
            mask = (rows[:, TILE] >= lo) & (rows[:, TILE] <= hi)
            picked.append(rows[mask])
            owners.append(gid[mask] + g * n)
            for win, rec in zip(windows, records or [], strict=False):  # ordered by tile start
                win.update({t * level_ms: v for t, v in rec.items() if lo <= t <= hi})
        if objs:
            found.update(window_values(view, layout.objects, objs, windows))
    if picked:
        partials = combine(layout, np.concatenate(picked), np.concatenate(owners), n * len(groups))
    else:
        partials = layout.empty(n * len(groups))
    out: FeatureValues = {}
    for g, group in enumerate(groups):
        partial = partials[g * n : (g + 1) * n]
        for a in group:
            value = found[a.feature_name] if is_object(a, view) else finalize(layout, partial, a)
            out[a.feature_name] = (value, event_time(layout, partial, a))
    return out


def _current_tiles(
    layout: TileLayout, blobs: list[bytes], counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The newest row of each (entity, tile) in the entities' row logs, and each row's entity."""
    if not counts.sum():
        return layout.empty(0), np.zeros(0, dtype=np.int64)
    rows = np.frombuffer(b"".join(blobs), dtype="<f8").reshape(-1, layout.width)
    gid = np.repeat(np.arange(len(blobs), dtype=np.int64), counts)
    tile = rows[:, TILE].astype(np.int64)
    key = (gid << 32) | (tile & 0xFFFFFFFF)
    order = np.argsort(key, kind="stable")
    k = key[order]
    last = np.concatenate((k[1:] != k[:-1], [True]))
    pick = order[last]
    pick = pick[tile[pick] >= 0]  # drop the guard rows
    return rows[pick], gid[pick]


def point_in_time_values(
    view: FeatureView,
    events: pa.Table,
    entity: list[str],
    at_ms: np.ndarray,
    aggs: list[Aggregation | Derived],
) -> FeatureValues:
    """Values for each (``entity[i]``, ``at_ms[i]``) from stored events, using only events up to it.
    Session features need each entity's whole history up to the latest row time in ``events``."""
    from engine.sessions import point_in_time_session_values, with_sessions

    return with_derived(
        view,
        aggs,
        lambda a: with_sessions(
            a,
            lambda t: _point_in_time_values(view, events, entity, at_ms, t),
            lambda s: point_in_time_session_values(view, events, entity, at_ms, s),
        ),
    )


def _point_in_time_values(
    view: FeatureView,
    events: pa.Table,
    entity: list[str],
    at_ms: np.ndarray,
    aggs: list[Aggregation],
) -> FeatureValues:
    layout = TileLayout.of(view)
    q = len(entity)
    events, ecode, qcode, ts, cols = sorted_events(layout, events, entity)
    tmin = int(min(ts.min() if len(ts) else 0, at_ms.min() if q else 0)) - 2 * duration_ms(view.max_lookback)
    span = int(max(ts.max() if len(ts) else 0, at_ms.max() if q else 0)) - tmin + 2
    if (int(ecode.max(initial=-1)) + 2) * span >= 2**62:  # distinct entities + 1
        raise StoreError(
            "training set spans too many entities and too long a time at once; split entity_df by time"
        )
    key = ecode * span + (ts - tmin)
    out: FeatureValues = {}
    for group in _by_window(aggs).values():
        lo, hi, partial_head = window_tile_range(group[0], layout.tile_ms, at_ms)
        start = lo * layout.tile_ms
        end = at_ms if partial_head else (hi + 1) * layout.tile_ms - 1
        a = np.searchsorted(key, qcode * span + (start - tmin), side="left")
        b = np.searchsorted(key, qcode * span + (end - tmin), side="right")
        lengths = np.where(qcode >= 0, np.maximum(b - a, 0), 0)
        partial = layout.empty(q)
        for chunk in _chunks(lengths):
            partial[chunk] = _combine_ranges(layout, a[chunk], lengths[chunk], ts, cols)
        objs = [agg for agg in group if is_object(agg, view)]
        if objs:
            found = _object_values(view, layout, objs, events, ts, a, lengths)
        for agg in group:
            value = found[agg.feature_name] if is_object(agg, view) else finalize(layout, partial, agg)
            out[agg.feature_name] = (value, event_time(layout, partial, agg))
    return out


def _object_values(
    view: FeatureView,
    layout: TileLayout,
    aggs: list[Aggregation],
    events: pa.Table,
    ts: np.ndarray,
    first: np.ndarray,
    lengths: np.ndarray,
) -> dict[str, np.ndarray]:
    """Object aggregations of each query's event range (sorted by time, partition, offset):
    per-tile states built as the stream builds them, merged in tile order, as online."""
    specs = layout.objects
    part = events.column("_partition").to_numpy().astype(np.int64).tolist()
    off = events.column("_offset").to_numpy().astype(np.int64).tolist()
    tlist = ts.tolist()
    tile_of = (ts // layout.tile_ms).tolist()
    values: dict[str, list] = {}
    for s in specs:
        if s.column not in values:
            col = events.column(s.column)
            values[s.column] = col.to_pylist() if s.column in view.text_columns else _as_float(col).tolist()
    windows = []
    for start, n in zip(first.tolist(), lengths.tolist(), strict=True):
        tiles: dict[int, list] = {}
        i, end = start, start + n
        while i < end:
            j, t = i, tile_of[i]
            while j < end and tile_of[j] == t:
                j += 1
            cols = {c: v[i:j] for c, v in values.items()}
            tiles[t] = build_states(specs, tlist[i:j], part[i:j], off[i:j], cols)
            i = j
        windows.append(tiles)
    return window_values(view, specs, aggs, windows)


def sorted_events(
    layout: TileLayout, events: pa.Table, entity: list[str]
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Stored events in stream order per entity (time, then partition and offset), with each
    event's entity code, each query entity's code (-1: no events), times in ms and the view's
    columns as the stream sees them."""
    events = events.sort_by(
        [
            ("entity", "ascending"),
            ("event_ts", "ascending"),
            ("_partition", "ascending"),
            ("_offset", "ascending"),
        ]
    )
    ev_entity = events.column("entity").combine_chunks()
    uniq = pc.unique(ev_entity)
    ecode = pc.index_in(ev_entity, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
    qcode = pc.index_in(pa.array(entity, pa.string()), value_set=uniq)
    qcode = qcode.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    ts = pc.cast(events.column("event_ts"), pa.timestamp("ms", "UTC")).cast(pa.int64()).to_numpy()
    return events, ecode, qcode, ts, [_as_float(events.column(c)) for c in layout.columns]


def _as_float(column: pa.ChunkedArray) -> np.ndarray:
    """A column as the stream sees it: numbers as float64, text as presence (0.0, or NaN if null)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.where(pc.is_valid(column).to_numpy(zero_copy_only=False), 0.0, np.nan)
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def _chunks(lengths: np.ndarray) -> list[slice]:
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total and total + n > _MAX_PAIRS:
            out.append(slice(start, i))
            start, total = i, 0
        total += n
    out.append(slice(start, len(lengths)))
    return out


def _combine_ranges(
    layout: TileLayout, first: np.ndarray, lengths: np.ndarray, ts: np.ndarray, cols: list[np.ndarray]
) -> np.ndarray:
    """Tile partials of each query's event range, combined per query."""
    q = len(first)
    total = int(lengths.sum())
    if total == 0:
        return layout.empty(q)
    qid = np.repeat(np.arange(q, dtype=np.int64), lengths)
    ev = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(first, lengths)
    tile_no = ts[ev] // layout.tile_ms
    keys, rows = partials_from_events(layout, (qid << 32) | tile_no, tile_no, ts[ev], [c[ev] for c in cols])
    return combine(layout, rows, keys >> 32, q)
