"""Property tests of the tile algebra: incremental == batch == a plain numpy oracle.

Every partial the stream keeps (built incrementally by :class:`engine.state.TileState`) must
equal the partial of the same events aggregated at once (:func:`engine.tiles.partials_from_events`),
and both, finalized over any window, must equal the aggregates computed straight from the raw
events by the definitions in ``engine/definitions.py`` and ``engine/tiles.py``.
Windows over tiles are in ``tests/test_tiles_windows.py``, TileState itself in ``tests/test_state.py``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engine.definitions import Aggregation, Window
from engine.tiles import MAXTS, TILE, N, combine, finalize, merge, partials_from_events
from tests.tiles_helpers import (
    ENTITIES,
    LAYOUT,
    SETTINGS,
    TILE_MS,
    Events,
    aggs_for,
    assert_feature,
    assert_rows_close,
    batch_partials,
    events,
    finalized,
    incremental_state,
    oracle,
    splits,
    state_partials,
)

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
