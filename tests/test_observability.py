"""Worker metrics and health: a real `featurestream run` subprocess, scraped over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from engine.observe import Health, MetricsPortError, serve, stop
from featurestream.config import Settings
from featurestream.runtime import metrics_port
from tests.conftest import Services
from tests.support import unique, worker_env

LATENESS_MS = 3_600_000
PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="clicks", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="value", dtype="float")),
)
clicks = FeatureView(
    name="clicks", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=(Aggregation(function="count", window="1d"),),
    tile_size="1m", allowed_lateness="1h",
)
views = [clicks]
"""
Labels = dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _scrape(port: int) -> list[tuple[str, Labels, float]]:
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    families = text_string_to_metric_families(body.decode())
    return [(s.name, s.labels, s.value) for f in families for s in f.samples]


def _value(samples: list[tuple[str, Labels, float]], name: str, **labels: str) -> float | None:
    hits = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(hits) if hits else None


def _produce(bootstrap: str, topic: str, by_partition: dict[int, list[bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    for part, values in by_partition.items():
        for v in values:
            p.produce(topic, value=v, partition=part)
    assert p.flush(30) == 0


def _good(n: int, start_ms: int) -> list[bytes]:
    return [
        json.dumps({"user_id": f"u{i % 7}", "value": 1.0, "ts": start_ms + i * 1000}).encode()
        for i in range(n)
    ]


def test_worker_exposes_exact_metrics_and_health(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=2)
    now = int(time.time() * 1000)
    late = json.dumps({"user_id": "u1", "value": 1.0, "ts": now - 2 * LATENESS_MS}).encode()
    wave1 = {
        0: [
            *_good(40, now - 50_000),
            late,
            late,
            b"{not json",
            json.dumps({"user_id": "u1", "ts": now}).encode(),
            json.dumps({"user_id": "u1", "value": "abc", "ts": now}).encode(),
        ],
        1: [
            *_good(25, now - 40_000),
            late,
            json.dumps({"user_id": "u2", "value": 1.0, "ts": 9_000_000_000_000}).encode(),
        ],
    }
    # Offline rows flush every 5 s of arrivals; a second wave later makes the worker write Delta.
    wave2 = {0: _good(5, now), 1: _good(3, now + 500)}
    newest = {0: now + 4_000, 1: now + 2_500}
    _produce(services.kafka, name, wave1)

    port = _free_port()
    pipeline = tmp_path / "clicks_pipeline.py"
    pipeline.write_text(PIPELINE.format(topic=name))
    env = worker_env(services.kafka, services.redis_url, tmp_path, unique("obs"), port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurestream.cli", "run", str(pipeline)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    view = {"view": "clicks"}
    expected = {
        ("featurestream_events_in_total", "0"): 45.0 + 5,
        ("featurestream_events_in_total", "1"): 27.0 + 3,
        ("featurestream_events_accepted_total", None): 65.0 + 8,
        ("featurestream_late_events_total", None): 3.0,
        ("featurestream_dead_letters_total", "late"): 3.0,
        ("featurestream_dead_letters_total", "malformed_json"): 1.0,
        ("featurestream_dead_letters_total", "missing_field"): 1.0,
        ("featurestream_dead_letters_total", "invalid_type"): 1.0,
        ("featurestream_dead_letters_total", "bad_timestamp"): 1.0,
        ("featurestream_consumer_lag_messages", "0"): 0.0,
        ("featurestream_consumer_lag_messages", "1"): 0.0,
    }

    def observed(samples: list[tuple[str, Labels, float]]) -> dict:
        out = {}
        for metric, label in expected:
            if metric.startswith(("featurestream_events_in", "featurestream_consumer_lag")):
                labels = {**view, "topic": name, "partition": label}
            elif metric.startswith("featurestream_dead_letters"):
                labels = {**view, "reason": label}
            else:
                labels = view
            out[(metric, label)] = _value(samples, metric, **labels)
        return out

    try:
        got: dict = {}
        samples: list = []
        deadline = time.monotonic() + 60
        sent_wave2_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                samples = _scrape(port)
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
                continue
            got = observed(samples)
            in_so_far = sum(got[("featurestream_events_in_total", p)] or 0 for p in "01")
            if sent_wave2_at is None and in_so_far == 72:
                time.sleep(5.5)
                _produce(services.kafka, name, wave2)
                sent_wave2_at = time.monotonic()
            delta = _value(samples, "featurestream_store_write_seconds_count", store="delta", **view)
            if got == expected and delta:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert got == expected
        for p in (0, 1):
            wm = _value(samples, "featurestream_watermark_seconds", topic=name, partition=str(p), **view)
            assert wm == pytest.approx((newest[p] - LATENESS_MS) / 1000, abs=1e-3)
        for metric, labels in [
            ("featurestream_batch_latency_seconds", view),
            ("featurestream_feature_freshness_seconds", view),
            ("featurestream_store_write_seconds", {"store": "redis", **view}),
            ("featurestream_store_write_seconds", {"store": "delta", **view}),
        ]:
            count = _value(samples, f"{metric}_count", **labels)
            assert count is not None and count > 0, (metric, labels)
            # Seconds, not milliseconds: everything here happened within the last minutes.
            assert 0 < _value(samples, f"{metric}_sum", **labels) / count < 600, (metric, labels)
        for store in ("redis", "delta"):
            assert _value(samples, "featurestream_store_write_errors_total", store=store, **view) == 0

        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok", health
        assert sorted(s["partition"] for s in health["sources"]) == [0, 1]
        assert all(s["seconds_since_poll"] < 60 for s in health["sources"])
        assert health["writer_errors"] == {} and health["uptime_seconds"] > 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"worker did not exit on SIGINT: {out}")
    assert f"metrics: http://localhost:{port}/metrics" in out
    with pytest.raises(OSError):  # the endpoint ended with the worker
        _scrape(port)


def test_port_clash_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortError, match="FEATURESTREAM_METRICS_PORT") as err:
            serve(port)
        assert str(port) in str(err.value)


def test_server_serves_once_per_port_and_reports_failing_health() -> None:
    failing = {"status": "failing", "writer_errors": {"redis:v": "ConnectionError: gone"}}
    server = serve(0, health=lambda: failing)
    port = server.server_address[1]
    try:
        assert serve(port) is server  # a second start in this process is a no-op
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and json.loads(body) == failing
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"featurestream_events_in_total" in body
    finally:
        stop(server)


def test_health_fails_on_a_stale_source_or_a_writer_error() -> None:
    health = Health(stale_after=0.05)
    health.source_polled("v", "t", 0)
    assert health.report()["status"] == "ok"
    time.sleep(0.1)
    report = health.report()
    assert report["status"] == "failing" and report["sources"][0]["seconds_since_poll"] >= 0.05
    health.source_closed("v", "t", 0)
    assert health.report()["status"] == "ok"
    health.writer_failed("delta:v", OSError("disk full"))
    report = health.report()
    assert report["status"] == "failing" and report["writer_errors"] == {"delta:v": "OSError: disk full"}


def test_each_process_gets_its_own_port() -> None:
    assert metrics_port(Settings(metrics_port=9500), 2) == 9502
    assert metrics_port(Settings(metrics_port=0), 2) == 0
