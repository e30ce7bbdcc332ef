"""Kafka connector round trip (ensure_topic -> produce -> PartitionReader) on two kinds of broker.

* ``test_round_trip_on_kafka_container``: a real Kafka broker in Docker, started by testcontainers
  in KRaft mode. Skipped (reason names Docker) when no Docker engine answers.
* ``test_round_trip_on_test_services``: the suite's own broker (``services`` fixture), always run.

testcontainers' ``KafkaContainer`` boots through Confluent's start scripts, so it runs the
Confluent packaging of Apache Kafka (``confluentinc/cp-kafka``); the ``apache/kafka`` image is the
one ``docker/docker-compose.yml`` deploys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from connectors.kafka import PartitionReader, ensure_topic
from tests.conftest import Services
from tests.support import unique

KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # Apache Kafka 3.6; KRaft needs cp-kafka >= 7.0
CONTAINER_START_TIMEOUT_S = 180
READ_TIMEOUT_S = 30.0


def _docker_engine() -> tuple[bool, str]:
    """Whether a Docker engine answers a ping, and if not, why (first line, shortened)."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        detail = (str(exc).splitlines() or [""])[0][:160]
        return False, f"{type(exc).__name__}: {detail}"
    return True, ""


DOCKER_AVAILABLE, DOCKER_PROBLEM = _docker_engine()

EVENTS = [
    {"transaction_id": "t-0", "user_id": "u-1", "amount": 12.5, "ts": 1_700_000_000_000},
    {"transaction_id": "t-1", "user_id": "u-2", "amount": 3.0, "ts": 1_700_000_001_000},
    {"transaction_id": "t-2", "user_id": "u-1", "amount": 99.99, "ts": 1_700_000_002_000},
]


def assert_partition_round_trip(bootstrap: str, topic: str) -> None:
    """Create ``topic`` (1 partition), publish EVENTS as JSON, read them back with PartitionReader."""
    ensure_topic(bootstrap, topic, partitions=1)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for event in EVENTS:
        producer.produce(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
    assert producer.flush(30) == 0, "broker did not acknowledge every event"

    reader = PartitionReader(bootstrap, topic, 0, None, stop_at_end=True)
    values: list[bytes] = []
    offsets: list[int] = []
    try:
        # Not asserted equal to 3 up front: a broker may report a stale high watermark at open
        # (Tansu counts record batches), which the reader refines on its first fetch.
        assert not reader.at_end
        deadline = time.monotonic() + READ_TIMEOUT_S
        while not reader.at_end:
            assert time.monotonic() < deadline, f"read {len(values)} of {len(EVENTS)} events in time"
            batch = reader.read(max_messages=100, timeout=0.5)
            if batch is None:
                continue
            assert (batch.topic, batch.partition) == (topic, 0)
            values.extend(batch.values)
            offsets.extend(int(o) for o in batch.offsets)
        assert reader.position == reader.end_offset == len(EVENTS)
        assert reader.lag() == 0
    finally:
        reader.close()

    assert [json.loads(v) for v in values] == EVENTS
    assert offsets == list(range(len(EVENTS)))


@pytest.mark.docker
@pytest.mark.skipif(
    not DOCKER_AVAILABLE, reason=f"needs a Docker engine for testcontainers; none answered ({DOCKER_PROBLEM})"
)
def test_round_trip_on_kafka_container() -> None:
    from testcontainers.community.kafka import KafkaContainer

    kafka = KafkaContainer(KAFKA_IMAGE).with_kraft()
    kafka.start(timeout=CONTAINER_START_TIMEOUT_S)
    try:
        assert_partition_round_trip(kafka.get_bootstrap_server(), unique("docker-events"))
    finally:
        kafka.stop()


def test_round_trip_on_test_services(services: Services, topic: Callable[..., str]) -> None:
    assert_partition_round_trip(services.kafka, topic(partitions=1))
