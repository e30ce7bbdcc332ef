"""Redis stops under a running feature server and comes back: 503 meanwhile (without the Redis
password anywhere), then the same answers again with no restart of the server."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from featurestream.local.processes import _free_port, _redis_bin
from tests.conftest import Services
from tests.server_helpers import payment_events, serve, server_env, spend_view, wait_for, write_pipeline
from tests.support import create_topic, make_runtime, produce, run_views, unique

PASSWORD = "outage-test-pw-7f3a"
BODY = {"features": ["spend:amount_sum", "spend:tx_count"], "entities": {"user_id": ["u1", "u3"]}}


class PrivateRedis:
    """A redis-server of this test only, on a fixed port, keeping its data (AOF) across restarts."""

    def __init__(self, data: Path) -> None:
        self.port = _free_port()
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [_redis_bin(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--requirepass", PASSWORD],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), timeout=15)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis-data")
    server.start()
    yield server
    server.stop()


def test_redis_restart_gives_503_then_recovers(
    services: Services, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    topic = create_topic(services.kafka, unique("pay"), 1)
    produce(services.kafka, topic, payment_events(int(time.time() * 1000)), key_field="user_id")
    runtime = make_runtime(services.kafka, private_redis.url, tmp_path, "outage")
    run_views([spend_view(topic)], runtime)
    env = server_env(
        services.kafka,
        private_redis.url,
        runtime.redis_prefix,
        f"sqlite:///{tmp_path / 'reg.db'}",
        tmp_path / "s",
    )
    pipeline = write_pipeline(tmp_path, topic, unique("clicks"))
    with serve(pipeline, env, tmp_path / "server.log", "--no-auth") as server:
        before = server.post("/features/online", json=BODY)
        assert before.status_code == 200, before.text
        values = [r["values"] for r in before.json()["results"]]
        assert values[1] == [15.0, 0.0]

        private_redis.stop()
        down = server.post("/features/online", json=BODY)
        assert down.status_code == 503, down.text
        assert down.json()["error"] == "redis_unavailable" and down.headers["retry-after"] == "1"
        assert server.get("/features/spend/u1").status_code == 503
        ready = server.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"
        assert server.get("/healthz").status_code == 200  # alive: nothing to restart
        for text in (down.text, ready.text):
            assert PASSWORD not in text

        private_redis.start()  # same port, same data
        again = wait_for(lambda: (r := server.post("/features/online", json=BODY)).status_code == 200 and r)
        assert [r["values"] for r in again.json()["results"]] == values
        assert server.get("/readyz").status_code == 200
        metrics = server.get("/metrics").text
        assert "featurestream_server_redis_errors_total 2.0" in metrics
        assert 'code="503",route="/features/online",view="spend"' in metrics
        assert PASSWORD not in metrics and PASSWORD not in server.log_text()
