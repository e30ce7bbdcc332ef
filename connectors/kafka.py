"""Kafka: per-partition readers, topic administration and the dead-letter producer.

Readers are assigned one partition each and never commit to a consumer group: the dataflow owns
positions (in its recovery snapshots), which is what makes its state exactly-once. A position
that the broker no longer has (the broker lost its data, the topic was recreated, retention
deleted it) is an error, never a silent jump: see :class:`TopicChangedError`.

Every client takes ``config``: librdkafka settings (SASL/SSL, ``client.id``...) from the
``kafka_config`` setting. An invalid one is a :class:`KafkaConfigError` naming it; secret values
never appear in an error.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
)
from confluent_kafka import TopicPartition as _TP
from confluent_kafka.admin import AdminClient, NewTopic

from engine.decode import DeadLetter
from engine.errors import FeaturestreamError, ServiceUnavailable
from engine.redact import redact_config, redact_text

__all__ = [
    "KAFKA_CONFIG_SETTING",
    "DeadLetterProducer",
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
    """(log start, end) of a partition, the end exact whenever it is below ``need``.

    ListOffsets never overstates the end, but some brokers (Tansu) understate it (the last
    batch's base offset + 1). So an end below ``need`` is checked by fetching at ``need - 1``: a
    record there proves the log reaches ``need``; an empty fetch reports the exact end.
    Leaves the consumer unassigned.
    """
    tp = _TP(topic, partition)
    low, high = consumer.get_watermark_offsets(tp, timeout=10)
    if need <= high or need <= low:
        return low, high
    consumer.assign([_TP(topic, partition, need - 1)])
    deadline = time.monotonic() + _PROBE_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            for m in consumer.consume(1, 0.1):
                if m.error() is None:
                    return low, max(high, m.offset() + 1)
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
    """(log start, end) of a partition, the end exact whenever it is below ``need``."""
    consumer = _client(Consumer, _reader_config(bootstrap, topic, config))
    try:
        return _bounds(consumer, topic, partition, need)
    finally:
        consumer.close()


def _reader_config(bootstrap: str, topic: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "group.id": f"featurestream-{topic}",
        "enable.partition.eof": False,
        # Tansu answers a fetch with no data only after this wait; 10 ms halved the median
        # freshness at 1k events/s there but cost far more at 10k/s. FEATURESTREAM_KAFKA_CONFIG
        # can set it (Apache Kafka answers as soon as data arrives).
        "fetch.wait.max.ms": 100,
        "queued.min.messages": 200_000,
        "fetch.min.bytes": 1,
        **(config or {}),
        # Positions are the dataflow's: never committed, never moved by the client on its own.
        "bootstrap.servers": bootstrap,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "error",
    }


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
        msgs = self._consumer.consume(max_messages, timeout)
        if not msgs:
            self._check_not_behind()
            return None
        values, keys, offsets = [], [], []
        oldest = 2**62
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                    raise topic_reset_error(
                        self.topic,
                        self.partition,
                        f"the read position is offset {self.position}",
                        f"no such offset any more ({err.str()})",
                    )
                raise KafkaException(err)
            values.append(m.value() or b"")
            keys.append(m.key())
            offsets.append(m.offset())
            kind, stamp = m.timestamp()
            if kind and 0 < stamp < oldest:
                oldest = stamp
        if not values:
            return None
        batch = RawBatch(
            self.topic,
            self.partition,
            values,
            keys,
            np.asarray(offsets, np.int64),
            oldest / 1000 if oldest < 2**62 else float("nan"),
        )
        self.position = batch.next_offset
        self._fetched = True
        if self.end_offset is not None and not self._refined:
            self._refined = True
            _, fetched_high = self._consumer.get_watermark_offsets(
                _TP(self.topic, self.partition), cached=True
            )
            self.end_offset = max(self.end_offset, fetched_high)
        return batch

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


class DeadLetterProducer:
    """Publishes dead letters: original key and bytes, reason and source position in headers.

    Delivery: at least once; :meth:`flush` returns once the broker acknowledged every letter.

    Any letter fits the broker: a value longer than ``max_value_bytes`` (a key longer than
    ``max_key_bytes``) is cut to that length, with headers ``fs-truncated: true`` and the
    original's length and SHA-256 (``fs-original-size``/``fs-original-sha256``, and
    ``fs-original-key-size``/``fs-original-key-sha256`` for the key). The defaults (500,000 and
    16,384 bytes, at most half and a sixteenth of a configured ``message.max.bytes``) fit
    librdkafka's and Kafka's default limit of about 1 MB.

    Transient delivery errors (broker down, timeouts, leader changes) are retried with capped
    backoff until delivered: meanwhile :meth:`flush` blocks (back-pressure, nothing skipped),
    and once ``stop`` is set it gives up after ``grace`` seconds with
    :class:`~engine.errors.ServiceUnavailable`. A letter the broker refuses as such (still too
    large for its limit, an invalid record) is sent again as a minimal letter: the headers only,
    without key or value. Only a refused minimal letter (then the topic itself is unusable: no
    write permission, no such topic) or a fatal producer error raises.
    """

    MAX_VALUE_BYTES = 500_000
    MAX_KEY_BYTES = 16 * 1024
    MAX_DETAIL_BYTES = 1024
    _log = logging.getLogger(__name__)
    _LOG_EVERY_SECONDS = 30.0
    _TRANSIENT = frozenset(
        {
            KafkaError._MSG_TIMED_OUT,
            KafkaError._TIMED_OUT,
            KafkaError._TIMED_OUT_QUEUE,
            KafkaError._TRANSPORT,
            KafkaError._ALL_BROKERS_DOWN,
            KafkaError._QUEUE_FULL,
            KafkaError._UNKNOWN_TOPIC,
            KafkaError.UNKNOWN_TOPIC_OR_PART,  # the topic is being created, or metadata is stale
            KafkaError.LEADER_NOT_AVAILABLE,
            KafkaError.NOT_LEADER_FOR_PARTITION,
            KafkaError.REQUEST_TIMED_OUT,
            KafkaError.NOT_ENOUGH_REPLICAS,
            KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            KafkaError.NETWORK_EXCEPTION,
            KafkaError.BROKER_NOT_AVAILABLE,
        }
    )

    @dataclass
    class _Letter:
        topic: str
        key: bytes | None
        value: bytes | None
        headers: list[tuple[str, bytes]]
        original: tuple[bytes | None, bytes | None] | None  # (key, value) until sent minimal

    def __init__(
        self,
        bootstrap: str,
        config: Mapping[str, Any] | None = None,
        *,
        max_value_bytes: int | None = None,
        max_key_bytes: int | None = None,
        stop: threading.Event | None = None,
        grace: float = 10.0,
        backoff: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        limit = int((config or {}).get("message.max.bytes", 1_000_000))
        self.max_value_bytes = (
            min(self.MAX_VALUE_BYTES, limit // 2) if max_value_bytes is None else max_value_bytes
        )
        self.max_key_bytes = min(self.MAX_KEY_BYTES, limit // 16) if max_key_bytes is None else max_key_bytes
        self._producer = make_producer(bootstrap, config, {"linger.ms": 50, "acks": "all"})
        self._stop = stop or threading.Event()
        self._grace = grace
        self._backoff = backoff
        self._again: list[DeadLetterProducer._Letter] = []  # transient failure: after a pause
        self._minimal: list[DeadLetterProducer._Letter] = []  # refused: now, as a minimal letter
        self._fatal: list[str] = []
        self._last_error = ""

    def send(self, dlq_topic: str, letter: DeadLetter, view: str, version: str = "") -> None:
        headers = [
            ("fs-reason", letter.reason.encode()),
            (
                "fs-detail",
                self._clip(letter.detail.encode("utf-8", "backslashreplace"), self.MAX_DETAIL_BYTES),
            ),
            ("fs-topic", letter.topic.encode()),
            ("fs-partition", str(letter.partition).encode()),
            ("fs-offset", str(letter.offset).encode()),
            ("fs-view", view.encode()),
            ("fs-view-version", version.encode()),
        ]
        key, value = letter.key, letter.value
        cut = self._cut(value, self.max_value_bytes, "fs-original") + self._cut(
            key, self.max_key_bytes, "fs-original-key"
        )
        if cut:
            headers += [("fs-truncated", b"true"), *cut]
        out = self._Letter(
            dlq_topic,
            None if key is None else key[: self.max_key_bytes],
            None if value is None else value[: self.max_value_bytes],
            headers,
            (key, value),
        )
        self._produce(out)
        self._producer.poll(0)

    @staticmethod
    def _clip(text: bytes, limit: int) -> bytes:
        """UTF-8 ``text`` cut to at most ``limit`` bytes, on a character boundary."""
        return text[:limit].decode("utf-8", "ignore").encode()

    @staticmethod
    def _cut(data: bytes | None, limit: int, prefix: str) -> list[tuple[str, bytes]]:
        """The headers describing ``data`` when it is longer than ``limit`` (else none)."""
        if data is None or len(data) <= limit:
            return []
        return [
            (f"{prefix}-size", str(len(data)).encode()),
            (f"{prefix}-sha256", hashlib.sha256(data).hexdigest().encode()),
        ]

    def _as_minimal(self, out: _Letter) -> _Letter:
        """The letter without key and value, its detail shortened, the originals described."""
        key, value = out.original or (None, None)
        drop = (
            "fs-truncated",
            "fs-original-size",
            "fs-original-sha256",
            "fs-original-key-size",
            "fs-original-key-sha256",
        )
        headers = [
            (k, self._clip(v, 200) if k == "fs-detail" else v) for k, v in out.headers if k not in drop
        ]
        headers += [
            ("fs-truncated", b"true"),
            *self._cut(value, -1, "fs-original"),
            *self._cut(key, -1, "fs-original-key"),
        ]
        return self._Letter(out.topic, None, None, headers, None)

    def _produce(self, out: _Letter) -> None:
        while True:
            try:
                self._producer.produce(
                    out.topic,
                    value=out.value,
                    key=out.key,
                    headers=out.headers,
                    on_delivery=lambda err, _msg, out=out: self._settle(out, err),
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)
            except KafkaException as exc:  # refused before sending, e.g. over message.max.bytes
                self._settle(out, exc.args[0])
                return

    def _settle(self, out: _Letter, err: KafkaError | None) -> None:
        if err is None:
            return
        self._last_error = err.str()
        if err.fatal():
            self._fatal.append(f"fatal producer error: {err.str()}")
        elif err.retriable() or err.code() in self._TRANSIENT:
            self._again.append(out)
        elif out.original is not None:
            self._log.warning(
                "dead letter refused by the broker (%s); sending its headers only to %s",
                err.str(),
                out.topic,
            )
            self._minimal.append(self._as_minimal(out))
        else:
            self._fatal.append(
                f"{out.topic!r} refused even a dead letter without payload ({err.str()}); make sure "
                f"the topic exists and this client may write to it"
            )

    def flush(self) -> None:
        """Block until every letter sent so far is acknowledged (see the class docstring)."""
        attempt, since, logged, stop_seen = 0, time.monotonic(), 0.0, None
        while True:
            while self._producer.flush(0.5):
                if self._stop.is_set():
                    stop_seen = stop_seen or time.monotonic()
                    if time.monotonic() - stop_seen >= self._grace:
                        self._give_up(len(self._producer))
            if self._fatal:
                raise ServiceUnavailable(f"dead-letter delivery failed: {'; '.join(self._fatal[:3])}")
            if self._minimal:
                batch, self._minimal = self._minimal, []
                for out in batch:
                    self._produce(out)
                continue
            if not self._again:
                return
            attempt += 1
            now = time.monotonic()
            if attempt == 1 or now - logged >= self._LOG_EVERY_SECONDS:
                logged = now
                self._log.warning(
                    "dead-letter delivery failed (%s); retrying %d letters (attempt %d, failing for %.0f s)",
                    self._last_error,
                    len(self._again),
                    attempt,
                    now - since,
                )
            if self._stop.is_set():
                stop_seen = stop_seen or now
                if now - stop_seen >= self._grace:
                    self._give_up(len(self._again))
            time.sleep(min(self._backoff[1], self._backoff[0] * 2 ** min(attempt - 1, 20)))
            batch, self._again = self._again, []
            for out in batch:
                self._produce(out)

    def _give_up(self, left: int) -> None:
        raise ServiceUnavailable(
            f"dead-letter delivery still failing {self._grace:.0f} s after the stop request "
            f"({left} letters unacknowledged, last error: {self._last_error}); they are replayed on "
            "restart: the source positions were not advanced past them"
        )
