"""Session windows: per entity, runs of events less than ``gap`` apart, kept by the stream and
read online (as of now) and offline (as of each row's time).

A session row reuses the tile row layout (:mod:`engine.tiles`) with the session's first event
time in place of the tile number, so sessions merge with :func:`engine.tiles.merge` /
:func:`engine.tiles.combine` and finalise with :func:`engine.tiles.finalize`::

    [start_ts, n_events, end_ts,  then per column: count, sum, min, max, m2, last_ts, last]

Two sessions of one entity join when the later one starts less than ``gap`` after the earlier
one's end, so an out-of-order event can extend a session or bridge two into one. The stream
keeps, per entity and gap, every session that an accepted event could still change (ending within
``allowed_lateness + gap`` of the slowest source partition's newest event as this shard saw it,
every partition counting as infinitely slow until it delivered an event) plus the newest two of
the others (those may merge into one), and writes the newest two per gap to the online store: as
of a time at or after the newest event, the current session is the newest one (if still open) and
the last closed one is the newest or the one before it.

Offline reads need no state: events sorted by entity and time split into sessions where the entity
changes or consecutive times are ``gap`` or more apart. The events up to a row's time are a prefix
of the entity's, so the sessions as of that time are the full ones cut at the row's last event.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from engine.definitions import Aggregation, FeatureView, duration_ms
from engine.errors import StoreError
from engine.reads import FeatureValues, _chunks, _combine_ranges, sorted_events
from engine.state import TileUpdate
from engine.tiles import MAXTS, TILE, N, TileLayout, combine, event_time, finalize, partials_from_events

__all__ = [
    "SessionState",
    "has_sessions",
    "merge_sessions",
    "online_session_values",
    "point_in_time_session_values",
    "session_gaps",
    "session_namespace",
    "sessionize",
    "with_sessions",
]

SLOTS = 2  # sessions per gap in an entity's online value: the one before the newest, the newest


def is_session(agg: Aggregation) -> bool:
    return agg.window.kind == "session"


def has_sessions(view: FeatureView) -> bool:
    return any(is_session(a) for a in view.aggregations)


def session_gaps(view: FeatureView) -> tuple[int, ...]:
    """The view's distinct session gaps in ms, ascending: the order of the online value's slots."""
    return tuple(sorted({duration_ms(a.window.size) for a in view.aggregations if is_session(a)}))


def session_namespace(namespace: str) -> str:
    """Online key prefix of a view version's sessions, beside its tiles (``namespace`` ends in ':')."""
    return namespace[:-1] + "/sessions:"


def with_sessions(
    aggs: list[Aggregation],
    tiles: Callable[[list[Aggregation]], FeatureValues],
    sessions: Callable[[list[Aggregation]], FeatureValues],
) -> FeatureValues:
    """``tiles`` for the windowed aggregations, ``sessions`` for the session ones, merged."""
    tile_aggs = [a for a in aggs if not is_session(a)]
    session_aggs = [a for a in aggs if is_session(a)]
    out = tiles(tile_aggs) if tile_aggs or not session_aggs else {}
    if session_aggs:
        out.update(sessions(session_aggs))
    return out


def sessionize(
    layout: TileLayout, ent: np.ndarray, ts: np.ndarray, columns: list[np.ndarray], gap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Session rows of a set of events (entity ids ``ent``), sorted by entity then start.

    Events with equal times keep their input order, so ``last`` takes the later one.
    """
    n = len(ent)
    if n == 0:
        return ent[:0], layout.empty(0)
    ts = np.asarray(ts, dtype=np.int64)
    order = np.lexsort((ts, ent))
    e, t = ent[order], ts[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (e[1:] != e[:-1]) | (t[1:] - t[:-1] >= gap)
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    _, rows = partials_from_events(layout, group, ts, ts, columns)  # tile_no = ts: TILE = start
    return e[new], rows


def merge_sessions(
    layout: TileLayout, ent: np.ndarray, rows: np.ndarray, gap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Join session rows of the same entity that overlap or lie less than ``gap`` apart.

    The rows must hold disjoint sets of events; on equal newest times, ``last`` takes the later
    row's (pass older data first). Returns rows sorted by entity then start.
    """
    n = len(ent)
    if n == 0:
        return ent[:0], layout.empty(0)
    order = np.lexsort((rows[:, TILE], ent))
    e, r = ent[order], rows[order]
    start, end = r[:, TILE].astype(np.int64), r[:, MAXTS].astype(np.int64)
    first = np.ones(n, dtype=bool)
    first[1:] = e[1:] != e[:-1]
    reach = _running_max(end, first)  # the latest end among this entity's rows so far
    new = first.copy()
    new[1:] |= start[1:] - reach[:-1] >= gap
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    out = combine(layout, rows, group, int(new.sum()))  # in the given order: later rows win ties
    out[:, TILE] = start[new]  # rows are sorted by start: the group's first row starts it
    return e[new], out


def _running_max(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Running maximum of ``x`` restarting where ``first`` is set."""
    seg = np.cumsum(first) - 1
    lo, hi = int(x.min()), int(x.max())
    span = hi - lo + 1
    if (int(seg[-1]) + 1) * span < 2**62:  # one accumulate over segment-offset values
        shifted = seg * span + (x - lo)
        return np.maximum.accumulate(shifted) - seg * span + lo
    out = np.empty_like(x)
    bounds = np.append(np.flatnonzero(first), len(x))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        out[a:b] = np.maximum.accumulate(x[a:b])
    return out


class SessionState:
    """Sessions of every entity of one shard, per gap, with per-entity positions (as
    :class:`engine.state.TileState`, whose interface the dataflow's tile step drives).

    Plain lists and numpy arrays, so it pickles for recovery snapshots.
    """

    def __init__(
        self,
        layout: TileLayout,
        gaps: tuple[int, ...],
        lateness_ms: int,
        partitions: int = 1,
        cap_ms: int | None = None,
    ) -> None:
        self.layout = layout
        self.gaps = gaps
        self.lateness_ms = lateness_ms
        self.cap_ms = cap_ms  # sessions ending this long before the entity's newest event go (the ttl)
        # Newest event time per source partition as this shard saw it (-inf: none yet). Lateness
        # is judged per partition, so the slowest one bounds how old an accepted event can be.
        self.part_max = np.full(max(1, partitions), -np.inf)
        self.entities: list[str] = []
        self.entity_index: dict[str, int] = {}
        self.ops = np.zeros(64, dtype=np.int64)
        self.pos = np.full((64, 1), -1, dtype=np.int64)
        self.newest = np.full(64, -np.inf)
        self.sessions: list[list[np.ndarray]] = [[] for _ in gaps]
        self._no_rows = layout.empty(0)
        self.online_epoch: str | None = None
        self.max_ts = -np.inf

    def apply(
        self,
        keys: list[str],
        codes: np.ndarray,
        ts: np.ndarray,
        columns: list[np.ndarray],
        partition: int = 0,
        offsets: np.ndarray | None = None,
    ) -> TileUpdate:
        """Add events (entity ``keys[codes[i]]``, time ``ts[i]`` ms) from source ``partition`` at
        ``offsets``; returns every touched entity's online value (a rewrite)."""
        ent = self._entity_ids(keys)[np.asarray(codes)]
        ts = np.asarray(ts, dtype=np.int64)
        if partition >= self.pos.shape[1]:
            grow = np.full((len(self.pos), partition + 1 - self.pos.shape[1]), -1, dtype=np.int64)
            self.pos = np.concatenate((self.pos, grow), axis=1)
        if partition >= len(self.part_max):
            self.part_max = np.append(self.part_max, np.full(partition + 1 - len(self.part_max), -np.inf))
        self.ops[: len(self.entities)] += np.bincount(ent, minlength=len(self.entities))
        column = self.pos[:, partition]
        if offsets is None:
            column[ent] = self.ops[ent] - 1
        else:
            np.maximum.at(column, ent, np.asarray(offsets, dtype=np.int64))
        np.fmax.at(self.newest, ent, ts.astype(np.float64))
        if len(ts):
            self.part_max[partition] = max(self.part_max[partition], float(ts.max()))
        floor = float(self.part_max.min()) - self.lateness_ms  # no accepted event is older
        if len(ts):
            self.max_ts = max(self.max_ts, float(ts.max()))
        touched = np.unique(ent)
        per = SLOTS * len(self.gaps)
        slots = self.layout.empty(len(touched) * per).reshape(len(touched), per, self.layout.width)
        for k, gap in enumerate(self.gaps):
            store = self.sessions[k]
            old = [store[e] for e in touched.tolist()]
            counts = np.fromiter((len(o) for o in old), np.int64, len(old))
            new_ent, new_rows = sessionize(self.layout, ent, ts, columns, gap)
            all_ent = np.concatenate((np.repeat(touched, counts), new_ent))
            all_rows = np.concatenate((*old, new_rows))
            m_ent, m_rows = merge_sessions(self.layout, all_ent, all_rows, gap)
            # Final sessions (no accepted event can reach them: they end a gap before the oldest
            # time any partition still accepts) are a prefix per entity; keep the newest SLOTS of
            # them, since the changeable ones after them may merge into one.
            horizon = np.full(len(m_ent), floor - gap)
            if self.cap_ms is not None:
                horizon = np.maximum(horizon, self.newest[m_ent] - self.cap_ms)
            final = m_rows[:, MAXTS] < horizon
            first = np.searchsorted(m_ent, m_ent, side="left")
            inv = np.concatenate(([0], np.cumsum(m_ent[1:] != m_ent[:-1])))
            n_final = np.bincount(inv, weights=final).astype(np.int64)[inv]
            keep = ~final | (first + n_final - 1 - np.arange(len(m_ent)) < SLOTS)
            m_ent, m_rows = m_ent[keep], m_rows[keep]
            lo = np.searchsorted(m_ent, touched, side="left")
            hi = np.append(lo[1:], len(m_ent))
            bounds = np.append(lo, len(m_ent)).tolist()
            for i, e in enumerate(touched.tolist()):
                store[e] = m_rows[bounds[i] : bounds[i + 1]].copy()
            for j in range(SLOTS):  # the online value: the newest SLOTS sessions, oldest first
                at = hi - 1 - j
                has = at >= lo
                slots[has, (k + 1) * SLOTS - 1 - j] = m_rows[at[has]]
        return self._update(touched, slots)

    def _update(self, ents: np.ndarray, rows: np.ndarray | None = None, force: bool = False) -> TileUpdate:
        width, per = self.layout.width, SLOTS * len(self.gaps)
        if rows is None:
            rows = self.layout.empty(len(ents) * per).reshape(len(ents), per, width)
            for i, e in enumerate(ents.tolist()):
                for k in range(len(self.gaps)):
                    mine = self.sessions[k][e][-SLOTS:]
                    rows[i, (k + 1) * SLOTS - len(mine) : (k + 1) * SLOTS] = mine
        return TileUpdate(
            entities=[self.entities[e] for e in ents.tolist()],
            ops=self.ops[ents].copy(),
            rows=rows.reshape(-1, width),
            starts=np.arange(len(ents) + 1, dtype=np.int64) * per,
            rewrite=np.ones(len(ents), dtype=bool),
            max_ts=self.max_ts,
            positions=self.pos[ents].copy(),
            force=force,
        )

    def resync(self) -> TileUpdate:
        """Every entity's online value, applied whatever the store's guard: rebuilds a lost store."""
        return self._update(np.arange(len(self.entities), dtype=np.int64), force=True)

    def sessions_of(self, entity: str, gap_ms: int) -> np.ndarray:
        """Kept session rows of one entity for one gap (for inspection and tests)."""
        e = self.entity_index.get(entity)
        if e is None:
            return self.layout.empty(0)
        return self.sessions[self.gaps.index(gap_ms)][e].copy()

    def _entity_ids(self, keys: list[str]) -> np.ndarray:
        idx = self.entity_index
        out = np.empty(len(keys), dtype=np.int64)
        for i, k in enumerate(keys):
            e = idx.get(k)
            if e is None:
                e = idx[k] = len(self.entities)
                self.entities.append(k)
                for store in self.sessions:
                    store.append(self._no_rows)  # shared: entries are replaced, never changed
            out[i] = e
        if len(self.entities) > len(self.ops):
            grow = len(self.entities) * 2 - len(self.ops)
            self.ops = np.concatenate((self.ops, np.zeros(grow, dtype=np.int64)))
            self.newest = np.concatenate((self.newest, np.full(grow, -np.inf)))
            more = np.full((grow, self.pos.shape[1]), -1, dtype=np.int64)
            self.pos = np.concatenate((self.pos, more))
        return out


def finalize_session(layout: TileLayout, rows: np.ndarray, agg: Aggregation) -> tuple[np.ndarray, np.ndarray]:
    """(values, event times in ms) of ``agg`` over one session row per entity (N == 0: none).

    ``duration`` is last event time - first event time in seconds (0 for one event), null without
    a session; the others are :func:`engine.tiles.finalize`'s.
    """
    if agg.function == "duration":
        has = rows[:, N] > 0
        return np.where(has, (rows[:, MAXTS] - rows[:, TILE]) / 1000.0, np.nan), rows[:, MAXTS].copy()
    return finalize(layout, rows, agg), event_time(layout, rows, agg)


def online_session_values(
    view: FeatureView, blobs: list[bytes] | None, at_ms: int, aggs: list[Aggregation]
) -> FeatureValues:
    """Session features as of ``at_ms`` (at or after the entities' newest events: reads as of
    now) from each entity's online value ``blobs[i]`` (empty: no sessions)."""
    if blobs is None:
        raise StoreError(
            "session features need the entities' session values; read them from the session "
            "namespace (engine.sessions.session_namespace) and pass session_blobs="
        )
    layout = TileLayout.of(view)
    gaps = session_gaps(view)
    per = SLOTS * len(gaps)
    values = layout.empty(len(blobs) * per).reshape(len(blobs), per, layout.width)
    for i, blob in enumerate(blobs):
        if len(blob) == per * layout.row_bytes:
            values[i] = np.frombuffer(blob, dtype="<f8").reshape(per, layout.width)
    out: FeatureValues = {}
    for agg in aggs:
        gap = duration_ms(agg.window.size)
        k = gaps.index(gap)
        older, newer = values[:, k * SLOTS], values[:, k * SLOTS + 1]
        closed = (newer[:, N] > 0) & (newer[:, MAXTS] + gap <= at_ms)
        if agg.window.which == "last":  # the newest if it has ended, else the one before it
            rows = np.where(closed[:, None], newer, older)
        else:  # the newest if still open
            rows = np.where(((newer[:, N] > 0) & ~closed)[:, None], newer, layout.empty(len(newer)))
        out[agg.feature_name] = finalize_session(layout, rows, agg)
    return out


def point_in_time_session_values(
    view: FeatureView,
    events: pa.Table,
    entity: list[str],
    at_ms: np.ndarray,
    aggs: list[Aggregation],
) -> FeatureValues:
    """Session features for each (``entity[i]``, ``at_ms[i]``) from stored events up to it.

    ``events`` must hold each entity's whole history up to the latest row time: a session may
    have started long before.
    """
    layout = TileLayout.of(view)
    q = len(entity)
    at_ms = np.asarray(at_ms, dtype=np.int64)
    events, ecode, qcode, ts, cols = sorted_events(layout, events, entity)
    n = len(ts)
    tmin = int(min(ts.min() if n else 0, at_ms.min() if q else 0))
    span = int(max(ts.max() if n else 0, at_ms.max() if q else 0)) - tmin + 2
    if (int(ecode.max(initial=-1)) + 2) * span >= 2**62:  # distinct entities + 1
        raise StoreError("training set spans too many entities and too long a time at once; split entity_df")
    key = ecode * span + (ts - tmin)
    idx = np.searchsorted(key, qcode * span + (at_ms - tmin), side="right") - 1  # last event <= t
    safe = np.maximum(idx, 0)
    valid = (qcode >= 0) & (idx >= 0) & (ecode[safe] == qcode) if n else np.zeros(q, dtype=bool)
    out: FeatureValues = {}
    cache: dict[tuple[int, str | None], np.ndarray] = {}
    for agg in aggs:
        gap = duration_ms(agg.window.size)
        ck = (gap, agg.window.which)
        if ck not in cache:
            cache[ck] = _session_partials(layout, ecode, ts, cols, gap, idx, safe, valid, at_ms, agg)
        out[agg.feature_name] = finalize_session(layout, cache[ck], agg)
    return out


def _session_partials(
    layout: TileLayout,
    ecode: np.ndarray,
    ts: np.ndarray,
    cols: list[np.ndarray],
    gap: int,
    idx: np.ndarray,
    safe: np.ndarray,
    valid: np.ndarray,
    at_ms: np.ndarray,
    agg: Aggregation,
) -> np.ndarray:
    """One session row per query: its event range's partial, with the first event time as TILE."""
    q, n = len(idx), len(ts)
    if n == 0:
        return layout.empty(q)
    new = np.ones(n, dtype=bool)
    new[1:] = (ecode[1:] != ecode[:-1]) | (ts[1:] - ts[:-1] >= gap)
    sid = np.cumsum(new) - 1
    first_of = np.flatnonzero(new)
    last_of = np.append(first_of[1:] - 1, n - 1)
    s = sid[safe]
    is_open = valid & (at_ms - ts[safe] < gap)
    lo, hi = first_of[s], safe.copy()  # the newest session as of t, cut at t
    if agg.window.which == "last":
        prev = np.maximum(s - 1, 0)
        has_prev = (s >= 1) & (ecode[first_of[prev]] == ecode[safe])
        lo = np.where(is_open, first_of[prev], lo)
        hi = np.where(is_open, last_of[prev], hi)
        take = valid & (~is_open | has_prev)
    else:
        take = is_open
    lengths = np.where(take, hi - lo + 1, 0)
    partial = layout.empty(q)
    for chunk in _chunks(lengths):
        partial[chunk] = _combine_ranges(layout, lo[chunk], lengths[chunk], ts, cols)
    partial[:, TILE] = np.where(lengths > 0, ts[lo], np.nan)
    return partial
