"""Verify: no mismatch on a live pipeline, the planted corruption found, metrics exported."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig
from engine.tiles import N, TileLayout
from engine.verify import verify_view
from engine.verify_source import read_source
from tests.backfill_helpers import (
    accepted,
    make_events,
    mismatches,
    now_ms,
    pay_view,
    pipeline_text,
    produce_spread,
    read_values,
    store_of,
)
from tests.conftest import Services
from tests.support import produce, worker_env

USERS = [f"u{i}" for i in range(30)]
BAD = [b"not json", b"[1, 2]", json.dumps({"user_id": "u1", "amount": "ten", "ts": 1}).encode()]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "featurestream.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _verify(pipeline: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "featurestream.cli", "verify", str(pipeline), "pay", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _metrics(path: Path) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _setup(services: Services, topic, tmp_path: Path) -> tuple[str, Path, dict[str, str], RuntimeConfig]:
    t_name = topic(partitions=4)
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pipeline_text(t_name))
    env = worker_env(services.kafka, services.redis_url, tmp_path, f"verify-{t_name}")
    runtime = RuntimeConfig(
        kafka_bootstrap_servers=services.kafka,
        redis_url=services.redis_url,
        delta_uri=env["FEATURESTREAM_DELTA_URI"],
        redis_prefix=env["FEATURESTREAM_REDIS_PREFIX"],
    )
    produce_spread(services.kafka, t_name, make_events(2_000, len(USERS), seed=11))
    produce(services.kafka, t_name, BAD)
    return t_name, pipeline, env, runtime


def test_recomputation_matches_an_independent_oracle(services: Services, topic, tmp_path: Path) -> None:
    t_name, _, _, _ = _setup(services, topic, tmp_path)
    view = pay_view(t_name)
    events = read_source(view, services.kafka)
    good = accepted(_valid_frame(services.kafka, t_name))
    assert events.dead == len(BAD) and events.read == 2_000 + len(BAD)
    assert len(events.ts) == len(good) and events.late == 2_000 - len(good) > 0
    assert sorted(zip(events.entity.tolist(), events.ts.tolist(), strict=True)) == sorted(
        zip(good["user_id"], good["ts"], strict=True)
    )


def _valid_frame(kafka: str, topic_name: str):
    """The topic as read back, without the invalid messages (the oracle's own parsing)."""
    from tests.support import read_topic

    rows = []
    for m in read_topic(kafka, topic_name):
        try:
            e = json.loads(m.value())
        except ValueError:
            continue
        if not isinstance(e, dict) or not isinstance(e.get("amount"), float | int | type(None)):
            continue
        rows.append({**e, "partition": m.partition(), "offset": m.offset()})
    import pandas as pd

    return pd.DataFrame(rows).sort_values(["partition", "offset"], kind="stable").reset_index(drop=True)


def test_verify_live_pipeline_then_planted_corruption(services: Services, topic, tmp_path: Path) -> None:
    t_name, pipeline, env, runtime = _setup(services, topic, tmp_path)
    view = pay_view(t_name)
    worker = _cli(["run", str(pipeline)], env)
    try:
        events = accepted(_valid_frame(services.kafka, t_name))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the worker caught up with the topic
            t = now_ms()
            if not mismatches(read_values(store_of(view, runtime), view, USERS, t), events, False, USERS, t):
                break
            time.sleep(0.5)
        metrics = tmp_path / "verify.prom"
        live = _verify(pipeline, env, "--sample", "12", "--seed", "7", "--metrics-file", str(metrics))
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    assert live.returncode == 0, live.stdout + live.stderr
    assert "ok: every compared value matches" in live.stdout
    found = _metrics(metrics)
    ratios = {
        dict(k[1])["feature"]: v for k, v in found.items() if k[0] == "featurestream_verify_mismatch_ratio"
    }
    assert set(ratios) == {a.feature_name for a in view.aggregations} and set(ratios.values()) == {0.0}
    assert found[("featurestream_verify_freshness_seconds", (("view", "pay"),))] == 0.0

    # Plant a corruption: one more event in the newest tile of one user, in Redis only.
    client = redis.Redis.from_url(services.redis_url)
    key = RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version) + "u3"
    rows = np.frombuffer(client.get(key), dtype="<f8").reshape(-1, TileLayout.of(view).width).copy()
    rows[-1, N] += 1
    client.set(key, rows.tobytes(), keepttl=True)
    client.close()
    bad = _verify(pipeline, env, "--sample", "100", "--metrics-file", str(metrics))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "events_count_1d: u3: online" in bad.stdout
    found = _metrics(metrics)
    ratios = {
        dict(k[1])["feature"]: v for k, v in found.items() if k[0] == "featurestream_verify_mismatch_ratio"
    }
    assert ratios.pop("events_count_1d") == 1 / len(USERS)
    assert set(ratios.values()) == {0.0}  # the other features do not read the event count


def test_verify_in_process_reports_per_feature(services: Services, topic, tmp_path: Path) -> None:
    """The library entry point: a bounded run verified entity by entity, offline included."""
    from tests.support import run_views

    t_name, _, _, runtime = _setup(services, topic, tmp_path)
    view = pay_view(t_name)
    run_views([view], runtime)
    report = verify_view(store_of(view, runtime), view, services.kafka, sample=10, seed=1)
    assert report.sampled == 10 and report.unsettled == 0 and report.mismatches == 0
    assert all(c.compared == 10 for c in report.checks.values())
    assert report.freshness_seconds == 0.0


def test_verify_example_pipeline_every_window_kind(services: Services, topic, tmp_path: Path) -> None:
    """pipelines/transactions.py: sliding and tumbling windows, mean, max, stddev, a bool sum, with
    malformed and late events."""
    from confluent_kafka import Producer

    from featurestream.runtime import load_views
    from featurestream.synthetic import card_transactions
    from tests.support import run_views

    t_name = topic(partitions=4)
    text = (Path(__file__).resolve().parents[1] / "pipelines" / "transactions.py").read_text()
    pipeline = tmp_path / "transactions.py"
    pipeline.write_text(text.replace('topic="transactions"', f'topic="{t_name}"'))
    (view,) = load_views(pipeline)
    producer = Producer({"bootstrap.servers": services.kafka})
    events = card_transactions(4_000, 50, end_ms=now_ms(), malformed_rate=0.02, late_rate=0.03, seed=5)
    for e in events:
        producer.produce(t_name, key=e.key, value=e.value)
    assert producer.flush(30) == 0
    runtime = RuntimeConfig(
        kafka_bootstrap_servers=services.kafka,
        redis_url=services.redis_url,
        delta_uri=str(tmp_path / "delta"),
        redis_prefix=f"tx-{t_name}",
    )
    run_views([view], runtime)
    report = verify_view(store_of(view, runtime), view, services.kafka, sample=50, seed=2)
    assert report.source.dead > 0 and report.source.late > 0
    assert report.not_checked == [] and report.mismatches == 0, [c.examples for c in report.checks.values()]
    assert report.sampled == 50 and all(c.compared == 50 for c in report.checks.values())
