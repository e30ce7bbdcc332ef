"""Session windows without services: definitions, the stream's state (incremental == batch, pickle
round trip), online values from it and offline point-in-time values, each against the oracle."""

from __future__ import annotations

import pickle
import zlib
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.definitions import Aggregation, Derived, FeatureView, Window
from engine.errors import DefinitionError
from engine.reads import online_values, point_in_time_values
from engine.sessions import SessionState, merge_sessions, session_gaps, sessionize
from engine.state import TileState, TileUpdate
from engine.tiles import TileLayout
from featurestream.server.reads import ReadCache, ViewReader
from tests.sessions_helpers import (
    BASE,
    GAP,
    LATENESS,
    MIN,
    close,
    feature_key,
    make_events,
    make_view,
    oracle,
)

PARTITIONS = 4


def _frame(events: list[dict[str, Any]]) -> pd.DataFrame:
    """Events with the partition (by entity, as a keyed producer) and offset they would get."""
    df = pd.DataFrame(events)
    df["partition"] = [zlib.crc32(u.encode()) % PARTITIONS for u in df["user_id"]]
    df["offset"] = df.groupby("partition").cumcount()
    return df


def _table(df: pd.DataFrame) -> pa.Table:
    return pa.table(
        {
            "entity": pa.array(df["user_id"].tolist(), pa.string()),
            "event_ts": pa.array(df["ts"].to_numpy(np.int64), pa.timestamp("ms", "UTC")),
            "amount": pa.array(df["amount"].tolist(), pa.float64()),
            "_partition": pa.array(df["partition"].to_numpy(np.int32)),
            "_offset": pa.array(df["offset"].to_numpy(np.int64)),
        }
    )


def _apply(state: SessionState, df: pd.DataFrame, store: dict[str, bytes]) -> None:
    """One batch per partition into ``state``, the updates written to ``store`` (a rewrite per
    entity, as the guarded Redis write does)."""
    for p, part in df.groupby("partition", sort=True):
        keys = sorted(set(part["user_id"]))
        codes = np.array([keys.index(u) for u in part["user_id"]], np.int64)
        amount = np.array([np.nan if a is None else a for a in part["amount"]], np.float64)
        update = state.apply(
            keys, codes, part["ts"].to_numpy(np.int64), [amount], int(p), part["offset"].to_numpy(np.int64)
        )
        _store(update, store, state.layout)


def _store(update: TileUpdate, store: dict[str, bytes], layout: TileLayout) -> None:
    blob = np.ascontiguousarray(update.rows, "<f8").tobytes()
    for i, e in enumerate(update.entities):
        store[e] = blob[update.starts[i] * layout.row_bytes : update.starts[i + 1] * layout.row_bytes]


def _state(view: FeatureView) -> SessionState:
    return SessionState(TileLayout.of(view), session_gaps(view), LATENESS, PARTITIONS)


def _check(values: dict[str, Any], df: pd.DataFrame, view: FeatureView, users: list[str], times: list[int]):
    frames = {u: g for u, g in df.groupby("user_id")}
    empty = df.iloc[:0]
    bad = []
    for i, (u, t) in enumerate(zip(users, times, strict=True)):
        want = {w: oracle(frames.get(u, empty), t, GAP, w) for w in ("current", "last")}
        for agg in view.aggregations:
            got = float(values[agg.feature_name][0][i])
            expected = want[agg.window.which or "current"][feature_key(agg)]
            if not close(got, expected):
                bad.append((agg.feature_name, u, t - BASE, got, expected))
    assert not bad, bad[:10]


def _read_times(df: pd.DataFrame, u: str) -> list[int]:
    """Times around the entity's events: at each, just after, inside sessions, exactly at
    event + gap, just before it, and long after."""
    ts = sorted(set(df.loc[df["user_id"] == u, "ts"].tolist()))
    picks = ts[:: max(1, len(ts) // 12)] + ts[-3:]
    out = [BASE - MIN]
    for t in picks:
        out += [t, t + 1, t + GAP // 2, t + GAP - 1, t + GAP, t + GAP + 1]
    return [*out, ts[-1] + 100 * GAP]


def test_definitions_name_and_validate() -> None:
    view = make_view("t")
    names = view.feature_names
    assert "amount_sum_session_10m" in names and "amount_sum_last_session_10m" in names
    assert "session_duration_10m" in names and "last_session_duration_10m" in names
    assert "events_count_session_10m" in names
    with pytest.raises(DefinitionError, match="duration applies to session windows only"):
        Aggregation(function="duration", window="10m")
    with pytest.raises(DefinitionError, match="remove column"):
        Aggregation(function="duration", column="amount", window=Window.session("10m"))
    with pytest.raises(DefinitionError, match="which applies to session windows only"):
        Window(kind="sliding", size="10m", which="last")
    with pytest.raises(DefinitionError, match="size must be positive"):
        Window.session("0s")
    odd = Aggregation(function="sum", column="amount", window=Window.session("90s"))  # no tile multiple
    assert make_view("t", extra=(odd,)).aggregation("amount_sum_session_90s") == odd
    a = make_view("t", extra=(Aggregation(function="count", window=Window.session("20m")),))
    b = make_view(
        "t",
        extra=(Aggregation(function="count", window=Window.session("20m"), name="events_count_session_20m"),),
    )
    assert a.version == b.version  # the name default is the name
    c = make_view(
        "t",
        extra=(
            Aggregation(
                function="count", window=Window.session("20m", "last"), name="events_count_session_20m"
            ),
        ),
    )
    assert c.version != a.version  # current vs last session changes values


def test_offline_matches_oracle_over_four_partitions() -> None:
    view = make_view("t")
    df = _frame(make_events(7))
    users, times = [], []
    for u in sorted(set(df["user_id"])):
        for t in _read_times(df, u):
            users.append(u)
            times.append(t)
    users.append("nobody")
    times.append(BASE)
    values = point_in_time_values(view, _table(df), users, np.array(times, np.int64), list(view.aggregations))
    _check(values, df, view, users, times)


def test_bridge_event_merges_two_sessions_online_and_offline() -> None:
    view = make_view("t")
    events = [
        {"user_id": "a", "ts": BASE, "amount": 1.0},
        {"user_id": "a", "ts": BASE + 13 * MIN, "amount": 2.0},
        {"user_id": "a", "ts": BASE + 9 * MIN, "amount": 4.0},  # late, within lateness: bridges
    ]
    df = _frame(events)
    state, store = _state(view), {}
    _apply(state, df.iloc[:2], store)
    assert len(state.sessions_of("a", GAP)) == 2
    _apply(state, df.iloc[2:], store)
    rows = state.sessions_of("a", GAP)
    assert len(rows) == 1 and rows[0, 1] == 3  # one session of three events
    at = BASE + 13 * MIN + 1
    online = online_values(view, [b""], at, list(view.aggregations), session_blobs=[store["a"]])
    assert online["amount_sum_session_10m"][0][0] == 7.0
    assert online["session_duration_10m"][0][0] == 13 * 60.0
    assert np.isnan(online["last_session_duration_10m"][0][0])  # no closed session yet
    offline = point_in_time_values(view, _table(df), ["a"], np.array([at]), list(view.aggregations))
    for name, (v, _) in online.items():
        assert close(float(v[0]), float(offline[name][0][0])), name


def test_gap_boundaries_ties_and_single_event() -> None:
    view = make_view("t")
    events = [
        {"user_id": "a", "ts": BASE, "amount": 1.0},
        {"user_id": "a", "ts": BASE, "amount": 2.0},  # a tie: same session, the later is last
        {"user_id": "a", "ts": BASE + GAP, "amount": 3.0},  # exactly gap apart: a new session
        {"user_id": "a", "ts": BASE + 2 * GAP - 1, "amount": 5.0},  # just under: joins it
        {"user_id": "b", "ts": BASE, "amount": 9.0},  # a single event: duration 0
    ]
    df = _frame(events)
    state, store = _state(view), {}
    _apply(state, df, store)
    newest = BASE + 2 * GAP - 1
    aggs = list(view.aggregations)
    cases = [(newest, 2.0, 8.0), (newest + GAP - 1, 2.0, 8.0), (newest + GAP, 0.0, 8.0)]
    for at, current_count, last_sum in cases:
        got = online_values(view, [b"", b""], at, aggs, session_blobs=[store["a"], store["b"]])
        assert got["events_count_session_10m"][0][0] == current_count
        want_last = last_sum if current_count else 8.0
        assert got["amount_sum_last_session_10m"][0][0] == (3.0 if current_count else want_last)
        assert got["amount_last_last_session_10m"][0][0] == (2.0 if current_count else 5.0)
    got = online_values(view, [b""], BASE + GAP, aggs, session_blobs=[store["b"]])
    assert got["last_session_duration_10m"][0][0] == 0.0
    assert np.isnan(got["amount_stddev_last_session_10m"][0][0])  # one value: null
    assert got["events_count_session_10m"][0][0] == 0  # closed exactly at event + gap
    assert np.isnan(got["amount_mean_session_10m"][0][0])
    at = np.array([newest, newest + GAP - 1, newest + GAP, BASE, BASE + GAP], np.int64)
    users = ["a", "a", "a", "b", "b"]
    _check(point_in_time_values(view, _table(df), users, at, aggs), df, view, users, at.tolist())


def test_derived_feature_reads_session_features() -> None:
    base = make_view("t")
    view = base.model_copy(
        update={
            "derived": (
                Derived(name="per_minute", expression="events_count_session_10m / session_duration_10m * 60"),
            )
        }
    )
    df = _frame([{"user_id": "a", "ts": BASE + i * MIN, "amount": 1.0} for i in range(5)])
    state, store = _state(view), {}
    _apply(state, df, store)
    wanted = [view.aggregation("per_minute")]
    got = online_values(view, [b""], BASE + 5 * MIN, wanted, session_blobs=[store["a"]])
    assert got["per_minute"][0][0] == 5 / 240 * 60
    off = point_in_time_values(view, _table(df), ["a"], np.array([BASE + 5 * MIN]), wanted)
    assert off["per_minute"][0][0] == got["per_minute"][0][0]


def _online_equals_oracle(view: FeatureView, df: pd.DataFrame, store: dict[str, bytes]) -> None:
    users = sorted(set(df["user_id"]))
    newest = df.groupby("user_id")["ts"].max()
    for offset in (0, 1, GAP // 3, GAP - 1, GAP, GAP + 1, 50 * GAP):
        for u in users:  # reads as of now: at or after the entity's newest event
            at = int(newest[u]) + offset
            got = online_values(view, [b""], at, list(view.aggregations), session_blobs=[store[u]])
            _check(got, df, view, [u], [at])


def test_online_state_matches_oracle_in_random_batches() -> None:
    view = make_view("t")
    df = _frame(make_events(11))
    state, store = _state(view), {}
    for chunk in np.array_split(np.arange(len(df)), 17):
        _apply(state, df.iloc[chunk], store)
    _online_equals_oracle(view, df, store)
    resync = state.resync()  # a store that lost its data gets every entity's value back, forced
    rebuilt: dict[str, bytes] = {}
    _store(resync, rebuilt, state.layout)
    assert resync.force and rebuilt == store


@st.composite
def _stream(draw: st.DrawFn) -> tuple[pd.DataFrame, list[int]]:
    n = draw(st.integers(1, 60))
    ts = draw(st.lists(st.integers(0, 12 * GAP // MIN), min_size=n, max_size=n))
    ent = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    amount = draw(st.lists(st.one_of(st.none(), st.integers(-50, 50)), min_size=n, max_size=n))
    jitter = draw(st.lists(st.integers(0, LATENESS // MIN - 1), min_size=n, max_size=n))
    events = [
        {"user_id": f"u{e}", "ts": BASE + t * MIN // 2, "amount": None if a is None else float(a)}
        for t, e, a in zip(ts, ent, amount, strict=True)
    ]
    order = np.argsort([e["ts"] + j * MIN for e, j in zip(events, jitter, strict=True)], kind="stable")
    cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=6)))
    return _frame([events[i] for i in order.tolist()]), cuts


@settings(max_examples=100, deadline=None)
@given(_stream())
def test_incremental_equals_batch_and_oracle_with_pickle(stream: tuple[pd.DataFrame, list[int]]) -> None:
    df, cuts = stream
    view = make_view("t")
    whole, whole_store = _state(view), {}
    _apply(whole, df, whole_store)
    state, store = _state(view), {}
    for i, part in enumerate(np.split(np.arange(len(df)), cuts)):
        _apply(state, df.iloc[part], store)
        if i == 1:
            state = pickle.loads(pickle.dumps(state))  # a recovery snapshot round trip
    assert store.keys() == whole_store.keys()
    for u in store:
        a = np.frombuffer(store[u], "<f8")
        b = np.frombuffer(whole_store[u], "<f8")
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    _online_equals_oracle(view, df, store)


def test_merge_sessions_joins_touching_and_keeps_apart() -> None:
    layout = TileLayout(columns=("amount",), tile_ms=MIN)
    ent = np.array([0, 0, 0, 1], np.int64)
    ts = np.array([0, GAP - 1, 3 * GAP, 0], np.int64)
    e, rows = sessionize(layout, ent, ts, [np.array([1.0, 2.0, 3.0, 4.0])], GAP)
    assert e.tolist() == [0, 0, 1] and rows[:, 1].tolist() == [2, 1, 1]
    bridge_e, bridge = sessionize(layout, np.array([0]), np.array([2 * GAP - 2]), [np.array([5.0])], GAP)
    m_e, m_rows = merge_sessions(layout, np.concatenate((e, bridge_e)), np.concatenate((rows, bridge)), GAP)
    assert m_e.tolist() == [0, 0, 1]  # 2*GAP-2 joins the first (GAP-1 after it), not 3*GAP (GAP+2)
    assert m_rows[0, 1] == 3 and m_rows[0, 0] == 0 and m_rows[0, 2] == 2 * GAP - 2
    e2, rows2 = sessionize(layout, np.array([0]), np.array([2 * GAP - 1]), [np.array([5.0])], GAP)
    m_e, _ = merge_sessions(layout, np.concatenate((e, e2)), np.concatenate((rows, rows2)), GAP)
    assert m_e.tolist() == [0, 0, 0, 1]  # exactly GAP after the first session's end: a session of its own


def test_server_reads_session_features_as_the_engine_does() -> None:
    view = make_view("t", extra=(Aggregation(function="count", window="1h"),))
    reader = ViewReader(view)
    state = TileState(TileLayout.of(view), 2 * 3_600_000)
    ts = np.array([BASE, BASE + MIN, BASE + 2 * MIN], np.int64)
    update = state.apply(["a"], np.zeros(3, np.int64), ts, [np.array([1.0, 2.0, 3.0])])
    blob = np.ascontiguousarray(update.rows, "<f8").tobytes()
    hour = view.aggregation("events_count_1h")
    block = reader.read([blob], BASE + 3 * MIN, [hour], ids=["a"], cache=ReadCache(1 << 20))
    assert block.values[0, 0] == 3  # the cached path reads every tile feature, sessions aside
    sessions: dict[str, bytes] = {}
    df = _frame([{"user_id": "a", "ts": int(t), "amount": float(i + 1)} for i, t in enumerate(ts)])
    _apply(_state(view), df, sessions)
    wanted = [
        view.aggregation("amount_sum_session_10m"),
        hour,
        view.aggregation("events_count_last_session_10m"),
    ]
    for at in (BASE + 3 * MIN, BASE + 2 * MIN + GAP):
        plan = reader.plan(wanted)
        got = reader.read([blob, b""], at, plan, sessions=[sessions["a"], b""])
        want = online_values(view, [blob, b""], at, wanted, session_blobs=[sessions["a"], b""])
        for i, agg in enumerate(wanted):
            assert np.array_equal(got.values[i], want[agg.feature_name][0], equal_nan=True), agg.feature_name
            assert np.array_equal(got.times[i], want[agg.feature_name][1], equal_nan=True), agg.feature_name
        assert got.status[:, 1].tolist() == [1, 1, 1]  # NOT_FOUND: nothing stored
    assert got.values[0, 0] == 0 and got.values[2, 0] == 3  # the session ended: now the last one
