"""Session windows through real Kafka, Bytewax, Redis and Delta: online == training set == oracle,
also after a worker is killed (SIGKILL) mid-stream and resumes from its recovery directory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from confluent_kafka import Producer

from connectors.delta_store import DeltaOfflineStore
from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Derived, FeatureView
from engine.reads import point_in_time_values
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.sessions_helpers import BASE, GAP, close, feature_key, make_events, make_view, oracle
from tests.support import produce, read_topic, run_views, unique, worker_env


def _accepted(kafka: str, topic: str) -> pd.DataFrame:
    rows = [
        {**json.loads(m.value()), "partition": m.partition(), "offset": m.offset()}
        for m in read_topic(kafka, topic)
    ]
    return pd.DataFrame(rows)


def _ms(t: int) -> datetime:
    return datetime.fromtimestamp(t / 1000, UTC)


def _compare(
    store: FeatureStore, view: FeatureView, events: pd.DataFrame, offline: DeltaOfflineStore | None
) -> int:
    """Online (as of now: at or after each entity's newest event) and point-in-time values from
    the Delta event log against the oracle; returns how many values were compared."""
    frames = {u: g for u, g in events.groupby("user_id")}
    aggs = [a for a in view.aggregations if a.window.kind == "session"]
    bad: list[Any] = []
    n = 0
    rows_u: list[str] = []
    rows_t: list[int] = []
    for u, ev in frames.items():
        newest = int(ev["ts"].max())
        for t in (newest, newest + 1, newest + GAP - 1, newest + GAP, newest + 40 * GAP):
            got = store.get_online_features([view.name], [u], as_of=_ms(t)).values
            want = {w: oracle(ev, t, GAP, w) for w in ("current", "last")}
            for a in aggs:
                value = got[f"{view.name}:{a.feature_name}"][0]
                expected = want[a.window.which or "current"][feature_key(a)]
                n += 1
                if not close(value, expected):
                    bad.append(("online", a.feature_name, u, t - BASE, value, expected))
            rows_u.append(u)
            rows_t.append(t)
        ts = sorted(set(ev["ts"].tolist()))
        for t in ts[:: max(1, len(ts) // 8)]:  # times inside sessions, and at their edges
            rows_u += [u, u, u]
            rows_t += [t, t + GAP - 1, t + GAP]
    if offline is not None:  # the Delta event log, as training sets read it
        events_log = offline.read(offline.table_uri(view.name, view.version))
        at = np.asarray(rows_t, np.int64)
        found = point_in_time_values(view, events_log, rows_u, at, list(aggs))
        for i, (u, t) in enumerate(zip(rows_u, rows_t, strict=True)):
            want = {w: oracle(frames[u], t, GAP, w) for w in ("current", "last")}
            for a in aggs:
                value = float(found[a.feature_name][0][i])
                expected = want[a.window.which or "current"][feature_key(a)]
                n += 1
                if not close(value, expected):
                    bad.append(("offline", a.feature_name, u, t - BASE, value, expected))
    assert not bad, bad[:10]
    return n


def test_online_equals_offline_equals_oracle(
    services: Services, topic, runtime: RuntimeConfig, redis_client: Any
) -> None:
    name = topic(partitions=4)
    hour = Aggregation(function="count", window="1h")
    view = make_view(name, extra=(hour,))
    view = view.model_copy(
        update={
            "derived": (
                Derived(name="session_share", expression="events_count_session_10m / events_count_1h"),
            )
        }
    )
    produce(services.kafka, name, make_events(3), key_field="user_id")
    run_views([view], runtime)
    assert not read_topic(services.kafka, f"{name}.dlq")  # every shuffled event within lateness
    events = _accepted(services.kafka, name)
    assert sorted(events["partition"].unique().tolist()) == [0, 1, 2, 3]
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    assert _compare(store, view, events, DeltaOfflineStore(runtime.delta_uri)) > 1000
    ns = f"{runtime.redis_prefix}:{view.name}:{view.version}"
    assert (
        redis_client.exists(f"{ns}/sessions:u1", f"{ns}/sessions#g:u1", f"{ns}:u1") == 3
    )  # own keys and guard
    u = "u1"
    newest = int(events.loc[events["user_id"] == u, "ts"].max())
    got = store.get_online_features([f"{view.name}:session_share"], [u], as_of=_ms(newest)).values
    parts = store.get_online_features([view.name], [u], as_of=_ms(newest)).values
    share = parts[f"{view.name}:events_count_session_10m"][0] / parts[f"{view.name}:events_count_1h"][0]
    assert got[f"{view.name}:session_share"][0] == share


def test_entities_spread_over_four_partitions(services: Services, topic, runtime: RuntimeConfig) -> None:
    """Each entity's events land on random partitions, and the worker reads one partition's
    backlog before the next: a partition lagging far behind another must still find
    the sessions its events extend or bridge."""
    name = topic(partitions=4)
    view = make_view(name)
    producer = Producer({"bootstrap.servers": services.kafka, "linger.ms": 5})
    rng = np.random.default_rng(9)
    for event in make_events(9, n=400, entities=5, ties=False):
        producer.produce(name, value=json.dumps(event).encode(), partition=int(rng.integers(0, 4)))
    assert producer.flush(30) == 0
    del producer
    run_views([view], runtime)  # batches of 5000: each partition's backlog at once
    assert not read_topic(services.kafka, f"{name}.dlq")
    events = _accepted(services.kafka, name)
    spread = events.groupby("user_id")["partition"].nunique()
    assert (spread > 1).all(), spread
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    assert _compare(store, view, events, DeltaOfflineStore(runtime.delta_uri)) > 1000


def test_training_set_equals_oracle(services: Services, topic, runtime: RuntimeConfig) -> None:
    name = topic(partitions=4)
    view = make_view(name)
    produce(services.kafka, name, make_events(4, n=120, entities=4), key_field="user_id")
    run_views([view], runtime)
    events = _accepted(services.kafka, name)
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    frames = {u: g for u, g in events.groupby("user_id")}
    users, times = [], []
    late = int(events["ts"].quantile(0.6))  # rows late in the stream: sessions began before them
    for u, ev in frames.items():
        for t in sorted(set(ev["ts"].tolist())):
            if t >= late:
                users += [u, u]
                times += [t, t + GAP]
    stamps = pd.to_datetime(np.asarray(times, np.int64), unit="ms", utc=True)
    df = store.get_training_set(pd.DataFrame({"user_id": users, "event_timestamp": stamps}), [view.name])
    df = df.to_pandas()
    bad = []
    for i, (u, t) in enumerate(zip(users, times, strict=True)):
        want = {w: oracle(frames[u], t, GAP, w) for w in ("current", "last")}
        for a in view.aggregations:
            value = df[f"{view.name}:{a.feature_name}"].iloc[i]
            expected = want[a.window.which or "current"][feature_key(a)]
            if not close(None if pd.isna(value) else float(value), expected):
                bad.append((a.feature_name, u, t - BASE, value, expected))
    assert not bad, bad[:10]


_PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field, Window

aggs = []
for which in ("current", "last"):
    w = Window.session("10m", which=which)
    aggs += [Aggregation(function="count", window=w), Aggregation(function="duration", window=w)]
    for f in ("sum", "mean", "max", "last", "stddev"):
        aggs.append(Aggregation(function=f, column="amount", window=w))
views = [FeatureView(
    name="sess", entity=Entity(name="user", join_keys=("user_id",)),
    source=EventSource(name="clicks", topic="{topic}", timestamp_field="ts",
        fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float", nullable=True))),
    aggregations=tuple(aggs), tile_size="1m", allowed_lateness="5m",
)]


def __getattr__(name):
    if name == "flow":
        from featurestream.runtime import dataflow
        return dataflow(*views)
    raise AttributeError(name)
"""


def _worker(pipeline: Path, recovery: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bytewax.run", f"{pipeline}:flow", "-r", str(recovery), "-s", "1", "-b", "0"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_worker_resumes_with_the_same_sessions(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=4)
    pipeline = tmp_path / "sess.py"
    pipeline.write_text(_PIPELINE.replace("{topic}", name))
    view = load_views(pipeline)[0]
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    prefix = unique("sess")
    env = worker_env(services.kafka, services.redis_url, tmp_path, prefix)
    offline = DeltaOfflineStore(str(tmp_path / "delta"))
    uri = offline.table_uri(view.name, view.version)
    events = make_events(5, n=1200, entities=12, span=600 * 60_000)
    waves = np.array_split(np.arange(len(events)), 3)

    produce(services.kafka, name, [events[i] for i in waves[0]], key_field="user_id")
    worker = _worker(pipeline, recovery, env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            table = offline.read(uri)
            if table is not None and table.num_rows > 0:
                break
            time.sleep(0.2)
        produce(services.kafka, name, [events[i] for i in waves[1]], key_field="user_id")
        time.sleep(1.5)  # at least one more snapshot, likely mid-way through the second wave
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    assert worker.returncode == -signal.SIGKILL

    produce(services.kafka, name, [events[i] for i in waves[2]], key_field="user_id")
    resumed = _worker(pipeline, recovery, {**env, "FEATURESTREAM_BOUNDED": "true"})
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert not read_topic(services.kafka, f"{name}.dlq")

    stored = offline.read(uri)
    pairs = list(
        zip(stored.column("_partition").to_pylist(), stored.column("_offset").to_pylist(), strict=True)
    )
    assert len(pairs) == len(set(pairs)) == len(events)
    store = FeatureStore(
        [view], redis_url=services.redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix
    )
    assert _compare(store, view, _accepted(services.kafka, name), offline) > 500
