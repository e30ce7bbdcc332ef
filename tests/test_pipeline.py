"""End to end against real services: Kafka -> dataflow -> Redis + Delta, checked against a pandas oracle.

One module-scoped data set (a few hundred random events, ~20 entities, ~2 h of event time,
4 partitions keyed by entity, some events out of order within the allowed lateness) is produced
and run once; every test reads it back. The oracle (``tests/pipeline_helpers.py``) computes each
window from the raw events with pandas/numpy only, following the documented semantics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import redis
from deltalake import DeltaTable

from engine.dataflow import RuntimeConfig
from engine.definitions import FeatureView
from featurestream.client import FeatureStore
from tests.pipeline_helpers import (
    BASE,
    HOUR,
    LATENESS,
    MIN,
    N_EVENTS,
    PARTITIONS,
    SPAN,
    SPECS,
    Oracle,
    World,
    _col,
    _online,
    _runtime,
    _store,
    _training,
    accepted_events,
    make_events,
    make_view,
    ms_dt,
    same,
)
from tests.support import create_topic, produce, read_topic, run_views, unique


@pytest.fixture(scope="module")
def world(services: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    topic = create_topic(services.kafka, unique("events"), PARTITIONS)
    runtime = _runtime(services.kafka, services.redis_url, tmp_path_factory.mktemp("pipeline") / "delta")
    view = make_view(topic)
    produce(services.kafka, topic, make_events(), key_field="user_id")
    run_views([view], runtime)
    accepted, late = accepted_events(read_topic(services.kafka, topic), LATENESS)
    assert len(accepted) + len(late) == N_EVENTS
    assert late.empty, "the data set is built to have no late events"
    newest = int(accepted["ts"].max())
    tile_ends = [(newest // MIN - k) * MIN - 1 for k in range(4)]  # tiles ending before `newest`
    online_times = [newest, newest + 1, newest + 7 * MIN + 123, newest + 45 * MIN, *tile_ends]
    return World(
        kafka=services.kafka,
        topic=topic,
        view=view,
        runtime=runtime,
        store=_store(view, runtime),
        events=accepted,
        oracle=Oracle(accepted),
        entities=sorted(accepted["user_id"].unique()),
        newest=newest,
        online_times=online_times,
    )


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------


def test_the_data_set_exercises_what_it_should(world: World) -> None:
    ev = world.events
    assert ev["partition"].nunique() >= 3
    assert ev.groupby("user_id")["partition"].nunique().max() == 1  # keyed: one partition per entity
    # Out-of-order events within the lateness were produced and all of them were accepted.
    disorder = (
        ev.sort_values(["partition", "offset"])
        .groupby("partition")["ts"]
        .apply(lambda s: int((s < s.cummax().shift(fill_value=0)).sum()))
    )
    assert disorder.sum() > 50
    assert read_topic(world.kafka, f"{world.topic}.dlq") == []
    assert ev["amount"].isna().sum() > 20
    assert set(pd.to_datetime(ev["ts"], unit="ms", utc=True).dt.strftime("%Y-%m-%d")) == {
        "2024-03-10",
        "2024-03-11",
    }


def test_online_values_equal_the_oracle(world: World) -> None:
    ents = [*world.entities, "nobody"]
    checked = 0
    for t in world.online_times:
        got = _online(world.store, world.view, ents, t)
        assert got.entities == [{"user_id": e} for e in ents]
        for s in SPECS:
            vals = got.values[f"{world.view.name}:{s.name}"]
            for e, v in zip(ents, vals, strict=True):
                want, _ = world.oracle.value(e, t, s)
                assert same(v, want), (s.name, e, t - world.newest, v, want)
                checked += want is not None and want != 0
    assert checked > 1000  # most of these comparisons are against non-empty windows


def test_offline_values_equal_the_oracle_at_random_times(world: World) -> None:
    rng = np.random.default_rng(5)
    ev = world.events
    ents: list[str] = []
    times: list[int] = []
    n = 200
    ents += rng.choice(world.entities, n).tolist()
    times += rng.integers(BASE - 5 * MIN, world.newest + 70 * MIN, n).tolist()
    pick = rng.choice(len(ev), 100, replace=False)
    ents += ev["user_id"].iloc[pick].tolist()
    # At an event's exact time, or 1 ms before it.
    times += (ev["ts"].iloc[pick].to_numpy() - np.where(np.arange(100) % 2, 1, 0)).tolist()
    bounds = rng.integers(BASE // MIN, (BASE + SPAN) // MIN + 10, 60) * MIN
    ents += rng.choice(world.entities, 60).tolist()
    times += (bounds - np.where(np.arange(60) % 3 == 0, 1, 0)).tolist()  # on tile/hop boundaries and -1ms
    hops = (rng.integers(BASE // (10 * MIN), (BASE + SPAN) // (10 * MIN) + 2, 40) * 10 * MIN).tolist()
    ents += rng.choice(world.entities, 40).tolist()
    times += hops
    ents += ["nobody", "nobody"]
    times += [world.newest, BASE + HOUR]
    out = _training(world.store, world.view, ents, times)
    assert len(out) == len(ents)
    assert out["user_id"].tolist() == ents
    nonempty = 0
    for s in SPECS:
        col = _col(out, f"{world.view.name}:{s.name}")
        for e, t, v in zip(ents, times, col, strict=True):
            want, _ = world.oracle.value(e, int(t), s)
            assert same(v, want), (s.name, e, int(t), v, want)
            nonempty += want not in (None, 0)
    assert nonempty > 5000


def test_online_equals_offline_for_the_same_entity_and_time(world: World) -> None:
    ents = world.entities * len(world.online_times)
    times = [t for t in world.online_times for _ in world.entities]
    off = _training(world.store, world.view, ents, times)
    for t in world.online_times:
        on = _online(world.store, world.view, world.entities, t)
        rows = off[off["event_timestamp"] == pd.Timestamp(t, unit="ms", tz="UTC")]
        assert rows["user_id"].tolist() == world.entities
        for s in SPECS:
            name = f"{world.view.name}:{s.name}"
            for e, a, b in zip(world.entities, on.values[name], _col(rows, name), strict=True):
                assert same(a, b) and same(b, a), (s.name, e, t, a, b)


def test_event_times_are_those_of_the_newest_contributing_event(world: World) -> None:
    checked = 0
    for t in world.online_times:
        got = _online(world.store, world.view, [*world.entities, "nobody"], t)
        for s in SPECS:
            times = got.event_times[f"{world.view.name}:{s.name}"]
            for e, when in zip([*world.entities, "nobody"], times, strict=True):
                _, newest = world.oracle.value(e, t, s)
                if newest is None:
                    assert when is None, (s.name, e, t)
                else:
                    assert when == ms_dt(newest), (s.name, e, t, when, ms_dt(newest))
                    checked += 1
    assert checked > 500


def test_values_expire_as_of_read_time_without_new_events(world: World) -> None:
    last = world.events.loc[world.events["ts"].idxmax()]
    who, at = last["user_id"], int(last["ts"])
    feats = [
        f"{world.view.name}:{n}"
        for n in ("sum_amount_sl10m", "count_events_sl10m", "mean_amount_sl10m", "count_events_sl1h")
    ]

    now = world.store.get_online_features(feats, [who], as_of=ms_dt(at)).values
    assert now[feats[0]][0] > 0
    assert now[feats[1]][0] >= 1
    assert now[feats[2]][0] is not None

    later = world.store.get_online_features(feats, [who], as_of=ms_dt(at + 11 * MIN)).values
    assert later[feats[0]] == [0.0]
    assert later[feats[1]] == [0]
    assert later[feats[2]] == [None]
    assert later[feats[3]][0] >= 1  # the hour window still holds it
    much_later = world.store.get_online_features(feats, [who], as_of=ms_dt(at + 62 * MIN)).values
    assert much_later[feats[3]] == [0]


def test_redis_keys_have_a_ttl_under_the_prefix_and_delta_is_partitioned_by_date(
    world: World, redis_client: redis.Redis
) -> None:
    view, rt = world.view, world.runtime
    ns = f"{rt.redis_prefix}:{view.name}:{view.version}"
    keys = sorted(k.decode() for k in redis_client.scan_iter(match=f"{rt.redis_prefix}:*", count=1000))
    tiles = [f"{ns}:{e}" for e in world.entities]
    guards = [f"{ns}#g:{e}" for e in world.entities]
    assert keys == sorted([*tiles, *guards, f"{ns}#epoch"])
    assert redis_client.pttl(f"{ns}#epoch") == -1  # the epoch token never expires
    ttl_ms = (60 + 1) * MIN  # longest lookback (1h sliding) plus one tile
    for k in tiles + guards:
        pttl = redis_client.pttl(k)
        assert 0 < pttl <= ttl_ms, (k, pttl)

    uri = world.store.offline.table_uri(view.name, view.version)
    assert uri.startswith(rt.delta_uri)
    table = DeltaTable(uri)
    assert table.metadata().partition_columns == ["date"]
    arrow = table.to_pyarrow_table()
    data = arrow.to_pandas()
    assert len(data) == len(world.events)
    ts_ms = arrow.column("event_ts").cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()
    assert sorted(ts_ms.tolist()) == sorted(world.events["ts"].tolist())
    days = pd.to_datetime(ts_ms, unit="ms", utc=True).strftime("%Y-%m-%d").tolist()
    stored_days = [str(d)[:10] for d in arrow.column("date").to_pylist()]  # str or date: same ISO day
    assert stored_days == days
    assert set(stored_days) == {"2024-03-10", "2024-03-11"}
    stored = sorted(zip(data["_partition"].tolist(), data["_offset"].tolist(), strict=True))
    expect = sorted(zip(world.events["partition"].tolist(), world.events["offset"].tolist(), strict=True))
    assert stored == expect


def _online_snapshot(store: FeatureStore, view: FeatureView, entities: list[str], times: list[int]) -> list:
    out = []
    for t in times:
        got = _online(store, view, entities, t)
        out.append((got.values, got.event_times))
    return out


def test_running_the_same_dataflow_again_changes_nothing(world: World) -> None:
    uri = world.store.offline.table_uri(world.view.name, world.view.version)
    before = _online_snapshot(world.store, world.view, world.entities, world.online_times)
    rows_before = DeltaTable(uri).to_pyarrow_table().num_rows
    run_views([world.view], world.runtime)
    after = _online_snapshot(world.store, world.view, world.entities, world.online_times)
    assert after == before
    assert DeltaTable(uri).to_pyarrow_table().num_rows == rows_before == len(world.events)


def test_two_workers_give_the_same_results_as_one(world: World, runtime: RuntimeConfig) -> None:
    assert runtime.redis_prefix != world.runtime.redis_prefix and runtime.delta_uri != world.runtime.delta_uri
    run_views([world.view], runtime, workers=2)
    two = _store(world.view, runtime)
    for t in world.online_times:
        a = _online(world.store, world.view, world.entities, t)
        b = _online(two, world.view, world.entities, t)
        for name in a.values:
            for e, x, y in zip(world.entities, a.values[name], b.values[name], strict=True):
                assert same(y, x) and same(x, y), (name, e, t, x, y)
            assert a.event_times[name] == b.event_times[name]
    rng = np.random.default_rng(11)
    ents = rng.choice(world.entities, 150).tolist()
    times = rng.integers(BASE, world.newest + HOUR, 150).tolist()
    one_off = _training(world.store, world.view, ents, times)
    two_off = _training(two, world.view, ents, times)
    for s in SPECS:
        name = f"{world.view.name}:{s.name}"
        for e, t, x, y in zip(ents, times, _col(one_off, name), _col(two_off, name), strict=True):
            assert same(y, x) and same(x, y), (name, e, t, x, y)
    uri = two.offline.table_uri(world.view.name, world.view.version)
    assert DeltaTable(uri).to_pyarrow_table().num_rows == len(world.events)
