"""End to end against real services: Kafka -> dataflow -> Redis + Delta, checked against a pandas oracle.

One module-scoped data set (a few hundred random events, ~20 entities, ~2 h of event time,
4 partitions keyed by entity, some events out of order within the allowed lateness) is produced
and run once; every test reads it back. The oracle below computes each window from the raw events
with pandas/numpy only (no engine code) following the documented semantics:

* sliding ``size`` as of ``t``: events with ``ts <= t`` and ``tile_start(ts) > t - size``;
* hopping/tumbling as of ``t``: ``E = t // hop * hop``, events with ``E - size <= ts < E``;
* count/sum of an empty window are 0, the rest null; stddev is the sample one; ``last`` is the
  newest (by event time, then offset) non-null value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import redis
from deltalake import DeltaTable

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from featurestream.client import FeatureStore
from tests.support import create_topic, produce, read_topic, run_views, unique

SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN
BASE = int(datetime(2024, 3, 10, 23, 0, tzinfo=UTC).timestamp() * 1000)  # crosses midnight UTC
SPAN = 2 * HOUR
N_EVENTS = 700
N_ENTITIES = 20
PARTITIONS = 4
MAX_DISORDER = 3 * MIN  # below the view's allowed lateness (5m): out of order but accepted
LATENESS = 5 * MIN
RTOL = 1e-9

# label -> (kind, size ms, hop ms); the oracle uses these numbers, never the engine's windows.
WINDOWS: dict[str, tuple[str, int, int | None]] = {
    "sl10m": ("sliding", 10 * MIN, None),
    "sl1h": ("sliding", HOUR, None),
    "tu15m": ("tumbling", 15 * MIN, 15 * MIN),
    "ho30m10m": ("hopping", 30 * MIN, 10 * MIN),
}
# (function, column); column None = count of events.
FUNCS: list[tuple[str, str | None]] = [
    ("count", None),
    ("count", "amount"),
    ("sum", "amount"),
    ("mean", "amount"),
    ("min", "amount"),
    ("max", "amount"),
    ("last", "amount"),
    ("stddev", "amount"),
]
EXTRA: list[tuple[str, str | None, str]] = [
    ("sum", "qty", "sl10m"),
    ("max", "qty", "tu15m"),
    ("last", "qty", "ho30m10m"),
    ("stddev", "qty", "sl1h"),
]


@dataclass(frozen=True)
class Spec:
    name: str
    function: str
    column: str | None
    kind: str
    size: int
    hop: int | None


def _specs() -> list[Spec]:
    out = []
    for label, (kind, size, hop) in WINDOWS.items():
        for fn, col in FUNCS:
            out.append(Spec(f"{fn}_{col or 'events'}_{label}", fn, col, kind, size, hop))
    for fn, col, label in EXTRA:
        kind, size, hop = WINDOWS[label]
        out.append(Spec(f"{fn}_{col}_{label}", fn, col, kind, size, hop))
    return out


SPECS = _specs()


def _window(kind: str, size: int, hop: int | None) -> Window:
    if kind == "sliding":
        return Window.sliding(f"{size // MIN}m")
    if kind == "tumbling":
        return Window.tumbling(f"{size // MIN}m")
    return Window.hopping(f"{size // MIN}m", hop=f"{hop // MIN}m")  # type: ignore[operator]


def make_view(topic: str, name: str = "txn_features") -> FeatureView:
    source = EventSource(
        name="transactions",
        topic=topic,
        timestamp_field="ts",
        fields=(
            Field(name="user_id", dtype="str"),
            Field(name="amount", dtype="float", nullable=True),
            Field(name="qty", dtype="int"),
        ),
    )
    return FeatureView(
        name=name,
        entity=Entity(name="user", join_keys=("user_id",)),
        source=source,
        aggregations=tuple(
            Aggregation(
                function=s.function, column=s.column, window=_window(s.kind, s.size, s.hop), name=s.name
            )
            for s in SPECS
        ),
        tile_size="1m",
        allowed_lateness="5m",
    )


# ---------------------------------------------------------------------------------------------
# Oracle: pandas/numpy only.
# ---------------------------------------------------------------------------------------------


def window_mask(ts: np.ndarray, t: int, kind: str, size: int, hop: int | None) -> np.ndarray:
    if kind == "sliding":
        return (ts <= t) & ((ts // MIN) * MIN > t - size)
    assert hop is not None
    end = (t // hop) * hop
    return (ts >= end - size) & (ts < end)


def oracle_value(ev: pd.DataFrame, t: int, spec: Spec) -> tuple[Any, int | None]:
    """(value, newest contributing event time ms) of one feature for one entity's events ``ev``.

    ``ev`` is sorted by (ts, partition, offset).
    """
    sub = ev[window_mask(ev["ts"].to_numpy(), t, spec.kind, spec.size, spec.hop)]
    if spec.column is None:
        newest = int(sub["ts"].max()) if len(sub) else None
        return len(sub), newest
    sub = sub[sub[spec.column].notna()]
    vals = sub[spec.column].to_numpy(dtype=np.float64)
    newest = int(sub["ts"].max()) if len(sub) else None
    match spec.function:
        case "count":
            return len(vals), newest
        case "sum":
            return float(vals.sum()) if len(vals) else 0.0, newest
        case "mean":
            return (float(vals.mean()) if len(vals) else None), newest
        case "min":
            return (float(vals.min()) if len(vals) else None), newest
        case "max":
            return (float(vals.max()) if len(vals) else None), newest
        case "last":
            return (float(vals[-1]) if len(vals) else None), newest
        case "stddev":
            return (float(np.std(vals, ddof=1)) if len(vals) > 1 else None), newest
    raise AssertionError(spec.function)


def accepted_events(messages: list[Any], lateness_ms: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse the source topic as read back; split into (accepted, late) by the per-partition rule."""
    rows = []
    for m in messages:
        e = json.loads(m.value())
        rows.append({**e, "partition": m.partition(), "offset": m.offset()})
    df = pd.DataFrame(rows).sort_values(["partition", "offset"], kind="stable").reset_index(drop=True)
    late = np.zeros(len(df), dtype=bool)
    for _, g in df.groupby("partition", sort=False):
        newest = -np.inf
        for i, ts in zip(g.index, g["ts"], strict=True):
            late[i] = ts < newest - lateness_ms
            newest = max(newest, ts)
    acc = df[~late].sort_values(["user_id", "ts", "partition", "offset"], kind="stable")
    return acc.reset_index(drop=True), df[late].reset_index(drop=True)


class Oracle:
    def __init__(self, events: pd.DataFrame, key: str = "user_id") -> None:
        self.by_entity = {k: g.reset_index(drop=True) for k, g in events.groupby(key, sort=False)}
        self.empty = events.iloc[:0]

    def value(self, entity: str, t: int, spec: Spec) -> tuple[Any, int | None]:
        return oracle_value(self.by_entity.get(entity, self.empty), t, spec)


def same(actual: Any, expected: Any) -> bool:
    if expected is None:
        return actual is None
    if actual is None:
        return False
    if isinstance(expected, int):
        return actual == expected
    return bool(np.isclose(actual, expected, rtol=RTOL, atol=1e-9))


def ms_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


# ---------------------------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------------------------


def make_events(seed: int = 20240310) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.2, 3.0, N_ENTITIES)
    ent = rng.choice(N_ENTITIES, N_EVENTS, p=weights / weights.sum())
    ts = BASE + rng.integers(0, SPAN, N_EVENTS)
    ts[ent == N_ENTITIES - 1] = BASE + (ts[ent == N_ENTITIES - 1] - BASE) // 2  # goes quiet after 1h
    on_start = rng.choice(N_EVENTS, 30, replace=False)  # exactly on a tile start
    ts[on_start] = BASE + rng.integers(0, SPAN // MIN, 30) * MIN
    on_end = rng.choice(N_EVENTS, 20, replace=False)  # last ms of a tile
    ts[on_end] = BASE + rng.integers(1, SPAN // MIN, 20) * MIN - 1
    for i in rng.choice(N_EVENTS, 25, replace=False):  # same entity, same time: ties for `last`
        j = rng.choice(np.flatnonzero(ent == ent[i]))
        ts[j] = ts[i]
    amount = np.round(rng.lognormal(3.0, 1.0, N_EVENTS), 2)
    null = rng.random(N_EVENTS) < 0.1
    qty = rng.integers(-5, 20, N_EVENTS)
    null[np.argmax(ts)] = False
    # Produce order: event time plus up to MAX_DISORDER of jitter for 30% of events.
    jitter = np.where(rng.random(N_EVENTS) < 0.3, rng.integers(0, MAX_DISORDER, N_EVENTS), 0)
    order = np.argsort(ts + jitter, kind="stable")
    return [
        {
            "user_id": f"u{ent[i]:02d}",
            "ts": int(ts[i]),
            "amount": None if null[i] else float(amount[i]),
            "qty": int(qty[i]),
        }
        for i in order.tolist()
    ]


@dataclass
class World:
    kafka: str
    topic: str
    view: FeatureView
    runtime: RuntimeConfig
    store: FeatureStore
    events: pd.DataFrame
    oracle: Oracle
    entities: list[str]
    newest: int
    online_times: list[int]


def _runtime(kafka: str, redis_url: str, delta: Path) -> RuntimeConfig:
    return RuntimeConfig(
        kafka_bootstrap_servers=kafka,
        redis_url=redis_url,
        redis_prefix=unique("test"),
        delta_uri=str(delta),
        stop_at_end=True,
        batch_size=5_000,
        poll_timeout_seconds=0.02,
    )


def _store(view: FeatureView, runtime: RuntimeConfig) -> FeatureStore:
    return FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )


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


def _features(view: FeatureView) -> list[str]:
    return [f"{view.name}:{s.name}" for s in SPECS]


def _online(store: FeatureStore, view: FeatureView, entities: list[str], t: int) -> Any:
    return store.get_online_features(_features(view), entities, as_of=ms_dt(t))


def _training(store: FeatureStore, view: FeatureView, entities: list[str], times: list[int]) -> pd.DataFrame:
    stamps = pd.to_datetime(np.asarray(times, np.int64), unit="ms", utc=True)
    df = pd.DataFrame({"user_id": entities, "event_timestamp": stamps})
    return store.get_training_set(df, _features(view)).to_pandas(types_mapper=None)


def _col(df: pd.DataFrame, name: str) -> list[Any]:
    return [None if (isinstance(v, float) and np.isnan(v)) else v for v in df[name].tolist()]


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
    ns = f"{rt.redis_prefix}:{view.name}:{view.version}:"
    keys = sorted(k.decode() for k in redis_client.scan_iter(match=f"{rt.redis_prefix}:*", count=1000))
    assert keys == sorted(ns + e for e in world.entities)
    ttl_ms = (60 + 1) * MIN  # longest lookback (1h sliding) plus one tile
    for k in keys:
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
