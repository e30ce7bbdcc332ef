"""TileState's sorted-array index gives exactly the updates of the dict/list form it replaced.

Random scripts over many entities mix batches (late events, several partitions, with and without
offsets), eviction as event time advances, rewrites of named entities (unknown and repeated
names too), resyncs, entities idle past their keys' TTL, pickle and deepcopy round trips, and
restores from a pickle of the old form taken mid-stream. After every step the two states must
have produced the same TileUpdate (rows, starts, rewrite flags, positions, ops, object records)
and hold the same tiles, log lengths and object tiles.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engine.state import TileState
from engine.tiles import TileLayout
from tests.aggregations_helpers import view
from tests.test_state_reference import ReferenceTileState, _same, legacy_pickle
from tests.tiles_helpers import BIG_RETENTION, LAYOUT, SETTINGS

OBJECTS = TileLayout.of(view())  # a view with object aggregations (text and numeric)
TTL = 10**9  # nothing goes stale by the wall clock in a test; "idle" steps age entities by hand


@st.composite
def scripts(draw) -> list[tuple]:
    """Steps: ("apply", now, seed, entities, with_offsets) | ("rewrite", names) | ("resync",)
    | ("idle", names) | ("copy", how)."""
    steps, now = [], 0
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["apply"] * 6 + ["rewrite", "resync", "idle", "copy"]))
        if kind == "apply":
            now += draw(st.integers(0, 7_000))
            steps.append(
                ("apply", now, draw(st.integers(0, 2**32)), draw(st.integers(1, 80)), draw(st.booleans()))
            )
        elif kind in ("rewrite", "idle"):
            steps.append((kind, draw(st.lists(st.integers(0, 90), max_size=12))))
        elif kind == "copy":
            steps.append(("copy", draw(st.sampled_from(["pickle", "deepcopy", "legacy"]))))
        else:
            steps.append(("resync",))
    return steps


def _batch(layout: TileLayout, now: int, seed: int, entities: int, offsets: bool, next_offset: list[int]):
    """Events of up to ``entities`` names, up to 3 s behind ``now``; some far behind (late, or
    behind the eviction horizon); ties in time; nulls."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    pick = rng.integers(0, entities, n)
    names = sorted({f"e{i}" for i in pick.tolist()})[::-1]  # codes unrelated to the state's ids
    codes = rng.integers(0, len(names), n)
    late = rng.random(n) < 0.15
    ts = np.maximum(0, now - rng.integers(0, 3_000, n) - late * rng.integers(0, 40_000, n))
    ts = np.where(rng.random(n) < 0.2, now - now % 1_000, ts)  # tile edges and ties
    text = [None if v < 0.2 else f"t{int(v * 7)}" for v in rng.random(n).tolist()]
    x = np.where(rng.random(n) < 0.2, np.nan, rng.choice([-2.0, 0.0, 1.5, 3.0], n) + rng.random(n))
    m = np.array([np.nan if t is None else 0.0 for t in text])
    cols = [m if c == "m" else x * (1 + i) for i, c in enumerate(layout.columns)]
    part = int(rng.integers(0, 3))
    off = None
    if offsets:
        off = next_offset[part] + np.sort(rng.integers(0, 3 * n, n))
        next_offset[part] = int(off[-1]) + 1
    return names, codes, ts, cols, part, off, {"m": text} if layout.objects else None


def _same_state(a: TileState, b: ReferenceTileState) -> None:
    assert a.entities == b.entities and a.n == b.n
    e = len(b.entities)
    for f in ("ops", "live", "logged"):
        np.testing.assert_array_equal(getattr(a, f)[:e], getattr(b, f)[:e], err_msg=f)
    np.testing.assert_array_equal(a.pos[:e], b.pos[:e])
    for name in b.entities:
        np.testing.assert_array_equal(a.tiles_of(name), b.tiles_of(name))
    assert a.index == b.index
    assert a.objects.keys() == b.objects.keys()


def _run(layout: TileLayout, retention: int, script: list[tuple], side: int) -> None:
    """``side``: how many new keys the index's side level takes before it merges into the main
    one (small, so scripts cross that merge often)."""
    new, ref = TileState(layout, retention, TTL), ReferenceTileState(layout, retention, TTL)
    new.tile_index.SIDE_MIN = side
    next_offset = [0, 0, 0]
    for step in script:
        if step[0] == "apply":
            batch = _batch(layout, *step[1:], next_offset)
            _same(new.apply(*copy.deepcopy(batch)), ref.apply(*copy.deepcopy(batch)))
        elif step[0] == "rewrite":
            names = [f"e{i}" for i in step[1]]
            _same(new.rewrite(names), ref.rewrite(names))
        elif step[0] == "resync":
            _same(new.resync(), ref.resync())
        elif step[0] == "idle":  # these entities' last write was long ago: their keys may be gone
            ids = [ref.entity_index[f"e{i}"] for i in step[1] if f"e{i}" in ref.entity_index]
            new.written[ids] = ref.written[ids] = 0.0
        elif step[1] == "pickle":
            new = pickle.loads(pickle.dumps(new))
        elif step[1] == "deepcopy":
            new = copy.deepcopy(new)
        else:  # a snapshot the dict/list form wrote, restored by this one
            new = pickle.loads(legacy_pickle(ref))
            new.tile_index.SIDE_MIN = side
            ref = pickle.loads(pickle.dumps(ref))
        _same_state(new, ref)


sides = st.sampled_from([0, 1, 7, 64, 4096])


@SETTINGS
@given(script=scripts(), retention=st.sampled_from([2_000, 5_000, 20_000, BIG_RETENTION]), side=sides)
def test_updates_equal_the_dict_index_form(script: list[tuple], retention: int, side: int) -> None:
    _run(LAYOUT, retention, script, side)


@SETTINGS
@given(script=scripts(), retention=st.sampled_from([3_000, 12_000]), side=sides)
def test_updates_equal_the_dict_index_form_with_object_tiles(
    script: list[tuple], retention: int, side: int
) -> None:
    _run(OBJECTS, retention, script, side)


def test_a_live_tile_costs_its_row_and_twelve_bytes_of_index() -> None:
    """The index is two flat arrays (no Python object per tile), and a snapshot holds the live
    rows only, not the capacity grown for new tiles."""
    state = TileState(LAYOUT, BIG_RETENTION)
    rng = np.random.default_rng(5)
    names = [f"e{i}" for i in range(500)]
    for b in range(20):
        ts = rng.integers(b * 60_000, (b + 1) * 60_000, 5_000)
        state.apply(names, rng.integers(0, 500, 5_000), ts, [rng.random(5_000), rng.random(5_000)])
    assert state.n > 20_000 and len(state.rows) > state.n
    assert state.tile_index.nbytes == 12 * state.n
    assert not [v for v in vars(state).values() if isinstance(v, dict) and len(v) >= state.n]
    snap = copy.deepcopy(state)
    assert len(snap.rows) == state.n
    np.testing.assert_array_equal(snap.rows, state.rows[: state.n])
    for name in names[:50]:
        np.testing.assert_array_equal(snap.tiles_of(name), state.tiles_of(name))
