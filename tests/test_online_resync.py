"""A Redis that lost its data (flushed, or restarted without persistence) is rebuilt from the
worker's state, with the worker running or resuming from its recovery dir."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from confluent_kafka import Producer

from connectors.delta_store import DeltaOfflineStore
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.outage_helpers import PrivateRedis
from tests.support import pay_pipeline, unique, worker_env

T0 = 1_700_000_000_000
USERS = 30
PARTITIONS = 3


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def _events(start: int, n: int) -> list[dict]:
    # Each user's events are spread over every partition (round-robin by event number).
    return [
        {"user_id": f"u{i % USERS}", "amount": float(i % 97), "ts": T0 + i * 1000}
        for i in range(start, start + n)
    ]


def _produce(bootstrap: str, topic: str, events: list[dict], first: int) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    for i, e in enumerate(events, first):
        p.produce(topic, value=json.dumps(e).encode(), partition=i % PARTITIONS)
    assert p.flush(30) == 0


def _worker(pipeline: Path, recovery: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bytewax.run", f"{pipeline}:flow", "-r", str(recovery), "-s", "1", "-b", "0"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_rows(offline: DeltaOfflineStore, uri: str, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = offline.read(uri)
        if table is not None and table.num_rows >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"Delta did not reach {n} rows in {timeout}s")


def _check_online(
    view, redis_url: str, prefix: str, tmp_path: Path, events: list[dict], timeout: float
) -> None:
    """Online values converge to the oracle within ``timeout`` seconds."""
    store = FeatureStore([view], redis_url=redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix)
    at = datetime.fromtimestamp((T0 + (len(events) + 1) * 1000) / 1000, UTC)
    users = [f"u{i}" for i in range(USERS)]
    want_count = [sum(1 for e in events if e["user_id"] == u) for u in users]
    want_sum = [sum(e["amount"] for e in events if e["user_id"] == u) for u in users]
    want_max = [max(e["amount"] for e in events if e["user_id"] == u) for u in users]
    deadline = time.monotonic() + timeout
    while True:
        got = store.get_online_features(["pay"], users, as_of=at).values
        wrong = [
            u
            for i, u in enumerate(users)
            if (got["pay:events_count_1d"][i], got["pay:amount_sum_1d"][i], got["pay:amount_max_1d"][i])
            != (want_count[i], want_sum[i], want_max[i])
        ]
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(wrong)} of {USERS} entities differ online, e.g. {wrong[:3]}")
        time.sleep(0.3)


def _setup(services: Services, topic, tmp_path: Path, redis_url: str):
    name = topic(partitions=PARTITIONS)
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pay_pipeline(name, ("count", "sum", "max")))
    view = load_views(pipeline)[0]
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    prefix = unique("resync")
    env = worker_env(services.kafka, redis_url, tmp_path, prefix)
    offline = DeltaOfflineStore(str(tmp_path / "delta"))
    return name, pipeline, view, recovery, prefix, env, offline, offline.table_uri(view.name, view.version)


def test_running_worker_rebuilds_a_flushed_redis(
    services: Services, topic, tmp_path: Path, private_redis
) -> None:
    name, pipeline, view, recovery, prefix, env, offline, uri = _setup(
        services, topic, tmp_path, private_redis.url
    )
    _produce(services.kafka, name, _events(0, 900), 0)
    worker = _worker(pipeline, recovery, env)
    try:
        _wait_for_rows(offline, uri, 900)
        _check_online(view, private_redis.url, prefix, tmp_path, _events(0, 900), timeout=30)
        redis.Redis.from_url(private_redis.url).flushall()  # the store lost everything
        _produce(services.kafka, name, _events(900, 300), 900)  # touches only some tiles
        _check_online(view, private_redis.url, prefix, tmp_path, _events(0, 1200), timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    assert "lost its data" in out


def test_resumed_worker_rebuilds_a_redis_restarted_empty(
    services: Services, topic, tmp_path: Path, private_redis
) -> None:
    """The worker stops; Redis restarts without its data; the worker resumes from its recovery dir
    with no new event for most entities: online must still converge."""
    name, pipeline, view, recovery, prefix, env, offline, uri = _setup(
        services, topic, tmp_path, private_redis.url
    )
    _produce(services.kafka, name, _events(0, 900), 0)
    worker = _worker(pipeline, recovery, env)
    try:
        _wait_for_rows(offline, uri, 900)
        _check_online(view, private_redis.url, prefix, tmp_path, _events(0, 900), timeout=30)
        time.sleep(2.5)  # a snapshot after everything is stored
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    private_redis.stop()
    private_redis.wipe()
    private_redis.start()  # empty
    _produce(services.kafka, name, _events(900, 3), 900)  # three entities get one event each
    resumed = _worker(pipeline, recovery, {**env, "FEATURESTREAM_BOUNDED": "true"})
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    _check_online(view, private_redis.url, prefix, tmp_path, _events(0, 903), timeout=5)
    shutil.rmtree(recovery)
