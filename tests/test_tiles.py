"""Property tests of the tile algebra: incremental == batch == a plain numpy oracle.

Every partial the stream keeps (built incrementally by :class:`engine.state.TileState`) must
equal the partial of the same events aggregated at once (:func:`engine.tiles.partials_from_events`),
and both, finalized over any window, must equal the aggregates computed straight from the raw
events by the definitions in ``engine/definitions.py`` and ``engine/tiles.py``.
"""

from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
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
    merge,
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


# ---------------------------------------------------------------------------------------------
# incremental == batch == oracle, per tile


@SETTINGS
@given(data=st.data(), ev=events())
def test_incremental_equals_batch_equals_oracle(data, ev: Events) -> None:
    batches = data.draw(splits(len(ev)))
    state = incremental_state(ev, batches)
    inc = state_partials(state)
    bat = batch_partials(ev)
    assert sorted(inc) == sorted(bat)
    tile_no = ev.ts // TILE_MS
    all_aggs = aggs_for(Window.sliding("1s"))
    for key, row in bat.items():
        assert_rows_close(inc[key], row, f"incremental vs batch for {key}")
        mask = (ev.entity == key[0]) & (tile_no == key[1])
        assert row[N] == mask.sum()
        assert row[MAXTS] == ev.ts[mask].max()
        for agg in all_aggs:
            exp = oracle(ev, mask, agg)
            assert_feature(finalized(row, agg), exp, agg, f"batch {agg.feature_name} {key}")
            assert_feature(finalized(inc[key], agg), exp, agg, f"incremental {agg.feature_name} {key}")
    # ops count every event applied per entity
    for name in set(ev.entity.tolist()):
        assert state.ops[state.entity_index[name]] == (ev.entity == name).sum()


@SETTINGS
@given(ev=events(min_size=1), perm_seed=st.integers(0, 2**32 - 1))
def test_batch_partials_independent_of_input_order_except_last_ties(ev: Events, perm_seed: int) -> None:
    """Reordering events with distinct timestamps per (entity, tile) changes no partial."""
    # make timestamps unique so that 'last' has no ties
    ev = Events(ev.entity, np.arange(len(ev), dtype=np.int64) * 137 + ev.ts % 7, ev.cols)
    perm = np.random.default_rng(perm_seed).permutation(len(ev))
    a = batch_partials(ev)
    b = batch_partials(ev.take(perm))
    assert sorted(a) == sorted(b)
    for k in a:
        assert_rows_close(a[k], b[k], f"permuted {k}")


def test_last_ties_take_later_event_in_input_order() -> None:
    ev = Events(
        np.array(["a", "a", "a", "a"], dtype=object),
        np.array([5800, 5800, 5200, 5800], dtype=np.int64),
        [np.array([1.0, 2.0, 3.0, np.nan]), np.array([np.nan, np.nan, 9.0, np.nan])],
    )
    last_x = Aggregation(function="last", column="x", window="1s")
    last_y = Aggregation(function="last", column="y", window="1s")
    # at once
    (row,) = batch_partials(ev).values()
    assert finalized(row, last_x) == 2.0  # the NaN at index 3 is skipped, index 1 is the later tie
    assert finalized(row, last_y) == 9.0
    # one event per batch
    state = incremental_state(ev, [slice(i, i + 1) for i in range(4)])
    (inc,) = state_partials(state).values()
    assert finalized(inc, last_x) == 2.0
    assert finalized(inc, last_y) == 9.0
    # in reverse order the earlier-listed tie wins
    (rev,) = batch_partials(ev.take(np.array([3, 2, 1, 0]))).values()
    assert finalized(rev, last_x) == 1.0


def test_empty_partials_finalize_to_zero_or_null() -> None:
    empty = LAYOUT.empty(3)
    for agg in aggs_for(Window.sliding("5s")):
        got = finalize(LAYOUT, empty, agg)
        if agg.function in ("count", "sum"):
            np.testing.assert_array_equal(got, 0.0)
        else:
            assert np.isnan(got).all(), agg.feature_name


def test_stddev_needs_two_values_and_is_sample_stddev() -> None:
    ev = Events(
        np.array(["a"] * 3, dtype=object),
        np.array([0, 10, 20], dtype=np.int64),
        [np.array([2.0, np.nan, 4.0]), np.array([5.0, np.nan, np.nan])],
    )
    (row,) = batch_partials(ev).values()
    sx = Aggregation(function="stddev", column="x", window="1s")
    sy = Aggregation(function="stddev", column="y", window="1s")
    cy = Aggregation(function="count", column="y", window="1s")
    ce = Aggregation(function="count", window="1s")
    assert np.isclose(finalized(row, sx), np.sqrt(2.0))  # ddof=1: ((2-3)^2 + (4-3)^2) / 1
    assert np.isnan(finalized(row, sy))
    assert finalized(row, cy) == 1.0
    assert finalized(row, ce) == 3.0


# ---------------------------------------------------------------------------------------------
# merge and combine algebra


def rows_for_groups(ev: Events, n_groups: int, tile: int = 7) -> np.ndarray:
    """Partials of ``ev`` by entity index into ``n_groups`` aligned rows (absent -> identity)."""
    code = np.array([ENTITIES.index(e) for e in ev.entity.tolist()], dtype=np.int64)
    out = LAYOUT.empty(n_groups)
    out[:, TILE] = tile
    if len(ev):
        keys, rows = partials_from_events(LAYOUT, code, np.full(len(ev), tile), ev.ts, ev.cols)
        out[keys] = rows
    return out


@SETTINGS
@given(a=events(), b=events(), c=events())
def test_merge_is_associative_with_empty_identity(a: Events, b: Events, c: Events) -> None:
    k = len(ENTITIES)
    ra, rb, rc = rows_for_groups(a, k), rows_for_groups(b, k), rows_for_groups(c, k)
    left = merge(LAYOUT, merge(LAYOUT, ra, rb), rc)
    right = merge(LAYOUT, ra, merge(LAYOUT, rb, rc))
    assert_rows_close(left, right, "associativity")
    empty = LAYOUT.empty(k)
    # left identity: exactly how TileState merges into new rows
    assert_rows_close(merge(LAYOUT, empty, ra), ra, "empty . a", skip_tile=True)
    np.testing.assert_array_equal(merge(LAYOUT, empty, ra)[:, TILE], ra[:, TILE])
    # right identity on every aggregate
    assert_rows_close(merge(LAYOUT, ra, empty), ra, "a . empty", skip_tile=True)
    # merging equals aggregating the concatenated events (b after a, c after b)
    whole = Events(
        np.concatenate([a.entity, b.entity, c.entity]),
        np.concatenate([a.ts, b.ts, c.ts]),
        [np.concatenate(cs) for cs in zip(a.cols, b.cols, c.cols, strict=True)],
    )
    assert_rows_close(left, rows_for_groups(whole, k), "merge vs all events")


@SETTINGS
@given(ev=events())
def test_combine_over_tiles_equals_one_partial(ev: Events) -> None:
    names = list(ENTITIES)
    code = np.array([names.index(e) for e in ev.entity.tolist()], dtype=np.int64)
    tile_no = ev.ts // TILE_MS
    keys, tiles = partials_from_events(LAYOUT, (code << 32) | tile_no, tile_no, ev.ts, ev.cols)
    combined = combine(LAYOUT, tiles, keys >> 32, len(names))
    assert np.isnan(combined[:, TILE]).all() or len(tiles) == 0
    whole = rows_for_groups(ev, len(names))
    assert_rows_close(combined, whole, "combine vs one partial", skip_tile=True)
    # and finalized values equal the oracle per entity
    for agg in aggs_for(Window.sliding("1s")):
        got = finalize(LAYOUT, combined, agg)
        for i, name in enumerate(names):
            exp = oracle(ev, ev.entity == name, agg)
            assert_feature(got[i], exp, agg, f"{agg.feature_name} {name}")


def test_combine_of_nothing_is_empty() -> None:
    out = combine(LAYOUT, LAYOUT.empty(0), np.zeros(0, dtype=np.int64), 3)
    np.testing.assert_array_equal(out, LAYOUT.empty(3))


# ---------------------------------------------------------------------------------------------
# windows: window_tile_range + combine + finalize == oracle


def read_times(ev: Events, extra: list[int]) -> list[int]:
    """Read times on and around events, tile and hop edges, and long after the last event."""
    base = {0, 1, 999, 1000, 1001, 2000, 3999, 4000, 5999, 6000, 6001, 11_999, 12_000, 25_000, 10**6}
    for t in ev.ts.tolist()[:20]:
        base |= {t, t - 1, t + 1, (t // TILE_MS) * TILE_MS, (t // TILE_MS + 1) * TILE_MS - 1}
    last = int(ev.ts.max()) if len(ev) else 0
    base |= {last + 4_999, last + 5_000, last + 6_000, last + 12_000, last + 10**5}
    return sorted(t for t in base | set(extra) if t >= 0)


def window_values(rows: np.ndarray, agg: Aggregation, t: int) -> tuple[float, float]:
    """One entity's value at ``t`` from its tile rows: window_tile_range + combine + finalize."""
    lo, hi, _ = window_tile_range(agg, TILE_MS, np.array([t]))
    sel = rows[(rows[:, TILE] >= lo[0]) & (rows[:, TILE] <= hi[0])]
    partial = combine(LAYOUT, sel, np.zeros(len(sel), dtype=np.int64), 1)
    return float(finalize(LAYOUT, partial, agg)[0]), float(event_time(LAYOUT, partial, agg)[0])


def window_partials_from_rows(rows: np.ndarray, agg: Aggregation, times: np.ndarray) -> np.ndarray:
    """Partials of one entity's stored tiles for every read time at once."""
    lo, hi, _ = window_tile_range(agg, TILE_MS, times)
    tiles = rows[:, TILE]
    pair = (tiles[None, :] >= lo[:, None]) & (tiles[None, :] <= hi[:, None])
    qi, ri = np.nonzero(pair)
    return combine(LAYOUT, rows[ri], qi, len(times))


def window_partials_from_events(ev: Events, agg: Aggregation, times: np.ndarray) -> np.ndarray:
    """Partials per read time from tiles of only the events up to that time (sliding heads)."""
    lo, hi, _ = window_tile_range(agg, TILE_MS, times)
    tile_no = ev.ts // TILE_MS
    pair = (tile_no[None, :] >= lo[:, None]) & (tile_no[None, :] <= hi[:, None])
    pair &= ev.ts[None, :] <= times[:, None]
    qi, ei = np.nonzero(pair)
    if len(qi) == 0:
        return LAYOUT.empty(len(times))
    keys, tiles = partials_from_events(
        LAYOUT, (qi << 32) | tile_no[ei], tile_no[ei], ev.ts[ei], [c[ei] for c in ev.cols]
    )
    return combine(LAYOUT, tiles, keys >> 32, len(times))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ev=events(max_size=40), extra=st.lists(st.integers(0, 30_000), max_size=5))
def test_windows_from_tiles_equal_oracle(data, ev: Events, extra: list[int]) -> None:
    state = incremental_state(ev, data.draw(splits(len(ev))))
    names = [*sorted(set(ev.entity.tolist())), "nobody"]
    times = np.array(read_times(ev, extra), dtype=np.int64)
    for window in WINDOWS:
        aggs = aggs_for(window)
        for name in names:
            mine = ev.entity == name
            if window.kind == "sliding":
                # the head tile may hold events after t: aggregate only events up to t
                partial = window_partials_from_events(ev.take(mine), aggs[0], times)
            else:
                # hopping windows end at or before t on a tile edge: whole stored tiles,
                # including tiles after t, must not leak in
                partial = window_partials_from_rows(state.tiles_of(name), aggs[0], times)
            truth = [mine & in_window(window, ev.ts, int(t)) for t in times.tolist()]
            for agg in aggs:
                what = f"{agg.feature_name} {name} at {times.tolist()}"
                exp = np.array([oracle(ev, m, agg) for m in truth])
                assert_feature(finalize(LAYOUT, partial, agg), exp, agg, what)
                exp_ts = np.array([oracle_event_time(ev, m, agg) for m in truth])
                np.testing.assert_array_equal(event_time(LAYOUT, partial, agg), exp_ts, err_msg=what)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ev=events(min_size=1, max_size=40))
def test_sliding_from_stored_tiles_exact_at_or_after_newest_event(data, ev: Events) -> None:
    """Online reads take the newest tile whole; exact whenever t >= the entity's newest event."""
    state = incremental_state(ev, data.draw(splits(len(ev))))
    for name in sorted(set(ev.entity.tolist())):
        mine = ev.entity == name
        newest = int(ev.ts[mine].max())
        rows = state.tiles_of(name)
        edge = (newest // TILE_MS + 1) * TILE_MS
        times = np.array([newest, newest + 1, edge - 1, edge, newest + 4_000, newest + 5_000, newest + 6_000])
        for window in WINDOWS:
            aggs = aggs_for(window)
            partial = window_partials_from_rows(rows, aggs[0], times)
            truth = [mine & in_window(window, ev.ts, int(t)) for t in times.tolist()]
            for agg in aggs:
                exp = np.array([oracle(ev, m, agg) for m in truth])
                assert_feature(finalize(LAYOUT, partial, agg), exp, agg, f"{agg.feature_name} {name} {times}")


def test_windows_expire_to_zero_and_null() -> None:
    ev = Events(
        np.array(["a", "a"], dtype=object),
        np.array([1_500, 2_500], dtype=np.int64),
        [np.array([3.0, 5.0]), np.array([1.0, np.nan])],
    )
    state = incremental_state(ev, [slice(0, 2)])
    rows = state.tiles_of("a")
    for window in WINDOWS:
        for agg in aggs_for(window):
            got, got_ts = window_values(rows, agg, 100_000)
            if agg.function in ("count", "sum"):
                assert got == 0.0, agg.feature_name
            else:
                assert np.isnan(got), agg.feature_name
            assert np.isnan(got_ts)
    # and while live they are not empty
    s5 = Aggregation(function="sum", column="x", window=Window.sliding("5s"))
    assert window_values(rows, s5, 2_500)[0] == 8.0
    assert window_values(rows, s5, 5_999)[0] == 8.0  # tile 1 starts at 1000 > 5999 - 5000
    assert window_values(rows, s5, 6_000)[0] == 5.0  # tile 1 starts at 1000, not > 1000
    assert window_values(rows, s5, 7_000)[0] == 0.0


def test_window_tile_range_boundaries() -> None:
    sliding = Aggregation(function="count", window=Window.sliding("5s"))
    lo, hi, head = window_tile_range(sliding, TILE_MS, np.array([5_000, 5_999, 6_000]))
    assert head is True
    assert lo.tolist() == [1, 1, 2]
    assert hi.tolist() == [5, 5, 6]
    hopping = Aggregation(function="count", window=Window.hopping("6s", "2s"))
    lo, hi, head = window_tile_range(hopping, TILE_MS, np.array([7_999, 8_000, 8_001]))
    assert head is False
    # E = 6000, 8000, 8000 -> tiles [E-6s, E) -> [0, 5], [2, 7], [2, 7]
    assert lo.tolist() == [0, 2, 2]
    assert hi.tolist() == [5, 7, 7]
    tumbling = Aggregation(function="count", window=Window.tumbling("4s"))
    lo, hi, _ = window_tile_range(tumbling, TILE_MS, np.array([3_999, 4_000]))
    assert lo.tolist() == [-4, 0]
    assert hi.tolist() == [-1, 3]


# ---------------------------------------------------------------------------------------------
# TileState: pickling, eviction, ops


def assert_updates_equal(a: TileUpdate, b: TileUpdate) -> None:
    assert a.entities == b.entities
    np.testing.assert_array_equal(a.ops, b.ops)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.starts, b.starts)
    np.testing.assert_array_equal(a.rewrite, b.rewrite)
    assert a.max_ts == b.max_ts


@SETTINGS
@given(data=st.data(), ev=events(min_size=2), retention=st.sampled_from([3_000, 8_000, BIG_RETENTION]))
def test_tile_state_survives_pickle(data, ev: Events, retention: int) -> None:
    cut = data.draw(st.integers(1, len(ev) - 1))
    state = TileState(LAYOUT, retention)
    for s in data.draw(splits(cut)):
        apply_batch(state, ev.take(s))
    restored = pickle.loads(pickle.dumps(state))
    assert state_partials(restored).keys() == state_partials(state).keys()
    rest = ev.take(slice(cut, None))
    for s in data.draw(splits(len(rest))):
        u1 = apply_batch(state, rest.take(s))
        u2 = apply_batch(restored, rest.take(s))
        assert_updates_equal(u1, u2)
    p1, p2 = state_partials(state), state_partials(restored)
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])


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


def test_eviction_removes_old_tiles() -> None:
    state = TileState(LAYOUT, retention_ms=10_000)
    online = OnlineLog()
    first = Events(
        np.array(["a", "b", "a", "b", "a"], dtype=object),
        np.array([0, 1_000, 2_500, 3_000, 4_999], dtype=np.int64),
        [np.arange(5, dtype=np.float64), np.zeros(5)],
    )
    u1 = apply_batch(state, first)
    online.write(u1)
    assert sorted(state_partials(state)) == [("a", 0), ("a", 2), ("a", 4), ("b", 1), ("b", 3)]
    assert sorted(u1.entities) == ["a", "b"]
    assert len(u1) == 2
    assert int(u1.ops[u1.entities.index("a")]) == 3
    assert int(u1.ops[u1.entities.index("b")]) == 2
    # far beyond retention: everything older than (100000 - 10000) // 1000 = tile 90 goes
    second = Events(
        np.array(["a"], dtype=object), np.array([100_000], dtype=np.int64), [np.array([1.0]), np.array([1.0])]
    )
    u2 = apply_batch(state, second)
    online.write(u2)
    assert state.tiles_of("b").shape == (0, LAYOUT.width)
    assert state.tiles_of("a")[:, TILE].tolist() == [100.0]
    assert sorted(state_partials(state)) == [("a", 100)]
    assert u2.entities == ["a"]
    assert int(u2.ops[0]) == 4  # ops keep counting across eviction
    # a new event for b starts a fresh tile; its ops still count the evicted events
    third = Events(
        np.array(["b"], dtype=object),
        np.array([100_500], dtype=np.int64),
        [np.array([2.0]), np.array([np.nan])],
    )
    u3 = apply_batch(state, third)
    online.write(u3)
    assert u3.entities == ["b"]
    assert int(u3.ops[0]) == 3
    rows_b = state.tiles_of("b")
    assert rows_b[:, TILE].tolist() == [100.0]
    assert rows_b[0, N] == 1
    # the state still reads correctly after compaction
    s = Aggregation(function="sum", column="x", window=Window.sliding("5s"))
    assert window_values(state.tiles_of("a"), s, 100_000)[0] == 1.0
    assert window_values(state.tiles_of("b"), s, 100_500)[0] == 2.0
    # and so does the online log, old tiles and all
    for name, t in (("a", 100_000), ("b", 100_500)):
        rows = np.array(list(online.current(name).values()))
        assert window_values(rows, s, t)[0] == window_values(state.tiles_of(name), s, t)[0]


def test_log_rewrite_drops_evicted_tiles() -> None:
    """Appending one new tile per batch, the log is rewritten to the live tiles once it is long."""
    state = TileState(LAYOUT, retention_ms=5_000)
    online = OnlineLog()
    rewrites = 0
    for i in range(200):
        ev = Events(
            np.array(["a"], dtype=object),
            np.array([i * 1_000], dtype=np.int64),
            [np.array([float(i)]), np.array([1.0])],
        )
        u = apply_batch(state, ev)
        online.write(u)
        assert u.entities == ["a"]
        assert int(u.ops[0]) == i + 1
        live = state.tiles_of("a")
        if u.rewrite[0]:
            rewrites += 1
            # a rewrite carries exactly the live tiles
            np.testing.assert_array_equal(u.rows, live)
        # the log stays bounded by twice the live tiles plus slack
        assert len(online.log["a"]) <= 2 * len(live) + 16
        assert len(live) <= 5 + 1 + state.slack_tiles
        # every live tile's newest log row is its state row
        current = online.current("a")
        for row in live:
            np.testing.assert_array_equal(current[int(row[TILE])], row)
    assert rewrites > 0
    # after the last rewrite, evicted tiles are gone from the log too
    assert min(online.current("a")) >= (199_000 - 5_000) // 1_000 - state.slack_tiles - 16


@st.composite
def advancing_stream(draw) -> list[Events]:
    """Batches whose times mostly advance, with some stragglers, over several retentions."""
    out = []
    now = 0
    for _ in range(draw(st.integers(1, 15))):
        now += draw(st.integers(0, 9_000))
        n = draw(st.integers(1, 12))
        ent = draw(st.lists(st.sampled_from(ENTITIES), min_size=n, max_size=n))
        ts = [max(0, now - draw(st.integers(0, 4_000))) for _ in range(n)]
        cols = [draw(st.lists(values, min_size=n, max_size=n)) for _ in COLUMNS]
        out.append(
            Events(
                np.array(ent, dtype=object),
                np.array(ts, dtype=np.int64),
                [np.array(c, dtype=np.float64) for c in cols],
            )
        )
    return out


@SETTINGS
@given(stream=advancing_stream(), retention=st.sampled_from([2_000, 5_000, 20_000]))
def test_eviction_invariants(stream: list[Events], retention: int) -> None:
    state = TileState(LAYOUT, retention)
    online = OnlineLog()
    applied: dict[str, int] = {}
    max_ts = -np.inf
    seen: list[Events] = []
    for batch in stream:
        before = set(state_partials(state))
        u = apply_batch(state, batch)
        online.write(u)
        seen.append(batch)
        max_ts = max(max_ts, float(batch.ts.max()))
        horizon = (max_ts - retention) // TILE_MS
        after = set(state_partials(state))
        new_keys = {
            (e, int(t)) for e, t in zip(batch.entity.tolist(), (batch.ts // TILE_MS).tolist(), strict=True)
        }
        gone = (before | new_keys) - after
        # only tiles behind the horizon are evicted, and then all of them
        assert all(t < horizon for _, t in gone), "evicted a tile inside retention"
        assert {k for k in before | new_keys if k[1] >= horizon} <= after
        # nothing older than horizon - slack survives
        assert all(t >= horizon - state.slack_tiles for _, t in after)
        # ops: monotonic (checked by OnlineLog) and equal to the events applied per entity
        for name in batch.entity.tolist():
            applied[name] = applied.get(name, 0) + 1
        for name, ops in zip(u.entities, u.ops.tolist(), strict=True):
            assert ops == applied[name]
        assert sorted(u.entities) == sorted(set(batch.entity.tolist()))
        assert u.max_ts == max_ts
        # changed rows come grouped by entity: appends are exactly the changed tiles,
        # rewrites exactly the live ones
        for i, name in enumerate(u.entities):
            block = u.rows[u.starts[i] : u.starts[i + 1]]
            got = {int(r[TILE]) for r in block}
            assert len(got) == len(block)
            if u.rewrite[i]:
                assert got == {t for e, t in after if e == name}
            else:
                assert got == {t for e, t in new_keys if e == name}
        # every live tile's newest online row equals the state's row, and equals the batch
        # partial of all events of that (entity, tile) so far
        everything = Events(
            np.concatenate([b.entity for b in seen]),
            np.concatenate([b.ts for b in seen]),
            [np.concatenate([b.cols[c] for b in seen]) for c in range(len(COLUMNS))],
        )
        truth = batch_partials(everything)
        parts = state_partials(state)
        for key in after:
            row = parts[key]
            np.testing.assert_array_equal(online.current(key[0])[key[1]], row)
            if key[1] >= horizon:  # so never evicted and re-created
                assert_rows_close(row, truth[key], f"state vs all events {key}")
        for name in online.log:
            assert state.logged[state.entity_index[name]] == len(online.log[name])
