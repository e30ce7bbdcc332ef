"""TileState: pickling, eviction, ops and the online row log its updates describe."""

from __future__ import annotations

import pickle

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from engine.definitions import Aggregation, Window
from engine.state import TileState, TileUpdate
from engine.tiles import TILE, N
from tests.tiles_helpers import (
    BIG_RETENTION,
    COLUMNS,
    ENTITIES,
    LAYOUT,
    SETTINGS,
    TILE_MS,
    Events,
    OnlineLog,
    apply_batch,
    assert_rows_close,
    batch_partials,
    events,
    splits,
    state_partials,
    values,
    window_values,
)

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
