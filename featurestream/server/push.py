"""``POST /push/{source}``: events from producers that cannot speak Kafka, onto the source's topic.

Events are checked with the stream's own decoder before anything is sent, so a request is taken
whole or not at all: one invalid event refuses the request (400 naming ``events[i].field``) and
sends none. Valid events go out through :class:`featurestream.producer.Producer` (keyed by the
entity's join keys), and the answer waits for the broker's acknowledgement.

Delivery: at least once. A 200 means the broker acknowledged every event of the request; on a
503 some may have been written, and a retry may duplicate them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio.to_thread
import msgspec

from engine.decode import EventDecoder
from engine.definitions import FeatureView
from engine.errors import FeaturestreamError
from engine.redact import redact_text
from featurestream.server.errors import ApiError

__all__ = ["PushGate", "split_events"]

log = logging.getLogger(__name__)
_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])


def split_events(body: bytes, limit: int) -> list[bytes]:
    """The raw JSON of each event: the body is one object, or an array of objects."""
    head = body.lstrip()[:1]
    if head == b"{":
        return [body]
    if head != b"[":
        raise ApiError(
            400,
            "malformed_json",
            "the body is neither a JSON object nor an array of them",
            field="events",
            fix="send one event as a JSON object, or several as a JSON array",
        )
    try:
        raws = _RAW_LIST.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(
            400,
            "malformed_json",
            f"the body is not valid JSON: {exc}",
            field="events",
            fix="send a JSON array of event objects",
        ) from None
    if not raws:
        raise ApiError(
            400, "invalid_request", "the array holds no events", field="events", fix="send at least one event"
        )
    if len(raws) > limit:
        raise ApiError(
            400,
            "too_many_events",
            f"{len(raws)} events in one request; at most {limit} are taken",
            field="events",
            fix=f"send batches of at most {limit} events",
        )
    return [bytes(r) for r in raws]


class PushGate:
    """One producer and one decoder per source, made on first use."""

    def __init__(
        self,
        sources: dict[str, FeatureView],
        bootstrap_servers: str | None,
        kafka_config: dict[str, Any],
        flush_seconds: float,
    ) -> None:
        self.sources = sources
        self.bootstrap_servers = bootstrap_servers
        self.kafka_config = kafka_config
        self.flush_seconds = flush_seconds
        self._decoders: dict[str, EventDecoder] = {}
        self._producers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def view_of(self, source: str, pushable: list[str]) -> FeatureView:
        view = self.sources.get(source)
        if view is None:
            raise ApiError(
                404,
                "unknown_source",
                f"no source {source!r} is served here",
                field="source",
                fix=f"push to one of {pushable}",
            )
        return view

    def check(self, source: str, view: FeatureView, events: list[bytes]) -> None:
        """400 for the first event the stream would dead-letter (none is sent)."""
        decoder = self._decoders.get(source)
        if decoder is None:
            decoder = self._decoders[source] = EventDecoder(view)
        failures = decoder.decode(events).failures
        if not failures:
            return
        i, reason, detail = failures[0]
        subject = detail.split(": ", 1)[0] if ": " in detail else None
        where = f"events[{i}]" + (f".{subject}" if subject and subject != "(message)" else "")
        more = f" ({len(failures)} of {len(events)} events are invalid)" if len(failures) > 1 else ""
        raise ApiError(
            400,
            "invalid_event",
            f"event {i} would be dead-lettered as {reason}{more}; nothing was sent",
            field=where,
            fix=detail,
        )

    def _producer(self, source: str, view: FeatureView) -> Any:
        with self._lock:
            producer = self._producers.get(source)
            if producer is None:
                from featurestream.producer import Producer

                producer = Producer(view, bootstrap_servers=self.bootstrap_servers, config=self.kafka_config)
                self._producers[source] = producer
            return producer

    async def send(self, source: str, view: FeatureView, events: list[bytes]) -> str:
        """Send and wait for the broker's acknowledgement; returns the topic."""
        try:
            producer = self._producers.get(source) or await anyio.to_thread.run_sync(
                self._producer, source, view
            )
            failed = producer.failed
            bad = producer.send_json(events)
            if bad:  # already checked above; the producer's decoder is the same
                raise ApiError(400, "invalid_event", str(bad[0][1]), field=f"events[{bad[0][0]}]")
            left = await anyio.to_thread.run_sync(producer.flush, self.flush_seconds)
        except FeaturestreamError as exc:
            if isinstance(exc, ApiError):
                raise
            raise self._unavailable(redact_text(str(exc), self.kafka_config)) from None
        if left or producer.failed > failed:
            raise self._unavailable(
                f"the broker did not acknowledge every event within {self.flush_seconds:g} s"
            )
        return producer.topic

    @staticmethod
    def _unavailable(why: str) -> ApiError:
        return ApiError(
            503,
            "broker_unavailable",
            f"events could not be delivered: {why}",
            fix="retry later; events of this request may have been written (at least once)",
            headers={"Retry-After": "1"},
        )

    def close(self) -> None:
        for source, producer in self._producers.items():
            try:
                producer.close(self.flush_seconds)
            except FeaturestreamError as exc:
                log.warning("producer of source %s closed with unsent events: %s", source, exc)
