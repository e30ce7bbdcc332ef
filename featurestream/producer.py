"""Publish events to a source's topic, validated exactly as the stream will decode them.

Each event is encoded as JSON and run through the stream's own decoder
(:class:`engine.decode.EventDecoder`) before it is sent, so an event the producer accepts is never
dead-lettered for its shape; one it rejects raises :class:`InvalidEvent` with the same reason and
detail the dead letter would carry, and is not sent. (Lateness depends on the stream's watermark,
so a valid event can still arrive late.)

Delivery: at least once. ``acks=all`` with librdkafka's idempotence, so the client's own retries
neither duplicate nor reorder events within a partition; an event counts as delivered when the
broker acknowledged it. Events keyed by the entity's join keys stay in one partition per entity.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message

from connectors.kafka import admin_client, ensure_topic, make_producer
from engine.decode import EventDecoder
from engine.definitions import Entity, EventSource, FeatureView
from engine.errors import DefinitionError, FeaturestreamError, ServiceUnavailable
from engine.redact import redact_text
from featurestream.config import Settings
from featurestream.event_json import MESSAGE, EventEncoder, InvalidEvent

__all__ = ["Delivery", "DeliveryError", "InvalidEvent", "Producer"]

_Refusal = tuple[int, "InvalidEvent"]  # (position in a batch, why it was not sent)

log = logging.getLogger(__name__)

# librdkafka defaults for a producer of events: batched, acknowledged by every replica, retried
# without duplicates, and keyed the way Java clients key (so their events for an entity share a
# partition with ours). Settings in ``config`` / ``kafka_config`` override them.
_DEFAULTS: dict[str, Any] = {
    "linger.ms": 20,
    "acks": "all",
    "enable.idempotence": True,
    "partitioner": "murmur2_random",
}


class DeliveryError(FeaturestreamError):
    """Events could not be handed to or acknowledged by the broker."""


@dataclass(frozen=True)
class Delivery:
    """The outcome of one sent event, as reported by the broker (``error`` is None on success)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _decoder_view(source: EventSource, keys: tuple[str, ...]) -> FeatureView:
    """A view holding just what the stream's decoder needs of ``source``: its schema, and the join
    keys whose entity string becomes the message key.

    The decoder checks the whole source schema whatever the view aggregates, so its verdict is
    the same for every view of the source. The view is built unvalidated: it aggregates nothing,
    and without keys its "entity" is the timestamp (always present, never used).
    """
    entity = Entity(name="producer", join_keys=keys or (source.timestamp_field,))
    return FeatureView.model_construct(name="producer", entity=entity, source=source, aggregations=())


def _check_keys(source: EventSource, keys: Sequence[str]) -> tuple[str, ...]:
    """The key fields, checked like a view's join keys (non-nullable str or int source fields)."""
    out = tuple(keys)
    if len(set(out)) != len(out):
        raise DefinitionError(f"key_fields {list(out)} repeat a field; list each once")
    for key in out:
        f = source.field(key)
        if f is None:
            raise DefinitionError(
                f"key_fields: {key!r} is not a field of source {source.name!r} (its fields: "
                f"{[x.name for x in source.fields]}); name one of them"
            )
        if f.dtype not in ("str", "int") or f.nullable:
            raise DefinitionError(
                f"key_fields: {key!r} is a {'nullable ' if f.nullable else ''}{f.dtype} field; "
                "key by non-nullable str or int fields (an entity's join keys)"
            )
    return out


class Producer:
    """Publishes events to ``source``'s topic after validating each with the stream's decoder.

    ``source`` is an :class:`EventSource`, or a :class:`FeatureView` (its source, keyed by its
    entity's join keys). ``key_fields`` key each message by the entity string of those fields
    (``user_id``; composite keys joined with ``|`` as the stream joins them), so one entity's
    events stay in one partition; without keys, messages are unkeyed.

    ``bootstrap_servers`` and ``config`` (librdkafka settings: SASL/SSL, ``client.id``...) default
    to ``settings`` (by default read from the environment: ``FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS``,
    else the embedded broker, and ``FEATURESTREAM_KAFKA_CONFIG``). ``linger_ms`` and
    ``batch_messages`` tune batching; ``partitions`` creates a missing topic with that many
    partitions (else a missing topic is an error). ``on_delivery`` is called with a
    :class:`Delivery` for every sent event, from :meth:`send`, :meth:`flush` or :meth:`close`, on
    the calling thread. The producer is thread-safe.
    """

    def __init__(
        self,
        source: EventSource | FeatureView,
        *,
        bootstrap_servers: str | None = None,
        config: Mapping[str, Any] | None = None,
        key_fields: Sequence[str] | None = None,
        settings: Settings | None = None,
        partitions: int | None = None,
        linger_ms: float | None = None,
        batch_messages: int | None = None,
        on_delivery: Callable[[Delivery], None] | None = None,
    ) -> None:
        if isinstance(source, FeatureView):
            if key_fields is None:
                key_fields = source.entity.join_keys
            source = source.source
        if not isinstance(source, EventSource):
            raise DefinitionError(
                f"Producer needs an EventSource or a FeatureView, not a {type(source).__name__}"
            )
        self.source = source
        self.topic = source.topic
        self.key_fields = _check_keys(source, key_fields or ())
        self._decoder = EventDecoder(_decoder_view(source, self.key_fields))
        self._encoder = EventEncoder(source)

        if bootstrap_servers is None or config is None:
            settings = settings or Settings()
            if config is None:
                config = settings.kafka_config
            if bootstrap_servers is None:
                bootstrap_servers = _bootstrap(settings)
        self.bootstrap_servers = bootstrap_servers
        self._config = dict(config)
        tuning = {"linger.ms": linger_ms, "batch.num.messages": batch_messages}
        extra = {k: v for k, v in tuning.items() if v is not None}
        _ready_topic(bootstrap_servers, source, partitions, self._config)
        self._client = make_producer(bootstrap_servers, {**self._config, **extra}, _DEFAULTS)

        self._on_delivery = on_delivery
        self._lock = threading.Lock()
        self._sent = self._delivered = self._failed = 0
        self._logged: set[str] = set()
        self._closed = False

    # -- counters ---------------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Events handed to the client (valid ones only)."""
        return self._sent

    @property
    def delivered(self) -> int:
        """Events the broker acknowledged."""
        return self._delivered

    @property
    def failed(self) -> int:
        """Events the broker did not take (after the client's retries)."""
        return self._failed

    @property
    def pending(self) -> int:
        """Events sent but not yet reported either way."""
        return self._sent - self._delivered - self._failed

    # -- sending ----------------------------------------------------------------------------

    def send(self, event: Mapping[str, Any]) -> None:
        """Validate one event and send it; raises :class:`InvalidEvent` (and sends nothing) if the
        stream would dead-letter it. A ``datetime`` in the timestamp field is converted to the
        source's ``timestamp_format``."""
        value = self.encode(event)
        keys, bad = self._check([value])
        if bad:
            raise bad[0][1]
        self._produce(keys[0][1], value)

    def send_many(self, events: Iterable[Mapping[str, Any]]) -> list[tuple[int, InvalidEvent]]:
        """Send every valid event (validated as one batch: faster than :meth:`send` per event);
        returns the invalid ones, unsent, as ``(position, error)``."""
        values: list[bytes] = []
        bad: list[tuple[int, InvalidEvent]] = []
        where: list[int] = []
        for i, event in enumerate(events):
            try:
                values.append(self.encode(event))
                where.append(i)
            except InvalidEvent as exc:
                bad.append((i, exc))
        ok, failed = self._check(values)
        for j, key in ok:
            self._produce(key, values[j])
        bad.extend((where[j], exc) for j, exc in failed)
        return sorted(bad, key=lambda b: b[0])

    def send_json(
        self, values: Sequence[bytes], *, stop_at_invalid: bool = False
    ) -> list[tuple[int, InvalidEvent]]:
        """Send JSON messages as they are (e.g. lines of a JSONL file), each validated by the
        stream's decoder; returns the invalid ones, unsent, as ``(position, error)``. With
        ``stop_at_invalid``, nothing from the first invalid message on is sent."""
        ok, bad = self._check(list(values))
        if stop_at_invalid and bad:
            first = bad[0][0]
            ok, bad = [(j, k) for j, k in ok if j < first], bad[:1]
        for j, key in ok:
            self._produce(key, values[j])
        return bad

    def encode(self, event: Mapping[str, Any]) -> bytes:
        """The JSON bytes :meth:`send` would publish for ``event`` (not yet validated against the
        schema); raises :class:`InvalidEvent` for a value that cannot be written as JSON."""
        return self._encoder.encode(event)

    def _check(self, values: list[bytes]) -> tuple[list[tuple[int, bytes | None]], list[_Refusal]]:
        """(position, key) of the valid messages and (position, error) of the others, as decided
        by the stream's decoder."""
        if not values:
            return [], []
        dec = self._decoder.decode(values)
        keyed = bool(self.key_fields)
        ok = [(int(j), dec.entity[n].encode() if keyed else None) for n, j in enumerate(dec.index.tolist())]
        bad = [(int(j), self._invalid(reason, detail)) for j, reason, detail in dec.failures]
        return ok, bad

    def _invalid(self, reason: str, detail: str) -> InvalidEvent:
        subject = detail.split(": ", 1)[0] if ": " in detail else MESSAGE
        return InvalidEvent(self.source.name, subject, reason, detail)

    def _produce(self, key: bytes | None, value: bytes) -> None:
        if self._closed:
            raise DeliveryError(f"the producer of source {self.source.name!r} is closed; make a new one")
        while True:
            try:
                self._client.produce(self.topic, value=value, key=key, on_delivery=self._report)
                break
            except BufferError:  # the client's queue is full: wait for deliveries (backpressure)
                self._client.poll(0.05)
            except KafkaException as exc:
                raise DeliveryError(
                    f"could not send an event of {len(value):,} bytes to topic {self.topic!r}: "
                    f"{redact_text(_kafka_text(exc), self._config)}"
                ) from None
        with self._lock:
            self._sent += 1
        self._client.poll(0)

    def _report(self, err: KafkaError | None, msg: Message) -> None:
        text = None if err is None else redact_text(err.str(), self._config)
        with self._lock:
            if text is None:
                self._delivered += 1
            else:
                self._failed += 1
                first = text not in self._logged
                self._logged.add(text)
        if text is not None and first:
            log.warning("event not delivered to topic %s: %s", self.topic, text)
        if self._on_delivery is not None:
            self._on_delivery(
                Delivery(
                    topic=msg.topic() or self.topic,
                    partition=msg.partition() if msg.partition() is not None else -1,
                    offset=msg.offset() if msg.offset() is not None else -1,
                    key=msg.key(),
                    error=text,
                )
            )

    # -- lifecycle --------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> int:
        """Wait up to ``timeout`` seconds for every sent event's delivery report; returns how many
        are still pending (0: each was delivered or failed, see :attr:`failed`)."""
        return self._client.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush, then release the client. Events still unacknowledged after ``timeout`` seconds
        are dropped (reported as failed) and raise :class:`DeliveryError`."""
        if self._closed:
            return
        left = self.flush(timeout)
        if left:  # drop them now: the client would otherwise wait out their message.timeout.ms
            self._client.purge()
            self._client.flush(5)
        self._closed = True
        self._client.close()
        if left:
            raise DeliveryError(
                f"{left} event(s) sent to topic {self.topic!r} were not acknowledged within "
                f"{timeout:g} s and were dropped; check that the broker at {self.bootstrap_servers} "
                "is reachable, then send them again"
            )

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
            return
        try:  # an error is already on its way: flush what was sent, without hiding it
            self.close()
        except FeaturestreamError:
            log.warning("events of topic %s may be lost: the producer closed on an error", self.topic)


def _kafka_text(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else exc
    return err.str() if isinstance(err, KafkaError) else str(err)


def _bootstrap(settings: Settings) -> str:
    """The configured broker, else the embedded one (started if needed)."""
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    from featurestream.local.services import ensure_services

    return ensure_services(settings).kafka_bootstrap_servers


def _ready_topic(bootstrap: str, source: EventSource, partitions: int | None, config: dict[str, Any]) -> None:
    """Check the source topic exists (creating it with ``partitions`` when given)."""
    if partitions is not None:
        ensure_topic(bootstrap, source.topic, partitions, config=config)
        return
    try:
        topics = admin_client(bootstrap, config).list_topics(timeout=10).topics
    except KafkaException as exc:
        raise ServiceUnavailable(
            f"Kafka at {bootstrap} did not answer: {redact_text(_kafka_text(exc), config)}"
        ) from None
    found = topics.get(source.topic)
    if found is None or found.error is not None or not found.partitions:
        raise ServiceUnavailable(
            f"topic {source.topic!r} of source {source.name!r} does not exist on {bootstrap}; create "
            "it (Producer(..., partitions=N) or `featurestream produce ... --partitions N`) or check "
            "the source's topic name"
        )
