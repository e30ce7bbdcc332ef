"""Kafka: per-partition readers, topic administration and the dead-letter producer.

Readers are assigned one partition each and never commit to a consumer group: the dataflow owns
positions (in its recovery snapshots), which is what makes its state exactly-once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as _TP
from confluent_kafka.admin import AdminClient, NewTopic

from engine.decode import DeadLetter
from engine.errors import ServiceUnavailable

__all__ = [
    "DeadLetterProducer",
    "PartitionReader",
    "RawBatch",
    "ensure_topic",
    "partition_count",
]


@dataclass
class RawBatch:
    """Messages read from one partition, in offset order."""

    topic: str
    partition: int
    values: list[bytes]
    keys: list[bytes | None]
    offsets: np.ndarray

    @property
    def next_offset(self) -> int:
        return int(self.offsets[-1]) + 1


def _admin(bootstrap: str, extra: dict[str, Any] | None = None) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, **(extra or {})})


def partition_count(bootstrap: str, topic: str, timeout: float = 10.0) -> int:
    """Partitions of ``topic``; raises if the topic does not exist.

    Lists all topics rather than asking for this one: some brokers create a topic on a metadata
    request naming it.
    """
    try:
        md = _admin(bootstrap).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        raise ServiceUnavailable(
            f"topic {topic!r} does not exist on {bootstrap}; create it (featurestream creates "
            f"it on `run` when it may) or check the source's topic name"
        )
    return len(t.partitions)


def ensure_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 10.0) -> None:
    """Create ``topic`` unless it exists; idempotent and safe to race."""
    admin = _admin(bootstrap)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
    if topic in md.topics and md.topics[topic].error is None:
        return
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    try:
        fut[topic].result(timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
        if t is not None and t.error is None and len(t.partitions) >= partitions:
            return
        time.sleep(0.05)


class PartitionReader:
    """Reads one topic partition from a given offset, in batches.

    Delivery: every message from ``start_offset`` on, in order, at least once across restarts
    (the caller persists ``position``). With ``stop_at_end`` the reader ends at the partition's
    end offset as of opening, which makes a bounded run (tests, backfills, the demo).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partition: int,
        start_offset: int | None,
        *,
        stop_at_end: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        conf = {
            "bootstrap.servers": bootstrap,
            "group.id": f"featurestream-{topic}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 100,
            "queued.min.messages": 200_000,
            "fetch.min.bytes": 1,
            **(config or {}),
        }
        self._consumer = Consumer(conf)
        low, high = self._consumer.get_watermark_offsets(_TP(topic, partition), timeout=10)
        # Some brokers (Tansu) answer ListOffsets with the last batch's base offset + 1; the
        # high watermark of the first fetch response is exact, so the end is refined from it.
        self.end_offset: int | None = high if stop_at_end else None
        self._refined = False
        start = OFFSET_BEGINNING if start_offset is None else start_offset
        self.position = low if start_offset is None else start_offset
        self._consumer.assign([_TP(topic, partition, start)])

    @property
    def at_end(self) -> bool:
        return self.end_offset is not None and self.position >= self.end_offset

    def read(self, max_messages: int, timeout: float) -> RawBatch | None:
        msgs = self._consumer.consume(max_messages, timeout)
        if not msgs:
            return None
        values, keys, offsets = [], [], []
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            values.append(m.value() or b"")
            keys.append(m.key())
            offsets.append(m.offset())
        if not values:
            return None
        batch = RawBatch(self.topic, self.partition, values, keys, np.asarray(offsets, np.int64))
        self.position = batch.next_offset
        if self.end_offset is not None and not self._refined:
            self._refined = True
            _, fetched_high = self._consumer.get_watermark_offsets(
                _TP(self.topic, self.partition), cached=True
            )
            self.end_offset = max(self.end_offset, fetched_high)
        return batch

    def lag(self) -> int:
        """Messages between the read position and the partition's current end."""
        _, high = self._consumer.get_watermark_offsets(_TP(self.topic, self.partition), cached=True)
        return max(0, high - self.position) if high >= 0 else 0

    def close(self) -> None:
        self._consumer.close()


class DeadLetterProducer:
    """Publishes dead letters: original key and bytes, reason and source position in headers.

    Delivery: at least once; :meth:`flush` blocks until the broker acknowledged every letter.
    """

    def __init__(self, bootstrap: str, config: dict[str, Any] | None = None) -> None:
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 50, "acks": "all", **(config or {})}
        )
        self._errors: list[str] = []

    def send(self, dlq_topic: str, letter: DeadLetter, view: str, version: str = "") -> None:
        headers = [
            ("fs-reason", letter.reason.encode()),
            ("fs-detail", letter.detail.encode()),
            ("fs-topic", letter.topic.encode()),
            ("fs-partition", str(letter.partition).encode()),
            ("fs-offset", str(letter.offset).encode()),
            ("fs-view", view.encode()),
            ("fs-view-version", version.encode()),
        ]
        self._producer.produce(
            dlq_topic, value=letter.value, key=letter.key, headers=headers, on_delivery=self._ack
        )
        self._producer.poll(0)

    def _ack(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 30.0) -> None:
        left = self._producer.flush(timeout)
        if left or self._errors:
            raise ServiceUnavailable(
                f"dead-letter delivery failed ({left} unacknowledged): {self._errors[:3]}"
            )
