"""The online store's position guard on real Redis: replays in any partition interleaving, after a
restart with or without a snapshot, and a Redis that lost its data, all converge to the oracle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.redis_store import RedisOnlineStore
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from engine.reads import online_values
from engine.state import TileState, TileUpdate
from engine.tiles import TileLayout
from tests.conftest import Services
from tests.support import unique

VIEW = FeatureView(
    name="guard",
    entity=Entity(name="user", join_keys=("user_id",)),
    source=EventSource(
        name="tx",
        topic="tx",
        timestamp_field="ts",
        fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float")),
    ),
    aggregations=(
        Aggregation(function="sum", column="amount", window="1d"),
        Aggregation(function="count", window="1d"),
        Aggregation(function="max", column="amount", window="1d"),
    ),
    tile_size="1m",
    allowed_lateness="1d",
)
LAYOUT = TileLayout.of(VIEW)
T0 = 1_700_000_000_000
RETENTION = 3 * 86_400_000
TTL = 600_000
ENTITIES = ["a", "b", "c"]


@pytest.fixture
def store(services: Services) -> RedisOnlineStore:
    s = RedisOnlineStore(services.redis_url, unique("guard"))
    yield s
    s.delete_namespace(s.namespace(VIEW.name, VIEW.version))
    s.client.close()


def _batch(
    state: TileState, partition: int, offsets: list[int], events: list[tuple[str, int, float]]
) -> TileUpdate:
    keys = sorted({e for e, _, _ in events})
    codes = np.array([keys.index(e) for e, _, _ in events], dtype=np.int64)
    ts = np.array([t for _, t, _ in events], dtype=np.int64)
    amounts = np.array([a for _, _, a in events], dtype=np.float64)
    return state.apply(keys, codes, ts, [amounts], partition, np.asarray(offsets, dtype=np.int64))


def _online(store: RedisOnlineStore, ns: str, at: int) -> dict[str, tuple[float, float, float]]:
    vals = online_values(VIEW, store.read_tiles(ns, ENTITIES), at, list(VIEW.aggregations))
    s, c, m = (vals[a.feature_name][0] for a in VIEW.aggregations)
    return {e: (float(s[i]), float(c[i]), float(m[i])) for i, e in enumerate(ENTITIES)}


def _oracle(events: list[tuple[str, int, float]]) -> dict[str, tuple[float, float, float]]:
    out = {}
    for e in ENTITIES:
        mine = [a for ent, _, a in events if ent == e]
        out[e] = (float(sum(mine)), float(len(mine)), max(mine) if mine else float("nan"))
    return out


def _same(got: dict, want: dict) -> bool:
    return all(np.allclose(got[e], want[e], equal_nan=True) for e in ENTITIES)


def test_entity_split_over_partitions_survives_restart_in_other_order(store: RedisOnlineStore) -> None:
    """10 events of u in partition 1 stored; 5 earlier ones arrive in partition 0; a restart from
    the topic's start replays partition 0 first. The store must end with all 15."""
    ns = store.namespace(VIEW.name, VIEW.version)
    p1 = [("a", T0 + 60_000 * (10 + i), 1.0) for i in range(10)]
    p0 = [("a", T0 + 60_000 * i, 2.0) for i in range(5)]
    first = TileState(LAYOUT, RETENTION)
    store.write(ns, [_batch(first, 1, list(range(10)), p1)], TTL, LAYOUT.row_bytes)
    second = TileState(LAYOUT, RETENTION)
    store.write(ns, [_batch(second, 0, list(range(5)), p0)], TTL, LAYOUT.row_bytes)
    store.write(ns, [_batch(second, 1, list(range(10)), p1)], TTL, LAYOUT.row_bytes)
    assert _online(store, ns, T0 + 86_000_000)["a"] == (20.0, 15.0, 2.0)


def test_replay_of_stored_positions_is_skipped(store: RedisOnlineStore) -> None:
    ns = store.namespace(VIEW.name, VIEW.version)
    state = TileState(LAYOUT, RETENTION)
    first = _batch(state, 0, [0, 1], [("a", T0, 1.0), ("a", T0 + 1, 1.0)])
    second = _batch(state, 1, [0], [("a", T0 + 2, 5.0)])
    assert store.write(ns, [first, second], TTL, LAYOUT.row_bytes) == 2
    assert store.write(ns, [first], TTL, LAYOUT.row_bytes) == 0  # dominated: a replay
    assert store.write(ns, [second], TTL, LAYOUT.row_bytes) == 0
    assert _online(store, ns, T0 + 10)["a"] == (7.0, 3.0, 5.0)
    assert 0 < store.client.pttl(RedisOnlineStore.guard_namespace(ns) + "a") <= TTL


def test_store_that_lost_its_data_is_rebuilt_by_a_forced_resync(store: RedisOnlineStore) -> None:
    ns = store.namespace(VIEW.name, VIEW.version)
    state = TileState(LAYOUT, RETENTION)
    events = [("a", T0 + 60_000 * i, float(i)) for i in range(20)] + [("b", T0, 3.0)]
    store.write(ns, [_batch(state, 0, list(range(21)), events)], TTL, LAYOUT.row_bytes)
    token = store.epoch(ns)
    assert token and store.epoch(ns) == token  # stable while the data is there
    for key in store.client.scan_iter(match=store.prefix + "*"):
        store.client.delete(key)  # as a Redis restarted without persistence
    assert store.epoch(ns) != token
    # A write that raced the loss left a partial log for "a"; the resync replaces it.
    store.write(ns, [_batch(state, 0, [21], [("a", T0 + 60_000 * 30, 1.0)])], TTL, LAYOUT.row_bytes)
    update = state.resync()
    assert update.force and sorted(update.entities) == ["a", "b"]
    store.write(ns, [update], TTL, LAYOUT.row_bytes)
    assert _same(_online(store, ns, T0 + 86_000_000), _oracle([*events, ("a", 0, 1.0)]))


def _interleave(draw, batches: list[list]) -> list[tuple[int, int]]:
    """A random merge of per-partition batch sequences, keeping each partition's order."""
    cursors = [0] * len(batches)
    order = []
    while any(c < len(b) for c, b in zip(cursors, batches, strict=True)):
        open_parts = [p for p, b in enumerate(batches) if cursors[p] < len(b)]
        p = draw(st.sampled_from(open_parts))
        order.append((p, cursors[p]))
        cursors[p] += 1
    return order


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), seed=st.integers(0, 2**31), recovered=st.booleans())
def test_any_restart_and_interleaving_converges(
    store: RedisOnlineStore, data, seed: int, recovered: bool
) -> None:
    """Run 1 stops after a random prefix of a random interleaving; run 2 starts empty (replay from
    the topic's start) or from a snapshot taken earlier in run 1, and reads the partitions in
    another interleaving. Every written value ends equal to the oracle."""
    ns = store.namespace(VIEW.name, VIEW.version) + f"{seed}:"
    rng = np.random.default_rng(seed)
    partitions = int(rng.integers(2, 5))
    batches: list[list[list[tuple[str, int, float]]]] = []
    for _ in range(partitions):
        seq = []
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(1, 6))
            seq.append(
                [
                    (
                        str(rng.choice(ENTITIES)),
                        T0 + int(rng.integers(0, 40)) * 30_000,
                        float(rng.integers(1, 9)),
                    )
                    for _ in range(n)
                ]
            )
        batches.append(seq)
    offsets = [np.cumsum([0] + [len(b) for b in seq]).tolist() for seq in batches]

    def run(state: TileState, order: list[tuple[int, int]]) -> list[TileState]:
        snaps = []
        for p, i in order:
            snaps.append(copy.deepcopy(state))  # a snapshot before this batch
            b = batches[p][i]
            update = _batch(state, p, list(range(offsets[p][i], offsets[p][i] + len(b))), b)
            store.write(ns, [update], TTL, LAYOUT.row_bytes)
        return snaps

    first_order = _interleave(data.draw, batches)
    cut = data.draw(st.integers(0, len(first_order)))
    snaps = run(TileState(LAYOUT, RETENTION), first_order[:cut])
    if recovered and snaps:
        k = data.draw(st.integers(0, len(snaps) - 1))
        state, done = snaps[k], set(first_order[:k])
        left = [[i for i in range(len(seq)) if (p, i) not in done] for p, seq in enumerate(batches)]
        order = [(p, left[p][j]) for p, j in _interleave(data.draw, left)]
    else:
        state, order = TileState(LAYOUT, RETENTION), _interleave(data.draw, batches)
    run(state, order)
    every = [e for seq in batches for b in seq for e in b]
    got = _online(store, ns, T0 + 86_000_000)
    assert _same(got, _oracle(every)), (got, _oracle(every))
