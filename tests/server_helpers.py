"""Shared by the feature server tests: views, data, a real `featurestream serve` subprocess.

The server runs as the CLI runs it (uvicorn, httptools, uvloop) on a free port, against the
test broker, Redis and a registry of its own; requests go over real HTTP (httpx).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.definitions import Aggregation, Derived, Entity, EventSource, FeatureView, Field, Window
from featurestream.local.processes import _free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "featurestream.cli"]
MIN = 60_000

PIPELINE = """
from tests.server_helpers import server_views

views = server_views({topic!r}, {clicks_topic!r})
"""


def payments(topic: str) -> EventSource:
    return EventSource(
        name="payments",
        topic=topic,
        timestamp_field="ts",
        fields=(
            Field(name="user_id", dtype="str"),
            Field(name="amount", dtype="float", nullable=True),
        ),
    )


def spend_view(topic: str, window: str = "1h") -> FeatureView:
    """``spend``: the served definition uses ``window="1h"``; other windows are other versions."""
    return FeatureView(
        name="spend",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=payments(topic),
        aggregations=(
            Aggregation(function="count", window=window, name="tx_count"),
            Aggregation(function="sum", column="amount", window=window, name="amount_sum"),
            Aggregation(function="mean", column="amount", window=window, name="amount_mean"),
            Aggregation(function="max", column="amount", window="10m", name="amount_max_10m"),
            Aggregation(function="last", column="amount", window="1d", name="amount_last"),
            Aggregation(function="stddev", column="amount", window="1d", name="amount_std"),
            Aggregation(function="sum", column="amount", window=Window.tumbling("1h"), name="amount_hourly"),
        ),
        tile_size="1m",
        allowed_lateness="7d",
    )


def clicks_view(topic: str) -> FeatureView:
    """``clicks``: a second view (other source, composite key), for scopes and join keys."""
    return FeatureView(
        name="clicks",
        entity=Entity(name="user_page", join_keys=("user_id", "page")),
        source=EventSource(
            name="clicks",
            topic=topic,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="page", dtype="int")),
        ),
        aggregations=(Aggregation(function="count", window="1d", name="clicks_1d"),),
        tile_size="1m",
        allowed_lateness="7d",
    )


def ratio_view(topic: str) -> FeatureView:
    """``ratios``: derived features over ``payments``: a ratio, one dividing by a 10-minute count
    (zero for an entity idle that long), one derived from another, one with a nullable input."""
    return FeatureView(
        name="ratios",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=payments(topic),
        aggregations=(
            Aggregation(function="count", window="1h", name="tx_count"),
            Aggregation(function="sum", column="amount", window="1h", name="amount_sum"),
            Aggregation(function="count", window="10m", name="recent_count"),
            Aggregation(function="max", column="amount", window="10m", name="amount_max_10m"),
        ),
        derived=(
            Derived(name="avg_amount", expression="amount_sum / tx_count"),
            Derived(name="per_recent", expression="amount_sum / recent_count"),
            Derived(name="avg_x2", expression="avg_amount * 2 + 1"),
            Derived(name="over_avg", expression="amount_max_10m - avg_amount"),
        ),
        tile_size="1m",
        allowed_lateness="7d",
    )


RATIO_PIPELINE = """
from tests.server_helpers import ratio_view

views = [ratio_view({topic!r})]
"""


def server_views(topic: str, clicks_topic: str) -> list[FeatureView]:
    return [spend_view(topic), clicks_view(clicks_topic)]


def payment_events(now_ms: int) -> list[dict[str, Any]]:
    """u1 active now; u2 idle for 3 days (outside the TTL); u4 last seen 40 minutes ago; u3 never."""
    events = [
        {"user_id": "u2", "amount": 7.0, "ts": now_ms - 3 * 24 * 60 * MIN},
        {"user_id": "u4", "amount": 3.0, "ts": now_ms - 40 * MIN},
        {"user_id": "u1", "amount": 5.0, "ts": now_ms - 30 * MIN},
        {"user_id": "u1", "amount": None, "ts": now_ms - 20 * MIN},
        {"user_id": "u1", "amount": 10.0, "ts": now_ms - 5 * MIN},
    ]
    return sorted(events, key=lambda e: e["ts"])


def write_pipeline(tmp: Path, topic: str, clicks_topic: str) -> Path:
    path = tmp / "server_pipeline.py"
    path.write_text(PIPELINE.format(topic=topic, clicks_topic=clicks_topic))
    return path


def server_env(
    kafka: str, redis_url: str, prefix: str, registry_url: str, state: Path, **extra: str
) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "FEATURESTREAM_REDIS_URL": redis_url,
        "FEATURESTREAM_REDIS_PREFIX": prefix,
        "FEATURESTREAM_REGISTRY_URL": registry_url,
        "FEATURESTREAM_STATE_DIR": str(state),
        "FEATURESTREAM_DELTA_URI": str(state / "delta"),
        **extra,
    }


@dataclass
class Server:
    """A running `featurestream serve` and an HTTP client bound to it."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def get(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        return self.client.get(path, headers=_auth(key, kw.pop("headers", None)), **kw)

    def post(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        return self.client.post(path, headers=_auth(key, kw.pop("headers", None)), **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _auth(key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    if key is not None:
        out.setdefault("Authorization", f"Bearer {key}")
    return out


@contextmanager
def serve(
    pipeline: Path, env: dict[str, str], log: Path, *args: str, timeout: float = 60
) -> Iterator[Server]:
    """Start `featurestream serve pipeline --port P args...`; wait until /readyz answers 200."""
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", str(pipeline), "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"featurestream serve exited with {proc.returncode}:\n{server.log_text()}"
                )
            try:
                if server.client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"featurestream serve was not ready in {timeout} s:\n{server.log_text()}"
                )
            time.sleep(0.1)
        yield server
    finally:
        server.client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_for(check: Any, timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {got!r})")
        time.sleep(interval)
