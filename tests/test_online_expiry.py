"""Online keys that expired (their TTL ran out while the worker was down or behind) are rebuilt
from the worker's state when an append reaches them, rather than holding only the newer tiles:
the worker stops, the entities' keys expire, the worker resumes from its recovery dir and new
events touch a few entities; their online values (tile and object aggregations) must equal an
oracle over all their events."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
from confluent_kafka import Producer

from connectors.redis_store import RedisOnlineStore
from engine.definitions import duration_ms
from engine.state import TileState
from engine.tiles import TileLayout
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.support import pay_pipeline, unique, worker_env

T0 = 1_700_000_000_000
USERS = 20
PARTITIONS = 3
FUNCTIONS = ("count", "sum", "first", "count_distinct")


def _events(start: int, n: int, users: int = USERS) -> list[dict]:
    # Each user's events are spread over every partition and many 1-minute tiles.
    return [
        {"user_id": f"u{i % users}", "amount": float(i % 7), "ts": T0 + i * 1000}
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


def _oracle(events: list[dict], user: str) -> tuple[float, float, float, float]:
    mine = sorted((e for e in events if e["user_id"] == user), key=lambda e: e["ts"])
    amounts = [e["amount"] for e in mine]
    return float(len(mine)), float(sum(amounts)), amounts[0], float(len(set(amounts)))


def _num(x: object) -> float:
    return -1.0 if x is None or x != x else float(x)  # type: ignore[arg-type]


def _online(store: FeatureStore, users: list[str], at: datetime) -> dict[str, tuple]:
    got = store.get_online_features(["pay"], users, as_of=at).values
    names = ("events_count_1d", "amount_sum_1d", "amount_first_1d", "amount_count_distinct_1d")
    return {u: tuple(_num(got[f"pay:{n}"][i]) for n in names) for i, u in enumerate(users)}


def _wait_equal(store: FeatureStore, users: list[str], events: list[dict], timeout: float) -> None:
    at = datetime.fromtimestamp((events[-1]["ts"] + 1000) / 1000, UTC)
    want = {u: _oracle(events, u) for u in users}
    deadline = time.monotonic() + timeout
    while True:
        got = _online(store, users, at)
        wrong = {u: (got[u], want[u]) for u in users if got[u] != want[u]}
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(wrong)} of {len(users)} entities differ online (got, want): {wrong}")
        time.sleep(0.3)


def test_resumed_worker_rebuilds_entities_whose_keys_expired(
    services: Services, topic, tmp_path: Path
) -> None:
    name = topic(partitions=PARTITIONS)
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pay_pipeline(name, FUNCTIONS))
    view = load_views(pipeline)[0]
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    prefix = unique("expiry")
    env = worker_env(services.kafka, services.redis_url, tmp_path, prefix)
    store = FeatureStore(
        [view], redis_url=services.redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix
    )
    users = [f"u{i}" for i in range(USERS)]
    first = _events(0, 1200)
    _produce(services.kafka, name, first, 0)
    worker = _worker(pipeline, recovery, env)
    try:
        _wait_equal(store, users, first, timeout=60)
        time.sleep(2.5)  # a snapshot after everything is stored
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    # While the worker is down, every entity's keys reach their TTL (the epoch token has none).
    client = redis.Redis.from_url(services.redis_url)
    ns = RedisOnlineStore.namespace_of(prefix, view.name, view.version)
    keys = [k for k in client.scan_iter(match=ns[:-1] + "[:#]*") if not k.endswith(b"#epoch")]
    assert keys
    for k in keys:
        client.pexpire(k, 1)
    time.sleep(0.05)
    # New events for five entities (tile 20: tiles 0-19 of those entities are only in the state).
    more = _events(1200, 60, users=5)
    _produce(services.kafka, name, more, 1200)
    resumed = _worker(pipeline, recovery, env)
    try:
        _wait_equal(store, [f"u{i}" for i in range(5)], first + more, timeout=40)
    finally:
        resumed.send_signal(signal.SIGTERM)
        out, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, out


def test_store_refuses_an_append_to_an_entity_without_keys(services: Services) -> None:
    """The guarded script: an append to an entity with no guard or no tiles key is refused and
    the entity listed as lost; a replacing write is applied; the state's rewrite repairs it."""
    store = RedisOnlineStore(services.redis_url, unique("refuse"))
    ns = store.namespace("v", "1")
    layout = TileLayout.of(_view())
    state = TileState(layout, duration_ms(_view().max_lookback) + layout.tile_ms)
    ts = np.array([T0, T0 + 120_000], dtype=np.int64)
    cols = [np.array([1.0, 2.0])]
    first = state.apply(["a"], np.array([0, 0]), ts, cols, 0, np.array([0, 1]))
    assert first.rewrite.tolist() == [True]  # an entity's first write replaces
    ttl = duration_ms(_view().effective_ttl)
    assert store.write(ns, [first], ttl, layout.row_bytes) == 1
    store.client.delete(ns + "a", RedisOnlineStore.guard_namespace(ns) + "a")  # expired
    later = state.apply(["a"], np.array([0]), np.array([T0 + 240_000]), [np.array([3.0])], 0, np.array([2]))
    assert later.rewrite.tolist() == [False]
    assert store.write(ns, [later], ttl, layout.row_bytes) == 0
    assert store.read_tiles(ns, ["a"]) == [b""]
    assert store.lost_entities(ns) == {"a"}
    fix = state.rewrite(["a", "unknown"])
    assert fix.entities == ["a"] and not fix.force
    assert store.write(ns, [fix], ttl, layout.row_bytes) == 1
    store.forget_lost(ns, ["a"])
    assert store.lost_entities(ns) == set()
    stored = np.frombuffer(store.read_tiles(ns, ["a"])[0], "<f8").reshape(-1, layout.width)
    assert np.array_equal(stored, state.tiles_of("a"))
    assert store.delete_namespace(ns) >= 2


def _view():
    import tempfile

    path = Path(tempfile.mkdtemp()) / "pay.py"
    path.write_text(pay_pipeline("expiry", ("count", "sum")))
    return load_views(path)[0]
