"""Shared by the tile tests: random events, the plain numpy oracle and TileState drivers.

The oracle computes every aggregate straight from the raw events by the definitions in
``engine/definitions.py`` and ``engine/tiles.py``; the helpers build partials incrementally
(:class:`engine.state.TileState`) or at once (:func:`engine.tiles.partials_from_events`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from engine.definitions import Aggregation, Window, duration_ms
from engine.state import TileState, TileUpdate
from engine.tiles import (
    CNT,
    HEAD,
    LAST,
    LTS,
    M2,
    MAX,
    MAXTS,
    MIN,
    PER_COLUMN,
    SUM,
    TILE,
    N,
    TileLayout,
    combine,
    event_time,
    finalize,
    partials_from_events,
    window_tile_range,
)

TILE_MS = 1000
COLUMNS = ("x", "y")
LAYOUT = TileLayout(columns=COLUMNS, tile_ms=TILE_MS)
ENTITIES = ("alice", "bob", "carol", "dave")
FUNCTIONS = ("count", "sum", "mean", "min", "max", "last", "stddev")
WINDOWS = (
    Window.sliding("5s"),
    Window.sliding("1s"),
    Window.tumbling("4s"),
    Window.hopping("6s", "2s"),
    Window.hopping("3s", "3s"),
)
BIG_RETENTION = 10**12

SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def aggs_for(window: Window) -> list[Aggregation]:
    out = [Aggregation(function="count", window=window)]
    for col in COLUMNS:
        out += [Aggregation(function=f, column=col, window=window) for f in FUNCTIONS]
    return out


# ---------------------------------------------------------------------------------------------
# events and the oracle


@dataclass
class Events:
    """Raw events in input order (position = arrival order)."""

    entity: np.ndarray  # object array of entity names
    ts: np.ndarray  # int64 ms
    cols: list[np.ndarray]  # float64, NaN = null

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, idx: np.ndarray | slice) -> Events:
        return Events(self.entity[idx], self.ts[idx], [c[idx] for c in self.cols])


def oracle(ev: Events, mask: np.ndarray, agg: Aggregation) -> float:
    """Feature value over the events selected by ``mask``, straight from the definition."""
    if agg.function == "count" and agg.column is None:
        return float(mask.sum())
    x = ev.cols[COLUMNS.index(agg.column)]
    sel = np.flatnonzero(mask & ~np.isnan(x))
    vals = x[sel]
    match agg.function:
        case "count":
            return float(len(vals))
        case "sum":
            return float(vals.sum()) if len(vals) else 0.0
        case "mean":
            return float(vals.mean()) if len(vals) else np.nan
        case "min":
            return float(vals.min()) if len(vals) else np.nan
        case "max":
            return float(vals.max()) if len(vals) else np.nan
        case "stddev":
            return float(np.std(vals, ddof=1)) if len(vals) >= 2 else np.nan
        case "last":
            if not len(sel):
                return np.nan
            # newest by ts; among equal ts the later input position
            best = max(sel.tolist(), key=lambda i: (ev.ts[i], i))
            return float(x[best])
    raise AssertionError(agg.function)


def oracle_event_time(ev: Events, mask: np.ndarray, agg: Aggregation) -> float:
    """Event time of the newest event behind the value, NaN when there is none."""
    if agg.column is None:
        sel = np.flatnonzero(mask)
    else:
        sel = np.flatnonzero(mask & ~np.isnan(ev.cols[COLUMNS.index(agg.column)]))
    return float(ev.ts[sel].max()) if len(sel) else np.nan


def in_window(window: Window, ts: np.ndarray, t: int, tile_ms: int = TILE_MS) -> np.ndarray:
    """Events of ``window`` as of ``t`` by the documented semantics (not via tile ranges)."""
    size = duration_ms(window.size)
    if window.kind == "sliding":
        return (ts <= t) & ((ts // tile_ms) * tile_ms > t - size)
    hop = duration_ms(window.hop_or_size)
    end = (t // hop) * hop
    return (ts >= end - size) & (ts < end)


def assert_feature(actual: float | np.ndarray, expected: float | np.ndarray, agg: Aggregation, what: str):
    if agg.function == "count":
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    elif agg.function in ("min", "max", "last"):
        # picks an existing value: exact
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    elif agg.function == "stddev":
        np.testing.assert_allclose(actual, expected, rtol=1e-7, atol=1e-6, equal_nan=True, err_msg=what)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-7, equal_nan=True, err_msg=what)


values = st.one_of(
    st.just(np.nan),
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    st.sampled_from([0.0, 1.0, -2.5, 7.0]),
)
# timestamps: random, plus values that collide and sit on tile edges
timestamps = st.one_of(
    st.integers(0, 20_000),
    st.sampled_from([0, 1, 999, 1000, 1001, 1999, 2000, 5000, 5999, 6000, 12_000]),
)


@st.composite
def events(draw, min_size: int = 0, max_size: int = 60) -> Events:
    n = draw(st.integers(min_size, max_size))
    ent = draw(st.lists(st.sampled_from(ENTITIES), min_size=n, max_size=n))
    ts = draw(st.lists(timestamps, min_size=n, max_size=n))
    cols = [draw(st.lists(values, min_size=n, max_size=n)) for _ in COLUMNS]
    return Events(
        np.array(ent, dtype=object),
        np.array(ts, dtype=np.int64),
        [np.array(c, dtype=np.float64) for c in cols],
    )


@st.composite
def splits(draw, n: int) -> list[slice]:
    """Random non-empty consecutive batches covering ``range(n)``."""
    if n == 0:
        return []
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=min(n - 1, 8))) if n > 1 else set()
    bounds = [0, *sorted(cuts), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def apply_batch(state: TileState, ev: Events) -> TileUpdate:
    keys = sorted(set(ev.entity.tolist()))
    # shuffle the key order a little so codes are not the same as the state's entity ids
    keys = keys[::-1]
    code_of = {k: i for i, k in enumerate(keys)}
    codes = np.array([code_of[e] for e in ev.entity.tolist()], dtype=np.int64)
    return state.apply(keys, codes, ev.ts.copy(), [c.copy() for c in ev.cols])


def incremental_state(ev: Events, batches: list[slice], retention: int = BIG_RETENTION) -> TileState:
    state = TileState(LAYOUT, retention)
    for s in batches:
        apply_batch(state, ev.take(s))
    return state


def batch_partials(ev: Events) -> dict[tuple[str, int], np.ndarray]:
    """One partial per (entity, tile) from all events at once."""
    names = sorted(set(ev.entity.tolist()))
    code = np.array([names.index(e) for e in ev.entity.tolist()], dtype=np.int64)
    tile_no = ev.ts // TILE_MS
    group = (code << 32) | tile_no
    keys, rows = partials_from_events(LAYOUT, group, tile_no, ev.ts, ev.cols)
    return {(names[int(k >> 32)], int(k & 0xFFFFFFFF)): rows[i] for i, k in enumerate(keys.tolist())}


def state_partials(state: TileState) -> dict[tuple[str, int], np.ndarray]:
    out = {}
    for name in state.entities:
        for row in state.tiles_of(name):
            key = (name, int(row[TILE]))
            assert key not in out, f"two rows for {key}"
            out[key] = row
    return out


def finalized(row: np.ndarray, agg: Aggregation) -> float:
    return float(finalize(LAYOUT, row[None, :], agg)[0])


def assert_rows_close(a: np.ndarray, b: np.ndarray, what: str, skip_tile: bool = False) -> None:
    """Partials agree: counts, times, min/max/last exactly; sums and m2 to rounding."""
    a = np.atleast_2d(a)
    b = np.atleast_2d(b)
    exact = [N, MAXTS]
    approx = []
    for c in range(len(COLUMNS)):
        o = HEAD + PER_COLUMN * c
        exact += [o + CNT, o + MIN, o + MAX, o + LTS, o + LAST]
        approx += [o + SUM, o + M2]
    if not skip_tile:
        exact.append(TILE)
    np.testing.assert_array_equal(a[:, exact], b[:, exact], err_msg=what)
    np.testing.assert_allclose(a[:, approx], b[:, approx], rtol=1e-9, atol=1e-6, err_msg=what)


def window_values(rows: np.ndarray, agg: Aggregation, t: int) -> tuple[float, float]:
    """One entity's value at ``t`` from its tile rows: window_tile_range + combine + finalize."""
    lo, hi, _ = window_tile_range(agg, TILE_MS, np.array([t]))
    sel = rows[(rows[:, TILE] >= lo[0]) & (rows[:, TILE] <= hi[0])]
    partial = combine(LAYOUT, sel, np.zeros(len(sel), dtype=np.int64), 1)
    return float(finalize(LAYOUT, partial, agg)[0]), float(event_time(LAYOUT, partial, agg)[0])


class OnlineLog:
    """The online store's per-entity row log, as documented in connectors/redis_store.py:
    rows are appended, or replace the log where ``rewrite``; the newest row of a tile wins."""

    def __init__(self) -> None:
        self.log: dict[str, np.ndarray] = {}
        self.ops: dict[str, int] = {}

    def write(self, u: TileUpdate) -> None:
        assert len(u.starts) == len(u.entities) + 1
        assert u.starts[0] == 0 and u.starts[-1] == len(u.rows)
        for i, name in enumerate(u.entities):
            block = u.rows[u.starts[i] : u.starts[i + 1]]
            ops = int(u.ops[i])
            assert ops >= self.ops.get(name, 0), "ops moved back"
            self.ops[name] = ops
            if u.rewrite[i] or name not in self.log:
                self.log[name] = block.copy()
            else:
                self.log[name] = np.concatenate([self.log[name], block])

    def current(self, name: str) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for row in self.log.get(name, LAYOUT.empty(0)):
            out[int(row[TILE])] = row
        return out
