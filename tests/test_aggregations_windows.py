"""first, last (text), last_n, count_distinct, percentile and top_k over sliding, tumbling and
hopping windows: the stream's tiles read online == training-set values == an oracle from the raw
events, with shuffled arrival, events of one entity spread over 4 partitions, ties in event time,
nulls and odd text; and a restart from a pickled state mid-stream changes nothing."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from engine.reads import online_values, point_in_time_values
from engine.state import TileState
from engine.tiles import TileLayout
from tests.aggregations_helpers import (
    T0,
    Logs,
    assert_matches,
    events_table,
    oracle,
    random_events,
    same,
    view,
    window_events,
)

VIEW = view()
AGGS = list(VIEW.aggregations)
LAYOUT = TileLayout.of(VIEW)
RETENTION = 10**9


def _arrive(rng: random.Random, evs: list[dict]) -> list[dict]:
    """Shuffled arrival over 4 partitions; offsets follow arrival within a partition."""
    rng.shuffle(evs)
    nxt = [0, 0, 0, 0]
    for e in evs:
        p = rng.randrange(4)
        e["_partition"], e["_offset"] = p, nxt[p]
        nxt[p] += 1
    return evs


def _stream(state: TileState, logs: Logs, evs: list[dict], rng: random.Random) -> TileState:
    """Apply events batch by batch (per partition, in offset order) like the dataflow."""
    by_part = {p: [e for e in evs if e["_partition"] == p] for p in range(4)}
    cursors = dict.fromkeys(by_part, 0)
    while any(cursors[p] < len(by_part[p]) for p in by_part):
        p = rng.choice([p for p in by_part if cursors[p] < len(by_part[p])])
        take = by_part[p][cursors[p] : cursors[p] + rng.randint(1, 7)]
        cursors[p] += len(take)
        keys = sorted({e["user_id"] for e in take})
        codes = np.array([keys.index(e["user_id"]) for e in take], dtype=np.int64)
        ts = np.array([e["ts"] for e in take], dtype=np.int64)
        x = np.array([np.nan if e["x"] is None else e["x"] for e in take], dtype=np.float64)
        m = np.array([np.nan if e["m"] is None else 0.0 for e in take], dtype=np.float64)
        cols = [x if c == "x" else m for c in LAYOUT.columns]
        offsets = np.array([e["_offset"] for e in take], dtype=np.int64)
        logs.write(state.apply(keys, codes, ts, cols, p, offsets, {"m": [e["m"] for e in take]}))
    return state


def _check(evs: list[dict], state_logs: Logs, at: int) -> None:
    users = [*sorted({e["user_id"] for e in evs}), "nobody"]
    online = online_values(
        VIEW,
        [state_logs.rows.get(u, b"") for u in users],
        at,
        AGGS,
        objects=[state_logs.objects.get(u, b"") for u in users],
    )
    offline = point_in_time_values(VIEW, events_table(VIEW, evs), users, np.full(len(users), at), AGGS)
    for agg in AGGS:
        on, off = online[agg.feature_name][0], offline[agg.feature_name][0]
        for i, u in enumerate(users):
            where = f"{agg.feature_name} {u}"
            assert same(on[i], off[i]), (where, on[i], off[i])
            mine = [e for e in evs if e["user_id"] == u]
            assert_matches(agg, off[i], oracle(agg, window_events(agg, mine, at)), where)
        assert np.array_equal(online[agg.feature_name][1], offline[agg.feature_name][1], equal_nan=True)


@pytest.mark.parametrize("seed", range(12))
def test_online_equals_offline_equals_oracle(seed: int) -> None:
    rng = random.Random(seed)
    evs = _arrive(rng, random_events(rng, rng.randint(1, 120)))
    logs = Logs()
    _stream(TileState(LAYOUT, RETENTION), logs, evs, rng)
    at = max(e["ts"] for e in evs)
    for t in (at, at + 1500, at + 4000):  # sliding, hopping and tumbling edges move
        _check(evs, logs, t)


@pytest.mark.parametrize("seed", range(6))
def test_restart_from_a_pickled_state_mid_stream(seed: int) -> None:
    rng = random.Random(100 + seed)
    evs = _arrive(rng, random_events(rng, 80))
    cut = len(evs) // 2
    whole, logs_a = Logs(), Logs()
    _stream(TileState(LAYOUT, RETENTION), whole, evs, random.Random(seed))
    first = _stream(TileState(LAYOUT, RETENTION), logs_a, evs[:cut], random.Random(seed))
    resumed = pickle.loads(pickle.dumps(first))
    _stream(resumed, logs_a, evs[cut:], random.Random(seed + 1))
    at = max(e["ts"] for e in evs)
    _check(evs, logs_a, at)
    _check(evs, whole, at)
    logs_b = Logs()
    logs_b.write(resumed.resync())  # a store that lost its data is rebuilt from the state
    _check(evs, logs_b, at)


def test_many_distinct_values_switch_to_the_sketch_and_still_agree() -> None:
    rng = random.Random(7)
    evs = [{"user_id": "u", "ts": T0 + (i % 9) * 500, "x": float(i), "m": f"v{i}"} for i in range(5000)]
    evs = _arrive(rng, evs)
    logs = Logs()
    _stream(TileState(LAYOUT, RETENTION), logs, evs, rng)
    at = max(e["ts"] for e in evs)
    online = online_values(VIEW, [logs.rows["u"]], at, AGGS, objects=[logs.objects["u"]])
    offline = point_in_time_values(VIEW, events_table(VIEW, evs), ["u"], np.array([at]), AGGS)
    for agg in AGGS:
        assert same(online[agg.feature_name][0][0], offline[agg.feature_name][0][0]), agg.feature_name
        if agg.function == "count_distinct":
            exact = len({e[agg.column] for e in window_events(agg, evs, at)})
            got = online[agg.feature_name][0][0]
            assert exact > 1024 and abs(got - exact) <= 0.1 * exact, (agg.feature_name, got, exact)


def test_eviction_and_log_rewrites_keep_records_with_their_rows() -> None:
    rng = random.Random(3)
    evs = []
    for step in range(400):  # a minute and more of event time, mostly in order
        e = random_events(rng, 1, entities=2)[0]
        e["ts"] = T0 + step * 200 + rng.randrange(-600, 600)
        evs.append(e)
    nxt = [0, 0, 0, 0]
    for e in evs:
        p = rng.randrange(4)
        e["_partition"], e["_offset"] = p, nxt[p]
        nxt[p] += 1
    state, logs = TileState(LAYOUT, 12_000), Logs()
    _stream(state, logs, evs, rng)
    assert logs.rewrites > 0  # logs were rewritten (live tiles only), records with rows
    assert set(state.objects) == set(state.index)  # evicted tiles leave both
    assert len(state.index) < 2 * 20  # bounded by retention, not by the stream's length
    at = max(e["ts"] for e in evs)
    _check(evs, logs, at)
