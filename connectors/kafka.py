"""Kafka: per-partition readers and topic administration (dead letters: :mod:`connectors.dead_letters`).

Readers are assigned one partition each and never commit to a consumer group: the dataflow owns
positions (in its recovery snapshots), which is what makes its state exactly-once. A position
that the broker no longer has (the broker lost its data, the topic was recreated, retention
deleted it) is an error, never a silent jump: see :class:`TopicChangedError`.

Every client takes ``config``: librdkafka settings (SASL/SSL, ``client.id``...) from the
``kafka_config`` setting. An invalid one is a :class:`KafkaConfigError` naming it; secret values
never appear in an error.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
)
from confluent_kafka import TopicPartition as _TP
from confluent_kafka.admin import AdminClient, NewTopic

from engine.errors import FeaturestreamError, ServiceUnavailable
from engine.redact import redact_config, redact_text

__all__ = [
    "KAFKA_CONFIG_SETTING",
    "KafkaConfigError",
    "PartitionReader",
    "RawBatch",
    "TopicChangedError",
    "admin_client",
    "ensure_topic",
    "make_producer",
    "partition_count",
    "partition_end",
    "topic_id",
    "topic_reset_error",
]

KAFKA_CONFIG_SETTING = "kafka_config (env FEATURESTREAM_KAFKA_CONFIG)"
_NO_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"  # the all-zero UUID: the broker keeps no topic ids
_PROBE_TIMEOUT_S = 5.0
_C = TypeVar("_C")
_VALUE, _KEY, _OFFSET, _TIMESTAMP, _ERROR = (
    Message.value, Message.key, Message.offset, Message.timestamp, Message.error
)  # fmt: skip


class KafkaConfigError(FeaturestreamError, ValueError):
    """A librdkafka setting from ``kafka_config`` is unknown or has an invalid value."""


class TopicChangedError(FeaturestreamError):
    """A source topic is not the one the stored positions belong to: its identity changed, or
    its offsets went backwards (the broker lost its data, or the topic was recreated)."""


def topic_reset_error(topic: str, partition: int, stored: str, found: str) -> TopicChangedError:
    """The error that stops a worker rather than skip events or drop them as replays."""
    return TopicChangedError(
        f"topic {topic!r} partition {partition} changed: {stored}, but the broker has {found}. "
        "The broker lost its data or the topic was deleted and recreated; reading on would skip "
        "new events or drop them as replays of old ones, so the worker stops. To recompute the "
        "pipeline from the topic as it is now, drop its derived state with `featurestream reset "
        "<pipeline file> --recovery-dir <dir, if the run used one>` and run it again. To keep the "
        "state instead, bring the topic's data back (point FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS at "
        "the broker that has it)."
    )


def _client(kind: Callable[[dict[str, Any]], _C], conf: dict[str, Any]) -> _C:
    """``kind(conf)``; an invalid setting raises :class:`KafkaConfigError` naming it."""
    try:
        return kind(conf)
    except (KafkaException, ValueError, TypeError) as exc:
        err = exc.args[0] if exc.args else exc
        text = err.str() if isinstance(err, KafkaError) else str(err)
        raise KafkaConfigError(  # librdkafka may quote an invalid value: secrets are masked
            f"invalid Kafka client setting: {redact_text(text, conf)}. Fix or remove it in the "
            f"{KAFKA_CONFIG_SETTING} setting (settings in use: {redact_config(conf)})"
        ) from None


def admin_client(bootstrap: str, extra: Mapping[str, Any] | None = None) -> AdminClient:
    """An admin client with ``extra`` settings (``kafka_config``)."""
    # log_level 5: no info lines (a client destroyed with a queued result logs "BGQUEUE Purging").
    return _client(AdminClient, {"log_level": 5, **(extra or {}), "bootstrap.servers": bootstrap})


def make_producer(
    bootstrap: str, config: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None
) -> Producer:
    """A producer with ``defaults`` (e.g. ``linger.ms``), overridden by ``config``."""
    return _client(Producer, {**(defaults or {}), **(config or {}), "bootstrap.servers": bootstrap})


@dataclass
class RawBatch:
    """Messages read from one partition, in offset order."""

    topic: str
    partition: int
    values: list[bytes]
    keys: list[bytes | None]
    offsets: np.ndarray
    produced_at: float = float("nan")  # oldest message timestamp of the batch, epoch seconds

    @property
    def next_offset(self) -> int:
        return int(self.offsets[-1]) + 1


def partition_count(
    bootstrap: str, topic: str, timeout: float = 10.0, config: Mapping[str, Any] | None = None
) -> int:
    """Partitions of ``topic``; raises if the topic does not exist.

    Lists all topics rather than asking for this one: some brokers create a topic on a metadata
    request naming it.
    """
    try:
        md = admin_client(bootstrap, config).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ServiceUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        raise ServiceUnavailable(
            f"topic {topic!r} does not exist on {bootstrap}; create it (`featurestream produce "
            "... --partitions N` does) or check the source's topic name"
        )
    return len(t.partitions)


def topic_id(
    bootstrap: str, topic: str, config: Mapping[str, Any] | None = None, timeout: float = 10.0
) -> str | None:
    """The broker's id of an existing ``topic`` (new when the topic is recreated), or ``None`` if
    the broker keeps none (then only offsets going backwards reveal a recreated topic)."""
    admin = admin_client(bootstrap, config)
    try:
        found = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic].result()
    except KafkaException:
        return None
    text = "" if found.topic_id is None else str(found.topic_id)
    return None if text in ("", _NO_TOPIC_ID) else text


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int = 1,
    timeout: float = 10.0,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Create ``topic`` unless it exists; idempotent and safe to race."""
    admin = admin_client(bootstrap, config)
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


def _bounds(consumer: Consumer, topic: str, partition: int, need: int) -> tuple[int, int]:
    """(log start, end) of a partition, the end exact whenever it is at or below ``need``.

    ListOffsets never overstates the end, but some brokers (Tansu) understate it (the last
    batch's base offset + 1). So an end at or below ``need`` is checked by fetching at
    ``need - 1``: the fetch response's high watermark is the exact end (a record there also
    proves the log reaches ``need``); an empty fetch reports the exact end.
    Leaves the consumer unassigned.
    """
    tp = _TP(topic, partition)
    low, high = consumer.get_watermark_offsets(tp, timeout=10)
    if need < high or need <= low:  # at ``high`` itself the log may go on (an understated end)
        return low, high
    consumer.assign([_TP(topic, partition, need - 1)])
    deadline = time.monotonic() + _PROBE_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            for m in consumer.consume(1, 0.1):
                if m.error() is None:  # the fetch response's high watermark is the exact end
                    _, fetched = consumer.get_watermark_offsets(tp, cached=True)
                    return low, max(high, m.offset() + 1, fetched)
                if m.error().code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                    return low, high  # this broker's ListOffsets was exact
            _, fetched = consumer.get_watermark_offsets(tp, cached=True)
            if fetched >= 0 and fetched != high:  # from a fetch response: exact
                return low, fetched
        return low, high
    finally:
        consumer.unassign()


def partition_end(
    bootstrap: str, topic: str, partition: int, need: int, config: Mapping[str, Any] | None = None
) -> tuple[int, int]:
    """(log start, end) of a partition, the end exact whenever it is at or below ``need``."""
    consumer = _client(Consumer, _reader_config(bootstrap, topic, config))
    try:
        return _bounds(consumer, topic, partition, need)
    finally:
        consumer.close()


def _reader_config(bootstrap: str, topic: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "group.id": f"featurestream-{topic}",
        "enable.partition.eof": False,
        # Tansu answers a fetch with no data only after this wait, and each fetch costs it CPU:
        # at 10 ms a worker's readers made it use twice the CPU, which on a small machine starves
        # the worker (10k events/s got slower, not faster); see docs/performance.md.
        # FEATURESTREAM_KAFKA_CONFIG can set it (Apache Kafka answers as soon as data arrives).
        "fetch.wait.max.ms": 100,
        # Prefetch per partition reader: a few micro-batches (batch_size 20k events). librdkafka
        # holds each prefetched message with a few hundred bytes of overhead besides its payload;
        # 20k messages / 4 MiB per reader saved ~300 MiB of peak RSS catching up on 1M events but
        # cost ~30% of the throughput; 100k / 16 MiB keeps the throughput (docs/performance.md).
        "queued.min.messages": 100_000,
        "queued.max.messages.kbytes": 16_384,
        "fetch.min.bytes": 1,
        **(config or {}),
        # Positions are the dataflow's: never committed, never moved by the client on its own.
        "bootstrap.servers": bootstrap,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "error",
    }


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector (if it runs) for one read.

    A consumed batch is thousands of message objects, which the collector tracks: allocating them
    runs collections that traverse them (and everything older) again and again: measured, a third
    or more of the read's CPU. The messages hold no cycles and are freed before the collector runs
    again, so pausing it loses nothing."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


class PartitionReader:
    """Reads one topic partition from a given offset, in batches.

    Delivery: every message from ``start_offset`` on, in order, at least once across restarts
    (the caller persists ``position``). With ``stop_at_end`` the reader ends at the partition's
    end offset as of opening, which makes a bounded run (tests, backfills, the demo).

    A ``start_offset`` beyond the partition's end or below its log start raises
    :class:`TopicChangedError` (the offsets went backwards: the broker lost its data or the
    topic was recreated), as does a partition whose end falls below the read position later.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partition: int,
        start_offset: int | None,
        *,
        stop_at_end: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self._consumer = _client(Consumer, _reader_config(bootstrap, topic, config))
        low, high = _bounds(self._consumer, topic, partition, start_offset or 0)
        if start_offset is not None and not low <= start_offset <= high:
            self._consumer.close()
            where = "beyond its end" if start_offset > high else "below its log start"
            raise topic_reset_error(
                topic,
                partition,
                f"the stored read position is offset {start_offset}",
                f"offsets {low} to {high} ({where})",
            )
        # Tansu answers ListOffsets with the last batch's base offset + 1; the high watermark of
        # the first fetch response is exact, so the end is refined from it.
        self.end_offset: int | None = high if stop_at_end else None
        self._refined = False
        self._fetched = False  # a fetch response arrived, so the cached high watermark is exact
        start = OFFSET_BEGINNING if start_offset is None else start_offset
        self.position = low if start_offset is None else start_offset
        self._consumer.assign([_TP(topic, partition, start)])

    @property
    def at_end(self) -> bool:
        return self.end_offset is not None and self.position >= self.end_offset

    def read(self, max_messages: int, timeout: float) -> RawBatch | None:
        """Up to ``max_messages`` messages (a null value reads as ``b""``), or None when none came."""
        with _collector_paused():
            msgs = self._consumer.consume(max_messages, timeout)
            batch = self._batch(msgs) if msgs else None
            del msgs  # freed here, while the collector is paused
        if batch is None:
            self._check_not_behind()
            return None
        self.position = batch.next_offset
        self._fetched = True
        if self.end_offset is not None and not self._refined:
            self._refined = True
            _, fetched_high = self._consumer.get_watermark_offsets(
                _TP(self.topic, self.partition), cached=True
            )
            self.end_offset = max(self.end_offset, fetched_high)
        return batch

    def _batch(self, msgs: list[Message]) -> RawBatch | None:
        """The messages' fields, taken with ``map`` over the batch (C loops: no Python frame per
        message). Errors are rare, so they are looked at only when the batch has one."""
        if any(map(_ERROR, msgs)):
            msgs = self._without_errors(msgs)
            if not msgs:
                return None
        n = len(msgs)
        values = list(map(_VALUE, msgs))
        if None in values:  # tombstones
            values = [v or b"" for v in values]
        stamps = np.fromiter(itertools.chain.from_iterable(map(_TIMESTAMP, msgs)), np.int64, 2 * n)
        kind, stamp = stamps[0::2], stamps[1::2]
        stamp = stamp[(kind != TIMESTAMP_NOT_AVAILABLE) & (stamp > 0)]
        return RawBatch(
            self.topic,
            self.partition,
            values,
            list(map(_KEY, msgs)),
            np.fromiter(map(_OFFSET, msgs), np.int64, n),
            int(stamp.min()) / 1000 if len(stamp) else float("nan"),
        )

    def _without_errors(self, msgs: list[Message]) -> list[Message]:
        """The messages of a batch that holds errors: a partition end is skipped; a position the
        broker no longer has raises :class:`TopicChangedError`, any other error
        :class:`KafkaException`."""
        out = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(m)
            elif err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                raise topic_reset_error(
                    self.topic,
                    self.partition,
                    f"the read position is offset {self.position}",
                    f"no such offset any more ({err.str()})",
                )
            elif err.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(err)
        return out

    def _check_not_behind(self) -> None:
        """Stop when the partition's end fell below the read position while reading it."""
        if not self._fetched:
            return
        _, high = self._consumer.get_watermark_offsets(_TP(self.topic, self.partition), cached=True)
        if 0 <= high < self.position:
            raise topic_reset_error(
                self.topic,
                self.partition,
                f"the read position is offset {self.position}",
                f"its end at offset {high} (it went backwards while being read)",
            )

    def lag(self) -> int:
        """Messages between the read position and the partition's current end."""
        _, high = self._consumer.get_watermark_offsets(_TP(self.topic, self.partition), cached=True)
        return max(0, high - self.position) if high >= 0 else 0

    def close(self) -> None:
        self._consumer.close()
