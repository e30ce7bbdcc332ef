"""The command line and deployment entry points, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.support import produce, unique, worker_env

T0 = 1_700_000_000_000
CLI = [sys.executable, "-m", "featurestream.cli"]

PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="clicks", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="value", dtype="float")),
)
clicks = FeatureView(
    name="clicks", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=(
        Aggregation(function="count", window="1d"),
        Aggregation(function="sum", column="value", window="1d"),
    ),
    tile_size="1m", allowed_lateness="1h",
)
views = [clicks]


def __getattr__(name):
    if name == "flow":
        from featurestream.runtime import dataflow
        return dataflow(*views)
    raise AttributeError(name)
"""


def _env(services: Services, tmp_path: Path, prefix: str) -> dict[str, str]:
    return worker_env(services.kafka, services.redis_url, tmp_path, prefix)


def _pipeline(tmp_path: Path, topic: str) -> Path:
    path = tmp_path / "clicks_pipeline.py"
    path.write_text(PIPELINE.format(topic=topic))
    return path


def _events(n_users: int, per_user: int) -> list[dict]:
    return [
        {"user_id": f"u{u}", "value": float(i), "ts": T0 + i * 1000 + u}
        for i in range(per_user)
        for u in range(n_users)
    ]


def _check_online(services: Services, tmp_path: Path, prefix: str, pipeline: Path, per_user: int) -> None:
    store = FeatureStore(
        load_views(pipeline),
        redis_url=services.redis_url,
        delta_uri=str(tmp_path / "delta"),
        redis_prefix=prefix,
    )
    from datetime import UTC, datetime

    at = datetime.fromtimestamp((T0 + per_user * 1000 + 60_000) / 1000, UTC)
    got = store.get_online_features(["clicks"], ["u0", "u1", "u7"], as_of=at)
    assert got.values["clicks:events_count_1d"] == [per_user] * 3
    assert got.values["clicks:value_sum_1d"] == [float(sum(range(per_user)))] * 3


@pytest.mark.parametrize("how", ["threads", "processes", "bytewax-run"])
def test_run_pipeline_file(services: Services, topic, tmp_path: Path, how: str) -> None:
    name = topic(partitions=3)
    pipeline = _pipeline(tmp_path, name)
    produce(services.kafka, name, _events(8, 25), key_field="user_id")
    prefix = unique("cli")
    env = _env(services, tmp_path, prefix)
    if how == "threads":
        cmd = [*CLI, "run", str(pipeline), "--bounded", "-w", "2"]
    elif how == "processes":
        cmd = [*CLI, "run", str(pipeline), "--bounded", "-p", "2"]
    else:
        env["FEATURESTREAM_BOUNDED"] = "true"
        cmd = [sys.executable, "-m", "bytewax.run", f"{pipeline}:flow", "-w", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_online(services, tmp_path, prefix, pipeline, 25)


def test_run_names_a_missing_topic(services: Services, tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, unique("absent"))
    proc = subprocess.run(
        [*CLI, "run", str(pipeline), "--bounded"],
        env=_env(services, tmp_path, "x"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stdout and "featurestream produce" in proc.stdout


def test_unreachable_configured_kafka_names_the_setting(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, "t")
    env = {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "FEATURESTREAM_STATE_DIR": str(tmp_path / "state"),
    }
    proc = subprocess.run([*CLI, "run", str(pipeline)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS" in proc.stdout


def test_invalid_pipeline_names_field_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(PIPELINE.format(topic="t").replace('window="1d")', 'window="90s")', 1))
    proc = subprocess.run(
        [*CLI, "run", str(bad)],
        env={**os.environ, "FEATURESTREAM_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "not a multiple of tile_size" in out and "aggregations.0" in out


def test_demo_runs_on_its_own_embedded_services(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATURESTREAM_")}
    env["FEATURESTREAM_STATE_DIR"] = str(tmp_path / "state")
    env["COLUMNS"] = "160"
    proc = subprocess.run(
        [*CLI, "demo", "--events", "6000", "--users", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "online features as of now" in out
    assert "training set sample" in out
    assert "dead letters:" in out and "late" in out
    assert "note: the generator injected" not in out  # every injected bad event reached the DLQ
    # The demo stopped the services it started.
    state = tmp_path / "state" / "services.json"
    assert not state.exists() or json.loads(state.read_text()) == {}


def test_quiet_stream_flushes_offline_and_sigterm_stops_cleanly(
    services: Services, topic, tmp_path: Path
) -> None:
    import signal
    import time

    from connectors.delta_store import DeltaOfflineStore

    name = topic(partitions=2)
    pipeline = _pipeline(tmp_path, name)
    produce(services.kafka, name, _events(5, 8), key_field="user_id")
    env = _env(services, tmp_path, unique("stop"))
    worker = subprocess.Popen(
        [*CLI, "run", str(pipeline)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        view = load_views(pipeline)[0]
        store = DeltaOfflineStore(str(tmp_path / "delta"))
        uri = store.table_uri(view.name, view.version)
        deadline = time.monotonic() + 60
        rows = 0
        while time.monotonic() < deadline:
            table = store.read(uri)
            rows = 0 if table is None else table.num_rows
            if rows == 40:
                break
            time.sleep(0.5)
        # The stream went quiet after 40 events: the timer flushed them without new arrivals.
        assert rows == 40
        produce(services.kafka, name, _events(5, 10)[40:], key_field="user_id")
        time.sleep(1.0)
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, out
    assert store.read(uri).num_rows == 50
