"""The dead-letter producer: every undecodable or late event, of any size, reaches the DLQ topic."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from connectors.kafka import make_producer
from engine.decode import DeadLetter
from engine.errors import ServiceUnavailable

__all__ = ["DeadLetterProducer"]


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
