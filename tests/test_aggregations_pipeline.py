"""Object aggregations end to end on real services: Kafka (4 partitions, shuffled arrival,
redelivered duplicates under a dedup_key) -> dataflow stopped and resumed from a recovery
directory mid-stream -> Redis (online) and Delta (training set), both equal to an oracle from
the raw events; and the guarded Redis script writes object records with the rows, once."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import redis

from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.definitions import FeatureView
from engine.state import TileState
from engine.tiles import TileLayout
from featurestream.client import FeatureStore
from tests.aggregations_helpers import Logs, assert_matches, oracle, random_events, same, view, window_events
from tests.conftest import Services
from tests.support import produce, unique, worker_env

_PIPELINE = """
from tests.aggregations_helpers import view

views = [view(topic={topic!r}, dedup=True)]


def __getattr__(name):
    if name == "flow":
        from featurestream.runtime import dataflow
        return dataflow(*views)
    raise AttributeError(name)
"""


def _run(v, runtime: RuntimeConfig, recovery: Path) -> None:
    flow = build_dataflow([v], runtime.model_copy(update={"stop_at_end": True}))
    run_dataflow(flow, recovery_dir=recovery, snapshot_seconds=0.2)


def test_online_equals_training_set_equals_oracle_across_a_restart(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=4)
    v = view(topic=name, dedup=True)
    rng = random.Random(5)
    evs = random_events(rng, 400, entities=9)
    for i, e in enumerate(evs):
        e["id"] = f"e{i}"
    sent = evs + rng.sample(evs, 40)  # redelivered duplicates
    rng.shuffle(sent)
    half = len(sent) // 2
    produce(services.kafka, name, sent[:half], key_field="user_id")
    _run(v, runtime, tmp_path / "recovery")
    produce(services.kafka, name, sent[half:], key_field="user_id")
    _run(v, runtime, tmp_path / "recovery")

    store = FeatureStore(
        [v], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    _check(v, store, sent)


def _check(v: FeatureView, store: FeatureStore, sent: list[dict]) -> None:
    """Online == training set (exactly, but for sums) == the oracle, per entity and feature."""
    kept: dict[str, dict] = {}
    for i, e in enumerate(sent):  # the first delivery of an id counts; an entity keeps one partition
        kept.setdefault(e["id"], {**e, "_partition": 0, "_offset": i})
    truth = list(kept.values())
    users = sorted({e["user_id"] for e in truth})
    at_ms = max(e["ts"] for e in truth)
    at = datetime.fromtimestamp(at_ms / 1000, UTC)

    def mine(u: str) -> list[dict]:
        return [e for e in truth if e["user_id"] == u]

    online = store.get_online_features(["objs"], [{"user_id": u} for u in users], as_of=at)
    entity_df = pa.table(
        {"user_id": users, "event_timestamp": pa.array([at] * len(users), pa.timestamp("ms", "UTC"))}
    )
    offline = store.get_training_set(entity_df, ["objs"])
    for agg in v.aggregations:
        on = online.values[f"objs:{agg.feature_name}"]
        off = offline.column(f"objs:{agg.feature_name}").to_pylist()
        for i, u in enumerate(users):
            where = f"{agg.feature_name} {u}"
            if agg.function != "sum":  # sums may differ in the last bits (docs/windows.md)
                assert same(on[i], off[i]), (where, on[i], off[i])
            assert_matches(agg, on[i], want := oracle(agg, window_events(agg, mine(u), at_ms)), where)
            assert_matches(agg, off[i], want, where)


def _sent(rng: random.Random, n: int, first_id: int) -> list[dict]:
    evs = random_events(rng, n, entities=9)
    for i, e in enumerate(evs):
        e["id"] = f"e{first_id + i}"
    sent = evs + rng.sample(evs, n // 10)  # redelivered duplicates
    rng.shuffle(sent)
    return sent


def test_killed_worker_resumes_with_the_same_values(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=4)
    v = view(topic=name, dedup=True)
    pipeline = tmp_path / "objs_pipeline.py"
    pipeline.write_text(_PIPELINE.format(topic=name))
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    prefix = unique("objk")
    env = {**worker_env(services.kafka, services.redis_url, tmp_path, prefix), "PYTHONPATH": str(Path.cwd())}
    cmd = [sys.executable, "-m", "bytewax.run", f"{pipeline}:flow", "-r", str(recovery), "-s", "1", "-b", "0"]
    store = FeatureStore(
        [v], redis_url=services.redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix
    )
    uri = store.offline.table_uri(v.name, v.version)
    rng = random.Random(21)
    waves = [_sent(rng, 300, 0), _sent(rng, 300, 1000), _sent(rng, 200, 2000)]
    produce(services.kafka, name, waves[0], key_field="user_id")
    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            table = store.offline.read(uri)
            if table is not None and table.num_rows > 0:
                break
            time.sleep(0.2)
        produce(services.kafka, name, waves[1], key_field="user_id")
        time.sleep(1.5)  # a snapshot or more, likely mid-way through the second wave
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    assert worker.returncode == -signal.SIGKILL
    produce(services.kafka, name, waves[2], key_field="user_id")
    resumed = subprocess.Popen(
        cmd,
        env={**env, "FEATURESTREAM_BOUNDED": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    stored = store.offline.read(uri)
    sent = [e for w in waves for e in w]
    assert stored.num_rows == len({e["id"] for e in sent})  # every event once
    _check(v, store, sent)


def test_guarded_script_writes_records_with_rows_once(services: Services) -> None:
    v = view()
    layout = TileLayout.of(v)
    state, logs = TileState(layout, 10**9), Logs()
    store = RedisOnlineStore(services.redis_url, unique("objs"))
    ns = store.namespace(v.name, v.version)
    rng = random.Random(11)
    updates = []
    for b in range(30):
        evs = random_events(rng, rng.randint(1, 12), entities=4)
        keys = sorted({e["user_id"] for e in evs})
        codes = np.array([keys.index(e["user_id"]) for e in evs], dtype=np.int64)
        ts = np.array([e["ts"] for e in evs], dtype=np.int64)
        x = np.array([np.nan if e["x"] is None else e["x"] for e in evs])
        m = np.array([np.nan if e["m"] is None else 0.0 for e in evs])
        offsets = np.arange(b * 100, b * 100 + len(evs), dtype=np.int64)
        text = {"m": [e["m"] for e in evs]}
        updates.append(state.apply(keys, codes, ts, [x, m], b % 2, offsets, text))
    for u in updates:
        logs.write(u)
        assert store.write(ns, [u], 0, layout.row_bytes) == len(u)
    assert store.write(ns, updates, 0, layout.row_bytes) == 0  # a replay: every position is old
    names = sorted(logs.rows)
    pairs = store.read_objects(ns, names)
    assert [p[0] for p in pairs] == [logs.rows[n] for n in names]
    assert [p[1] for p in pairs] == [logs.objects[n] for n in names]
    assert store.read_tiles(ns, names) == [logs.rows[n] for n in names]
    client = redis.Redis.from_url(services.redis_url)
    assert client.exists(*(RedisOnlineStore.objects_namespace(ns) + n for n in names)) == len(names)
    assert store.delete_namespace(ns) > 0
    assert client.exists(*(RedisOnlineStore.objects_namespace(ns) + n for n in names)) == 0
