"""Bytewax recovery: a worker killed mid-stream resumes from its snapshot, losing and duplicating nothing."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from connectors.delta_store import DeltaOfflineStore
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.support import pay_pipeline, produce, unique, worker_env

T0 = 1_700_000_000_000


def _events(start: int, n: int) -> list[dict]:
    return [
        {"user_id": f"u{i % 40}", "amount": float(i), "ts": T0 + i * 1000} for i in range(start, start + n)
    ]


def _env(services: Services, tmp_path: Path, prefix: str) -> dict[str, str]:
    return worker_env(services.kafka, services.redis_url, tmp_path, prefix)


def _worker(pipeline: Path, recovery: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bytewax.run", f"{pipeline}:flow", "-r", str(recovery), "-s", "1", "-b", "0"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_worker_resumes_exactly(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=2)
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pay_pipeline(name, ("count", "sum", "last")))
    view = load_views(pipeline)[0]
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    prefix = unique("rec")
    env = _env(services, tmp_path, prefix)
    offline = DeltaOfflineStore(str(tmp_path / "delta"))
    uri = offline.table_uri(view.name, view.version)

    produce(services.kafka, name, _events(0, 600), key_field="user_id")
    worker = _worker(pipeline, recovery, env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            table = offline.read(uri)
            if table is not None and table.num_rows > 0:
                break
            time.sleep(0.2)
        produce(services.kafka, name, _events(600, 600), key_field="user_id")
        time.sleep(1.5)  # at least one more snapshot, likely mid-way through the second wave
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    assert worker.returncode == -signal.SIGKILL

    produce(services.kafka, name, _events(1200, 300), key_field="user_id")
    resumed = _worker(pipeline, recovery, {**env, "FEATURESTREAM_BOUNDED": "true"})
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out

    events = _events(0, 1500)
    stored = offline.read(uri)
    pairs = list(
        zip(stored.column("_partition").to_pylist(), stored.column("_offset").to_pylist(), strict=True)
    )
    assert len(pairs) == len(set(pairs)) == len(events)  # every event once: nothing lost, nothing twice

    store = FeatureStore(
        [view], redis_url=services.redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix
    )
    at = datetime.fromtimestamp((T0 + 1500 * 1000) / 1000, UTC)
    users = [f"u{i}" for i in range(40)]
    online = store.get_online_features(["pay"], users, as_of=at)
    expected_count = [sum(1 for e in events if e["user_id"] == u) for u in users]
    expected_sum = [sum(e["amount"] for e in events if e["user_id"] == u) for u in users]
    expected_last = [max((e["ts"], e["amount"]) for e in events if e["user_id"] == u)[1] for u in users]
    assert online.values["pay:events_count_1d"] == expected_count
    assert online.values["pay:amount_sum_1d"] == expected_sum
    assert online.values["pay:amount_last_1d"] == expected_last
    entity_df = pa.table(
        {"user_id": users, "event_timestamp": pa.array([at] * 40, pa.timestamp("ms", "UTC"))}
    )
    training = store.get_training_set(entity_df, ["pay"])
    assert training.column("pay:amount_sum_1d").to_pylist() == expected_sum


def test_run_with_recovery_dir_resumes_without_rereading(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=1)
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pay_pipeline(name, ("count", "sum", "last")))
    prefix = unique("rec")
    env = _env(services, tmp_path, prefix)
    cmd = [
        sys.executable,
        "-m",
        "featurestream.cli",
        "run",
        str(pipeline),
        "--bounded",
        "--recovery-dir",
        str(tmp_path / "rec"),
        "--snapshot-seconds",
        "1",
    ]
    produce(services.kafka, name, _events(0, 200), key_field="user_id")
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert any((tmp_path / "rec").glob("part-*.sqlite3"))
    view = load_views(pipeline)[0]
    offline = DeltaOfflineStore(str(tmp_path / "delta"))
    uri = offline.table_uri(view.name, view.version)
    assert offline.read(uri).num_rows == 200
    shutil.rmtree(uri)  # a resumed run appends only what it reads from now on
    produce(services.kafka, name, _events(200, 100), key_field="user_id")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert offline.read(uri).num_rows == 100  # resumed at offset 200, not re-read from the start
    store = FeatureStore(
        [view], redis_url=services.redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix
    )
    at = datetime.fromtimestamp((T0 + 300 * 1000) / 1000, UTC)
    got = store.get_online_features(["pay:events_count_1d"], ["u0", "u1"], as_of=at)
    assert got.values["pay:events_count_1d"] == [8, 8]  # 300 events over 40 users: restored state + new
    assert "running pay" in second.stdout
