"""Reads without services: point-in-time values from stored events, online values from tile blobs.

Both must equal the oracle of ``tests.test_tiles`` (the documented window semantics computed from
raw events), a training row must never see an event after its time, and online reads (tiles packed
as the stream writes them) must equal offline reads whenever the read time is at or after each
entity's newest event.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.delta_store import event_schema
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from engine.reads import online_values, point_in_time_values
from engine.state import TileState
from engine.tiles import TileLayout
from tests.tiles_helpers import (
    BIG_RETENTION,
    ENTITIES,
    FUNCTIONS,
    TILE_MS,
    Events,
    OnlineLog,
    assert_feature,
    events,
    in_window,
    oracle,
    oracle_event_time,
    splits,
)

WINDOWS = (
    Window.sliding("5s"),
    Window.sliding("1s"),
    Window.tumbling("4s"),
    Window.hopping("6s", "2s"),
)


def _aggs() -> tuple[Aggregation, ...]:
    out = []
    for w in WINDOWS:
        out.append(Aggregation(function="count", window=w))
        out += [Aggregation(function=f, column="x", window=w) for f in FUNCTIONS]
    five = Window.sliding("5s")
    out += [Aggregation(function=f, column="y", window=five) for f in ("sum", "last", "count")]
    out.append(Aggregation(function="max", column="y", window=Window.hopping("6s", "2s")))
    return tuple(out)


VIEW = FeatureView(
    name="txn",
    entity=Entity(name="user", join_keys=("user_id",)),
    source=EventSource(
        name="txn",
        topic="txn",
        timestamp_field="ts",
        fields=(
            Field(name="user_id", dtype="str"),
            Field(name="x", dtype="float", nullable=True),
            Field(name="y", dtype="float", nullable=True),
        ),
    ),
    aggregations=_aggs(),
    tile_size="1s",
)
AGGS = list(VIEW.aggregations)
LAYOUT = TileLayout.of(VIEW)
assert VIEW.columns == ("x", "y")
assert LAYOUT.tile_ms == TILE_MS


def table_of(
    ev: Events, order: np.ndarray | None = None, chunks: int = 1, null_as_nan: bool = False
) -> pa.Table:
    """Stored events as the offline store holds them; ``_offset`` is the arrival position."""
    n = len(ev)
    order = np.arange(n) if order is None else order
    schema = event_schema(VIEW.columns)

    def col(values: np.ndarray) -> pa.Array:
        if null_as_nan:
            return pa.array(values, pa.float64())
        return pa.array(values, pa.float64(), mask=np.isnan(values))

    ts = ev.ts[order]
    table = pa.table(
        {
            "entity": pa.array(ev.entity[order].tolist(), pa.string()),
            "event_ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
            "x": col(ev.cols[0][order]),
            "y": col(ev.cols[1][order]),
            "_topic": pa.array(["txn"] * n, pa.string()),
            "_partition": pa.array(np.zeros(n, dtype=np.int32), pa.int32()),
            "_offset": pa.array(order.astype(np.int64), pa.int64()),
            "date": pa.array(
                [datetime.fromtimestamp(t / 1000, UTC).date() for t in ts.tolist()], schema.field("date").type
            ),
        },
        schema=schema,
    )
    if chunks > 1 and n > 1:
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        table = pa.concat_tables([table.slice(a, b - a) for a, b in itertools.pairwise(bounds.tolist())])
        assert table.column("entity").num_chunks == chunks
    return table


def expected(
    ev: Events, entity: list[str], at: np.ndarray, agg: Aggregation
) -> tuple[np.ndarray, np.ndarray]:
    vals, times = [], []
    for e, t in zip(entity, at.tolist(), strict=True):
        mask = (ev.entity == e) & in_window(agg.window, ev.ts, t)
        vals.append(oracle(ev, mask, agg))
        times.append(oracle_event_time(ev, mask, agg))
    return np.array(vals), np.array(times)


def assert_values(got: dict, ev: Events, entity: list[str], at: np.ndarray, what: str = "") -> None:
    assert set(got) == set(VIEW.feature_names)
    for agg in AGGS:
        vals, times = got[agg.feature_name]
        assert vals.shape == (len(entity),)
        exp_vals, exp_times = expected(ev, entity, at, agg)
        assert_feature(vals, exp_vals, agg, f"{what} {agg.feature_name}")
        np.testing.assert_array_equal(times, exp_times, err_msg=f"{what} {agg.feature_name} event time")


# ---------------------------------------------------------------------------------------------
# point in time == oracle


query_times = st.one_of(
    st.integers(0, 30_000),
    st.sampled_from([0, 999, 1000, 1999, 2000, 4000, 5999, 6000, 6001, 8000, 12_000, 25_000, 10**6]),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    ev=events(max_size=50),
    n_queries=st.integers(1, 40),
    chunks=st.integers(1, 3),
    null_as_nan=st.booleans(),
)
def test_point_in_time_equals_oracle(
    data, ev: Events, n_queries: int, chunks: int, null_as_nan: bool
) -> None:
    perm = np.array(data.draw(st.permutations(range(len(ev)))), dtype=np.int64)
    table = table_of(ev, perm, chunks, null_as_nan)
    who = st.sampled_from([*ENTITIES, "nobody"])
    entity = data.draw(st.lists(who, min_size=n_queries, max_size=n_queries))
    # read times on, just before and just after events, plus arbitrary ones
    near = [t + d for t in ev.ts.tolist() for d in (-1, 0, 1) if t + d >= 0]
    times = st.one_of(query_times, st.sampled_from(near)) if near else query_times
    at = np.array(data.draw(st.lists(times, min_size=n_queries, max_size=n_queries)), dtype=np.int64)
    got = point_in_time_values(VIEW, table, entity, at, AGGS)
    assert_values(got, ev, entity, at)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ev=events(min_size=1, max_size=40), future=events(min_size=1, max_size=20))
def test_later_events_never_change_a_training_row(data, ev: Events, future: Events) -> None:
    """Adding any events after every query time changes no value."""
    entity = data.draw(st.lists(st.sampled_from(ENTITIES), min_size=1, max_size=20))
    at = np.array(data.draw(st.lists(st.integers(0, 20_000), min_size=len(entity), max_size=len(entity))))
    later = Events(future.entity, future.ts + int(at.max()) + 1, future.cols)
    both = Events(
        np.concatenate([ev.entity, later.entity]),
        np.concatenate([ev.ts, later.ts]),
        [np.concatenate(c) for c in zip(ev.cols, later.cols, strict=True)],
    )
    before = point_in_time_values(VIEW, table_of(ev), entity, at, AGGS)
    after = point_in_time_values(VIEW, table_of(both), entity, at, AGGS)
    for name in VIEW.feature_names:
        np.testing.assert_array_equal(after[name][0], before[name][0], err_msg=name)
        np.testing.assert_array_equal(after[name][1], before[name][1], err_msg=name)
    assert_values(after, both, entity, at)


def test_event_one_ms_after_t_is_excluded_and_at_t_included() -> None:
    t = 5_500
    ev = Events(
        np.array(["a", "a", "a", "a", "b"], dtype=object),
        np.array([t, t + 1, 3_200, t + 400, t], dtype=np.int64),
        [np.array([1.0, 100.0, 10.0, 1000.0, 7.0]), np.array([np.nan, 5.0, np.nan, np.nan, 1.0])],
    )
    table = table_of(ev)
    at = np.array([t, t - 1, t + 1], dtype=np.int64)
    got = point_in_time_values(VIEW, table, ["a", "a", "a"], at, AGGS)
    sum5 = got["x_sum_5s"][0]
    assert sum5.tolist() == [11.0, 10.0, 111.0]  # at t: t and 3200; at t-1: 3200 only; at t+1: + t+1
    assert got["x_last_5s"][0].tolist() == [1.0, 10.0, 100.0]
    assert got["x_last_5s"][1].tolist() == [t, 3_200, t + 1]
    assert got["events_count_5s"][0].tolist() == [2, 1, 3]
    assert got["events_count_5s"][1].tolist() == [t, 3_200, t + 1]
    # y: only the t+1 event has a value
    assert got["y_count_5s"][0].tolist() == [0, 0, 1]
    assert np.isnan(got["y_last_5s"][0][:2]).all() and got["y_last_5s"][0][2] == 5.0
    assert got["y_sum_5s"][0].tolist() == [0.0, 0.0, 5.0]
    assert_values(got, ev, ["a", "a", "a"], at)


def test_hopping_window_ends_before_its_boundary() -> None:
    # hopping 6s every 2s at t=6000..7999 covers [0, 6000): the event at 6000 is out, 5999 in
    ev = Events(
        np.array(["a"] * 4, dtype=object),
        np.array([0, 5_999, 6_000, 7_999], dtype=np.int64),
        [np.array([1.0, 2.0, 4.0, 8.0]), np.array([np.nan] * 4)],
    )
    table = table_of(ev)
    at = np.array([5_999, 6_000, 7_999, 8_000, 12_000, 13_999, 14_000], dtype=np.int64)
    got = point_in_time_values(VIEW, table, ["a"] * len(at), at, AGGS)
    # E = 4000 -> [-2000, 4000); 6000 -> [0, 6000); 6000; 8000 -> [2000, 8000); 12000 -> [6000, 12000);
    # 12000; 14000 -> [8000, 14000)
    assert got["x_sum_6s_every_2s"][0].tolist() == [1.0, 3.0, 3.0, 14.0, 12.0, 12.0, 0.0]
    assert got["x_max_6s_every_2s"][0].tolist()[:6] == [1.0, 2.0, 2.0, 8.0, 8.0, 8.0]
    assert np.isnan(got["x_max_6s_every_2s"][0][6])
    # tumbling 4s: E = 4000 -> [0, 4000); 8000 -> [4000, 8000)
    assert got["x_sum_4s_tumbling"][0].tolist() == [1.0, 1.0, 1.0, 14.0, 0.0, 0.0, 0.0]
    assert_values(got, ev, ["a"] * len(at), at)


def test_unknown_entities_and_empty_table() -> None:
    ev = Events(
        np.array(["a"], dtype=object), np.array([1_000], dtype=np.int64), [np.array([3.0]), np.array([4.0])]
    )
    at = np.array([1_000, 1_000, 2_000], dtype=np.int64)
    cases = ((table_of(ev), ["nobody", "a", ""]), (table_of(ev.take(slice(0, 0))), ["a", "b", "c"]))
    for table, ents in cases:
        got = point_in_time_values(VIEW, table, ents, at, AGGS)
        for agg in AGGS:
            vals, times = got[agg.feature_name]
            for i, e in enumerate(ents):
                if e == "a" and agg.window.kind == "sliding":
                    continue
                if agg.function in ("count", "sum"):
                    assert vals[i] == 0.0, (agg.feature_name, e)
                else:
                    assert np.isnan(vals[i]), (agg.feature_name, e)
                assert np.isnan(times[i])
    got = point_in_time_values(VIEW, table_of(ev), ["nobody", "a"], at[:2], AGGS)
    assert got["x_sum_5s"][0].tolist() == [0.0, 3.0]


def test_no_queries() -> None:
    ev = Events(
        np.array(["a"], dtype=object), np.array([1_000], dtype=np.int64), [np.array([3.0]), np.array([4.0])]
    )
    got = point_in_time_values(VIEW, table_of(ev), [], np.zeros(0, dtype=np.int64), AGGS)
    assert all(v.shape == (0,) and t.shape == (0,) for v, t in got.values())


# ---------------------------------------------------------------------------------------------
# online (packed tiles) == offline at or after each entity's newest event


def blobs_of(state: TileState, entities: list[str]) -> list[bytes]:
    return [state.tiles_of(e).astype("<f8").tobytes() for e in entities]


def packed_log(online: OnlineLog, name: str) -> bytes:
    """An entity's online value as the store keeps it: a guard row (tile -1, ops), then its log."""
    if name not in online.log:
        return b""
    guard = np.zeros((1, LAYOUT.width))
    guard[0, 0] = -1
    guard[0, 1] = online.ops[name]
    return np.concatenate([guard, online.log[name]]).astype("<f8").tobytes()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    ev=events(max_size=50),
    after=st.sampled_from([0, 1, 999, 1000, 4000, 5000, 9000]),
    retention=st.sampled_from([BIG_RETENTION, 30_000]),
)
def test_online_equals_point_in_time_after_newest_event(data, ev: Events, after: int, retention: int) -> None:
    # retention 30s >= the longest lookback (6s + 2s) plus a tile: eviction never changes a value
    state = TileState(LAYOUT, retention)
    online = OnlineLog()
    for s in data.draw(splits(len(ev))):
        part = ev.take(s)
        keys = sorted(set(part.entity.tolist()))
        codes = np.array([keys.index(e) for e in part.entity.tolist()], dtype=np.int64)
        online.write(state.apply(keys, codes, part.ts.copy(), [c.copy() for c in part.cols]))
    entities = [*ENTITIES, "nobody"]
    newest = int(ev.ts.max()) if len(ev) else 0
    at_ms = newest + after
    at = np.full(len(entities), at_ms, dtype=np.int64)
    offline = point_in_time_values(VIEW, table_of(ev), entities, at, AGGS)
    # live tiles straight from the state, and the append-only log with guard row and stale versions
    tiles = [state.tiles_of(e).astype("<f8").tobytes() for e in entities]
    logs = [packed_log(online, e) for e in entities]
    assert tiles[-1] == b"" and logs[-1] == b""
    for kind, blobs in (("tiles", tiles), ("log", logs)):
        got = online_values(VIEW, blobs, at_ms, AGGS)
        assert set(got) == set(offline)
        for agg in AGGS:
            name = agg.feature_name
            what = f"online ({kind}) vs offline {name} at {at_ms}"
            assert_feature(got[name][0], offline[name][0], agg, what)
            np.testing.assert_array_equal(got[name][1], offline[name][1], err_msg=f"{what} event time")
        assert_values(got, ev, entities, at, f"online ({kind})")


def test_online_values_of_no_entities_and_empty_blobs() -> None:
    got = online_values(VIEW, [], 10_000, AGGS)
    assert all(v.shape == (0,) for v, _ in got.values())
    got = online_values(VIEW, [b"", b""], 10_000, AGGS)
    assert got["events_count_5s"][0].tolist() == [0.0, 0.0]
    assert np.isnan(got["x_mean_5s"][0]).all()
