"""Windows over tiles: window_tile_range + combine + finalize equal the oracle over the raw events."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.definitions import Aggregation, Window
from engine.tiles import TILE, combine, event_time, finalize, partials_from_events, window_tile_range
from tests.tiles_helpers import (
    LAYOUT,
    TILE_MS,
    WINDOWS,
    Events,
    aggs_for,
    assert_feature,
    events,
    in_window,
    incremental_state,
    oracle,
    oracle_event_time,
    splits,
    window_values,
)

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
