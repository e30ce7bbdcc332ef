"""Bytewax input: the decoding Kafka source (the sinks are in :mod:`engine.sinks`).

Each source partition is one Kafka partition. It emits one item per micro-batch (columns, not
events), so Bytewax's per-item cost is paid per batch. Its snapshot is the next offset, the
partition's newest event time and the topic's id, so after recovery it resumes at the same
position with the same watermark, and a recreated topic (new id, or an end below the position)
stops the worker instead of being read from a position that means nothing there.

Lateness is judged here, per source partition, and nothing downstream waits for a watermark: a
read combines tiles as of the read time and Delta keeps accepted events, so an idle partition
holds nothing back (no window waits to close) and needs no idle timeout.

With the source's ``dedup_key``, each partition also remembers the ids of the events it accepted
whose event time lies within ``allowed_lateness`` plus one tile of its newest event time (in its
snapshot too). A redelivered id in that span is dropped (counted in
``featurestream_duplicates_total``) before both sinks; an older one is late anyway.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.delta_store import event_schema
from connectors.kafka import PartitionReader, RawBatch, partition_count, topic_id, topic_reset_error
from engine.decode import DeadLetter, EventDecoder, Reason
from engine.definitions import FeatureView, duration_ms, format_duration
from engine.metrics import (
    CONSUMER_LAG,
    DEAD_LETTERS,
    DUPLICATES,
    EVENTS_ACCEPTED,
    EVENTS_IN,
    LATE_EVENTS,
    WATERMARK,
)
from engine.observe import HEALTH

_NO_TS = -(2.0**62)

STOP = threading.Event()
"""Set to end every source at its current position; sinks then flush and the dataflow returns."""


def request_stop() -> None:
    """End the running dataflow cleanly (as on SIGTERM): no event is half-written."""
    STOP.set()


@dataclass
class SourceBatch:
    """One decoded micro-batch of one Kafka partition."""

    topic: str
    partition: int
    entity: list[str]
    ts: np.ndarray
    columns: list[np.ndarray]
    offsets: np.ndarray
    dead: list[DeadLetter] = field(default_factory=list)
    text: dict[str, list[str | None]] = field(default_factory=dict)
    read: int = 0
    watermark: float = _NO_TS
    read_at: float = 0.0  # wall-clock time the batch came from Kafka (for the latency histogram)
    produced_at: float = float("nan")  # oldest Kafka message timestamp in the batch (freshness)

    def rows(self, columns: tuple[str, ...]) -> pa.Table:
        """The accepted events as offline-store rows."""
        n = len(self.entity)
        return pa.Table.from_arrays(
            [
                pa.array(self.entity, pa.string()),
                pa.array(self.ts, pa.int64()).view(pa.timestamp("ms", tz="UTC")),
                *[
                    pa.array(self.text[name], pa.string())
                    if name in self.text
                    else pa.array(c, pa.float64(), from_pandas=True)
                    for name, c in zip(columns, self.columns, strict=True)
                ],
                pa.array([self.topic] * n, pa.string()),
                pa.array(np.full(n, self.partition, np.int32)),
                pa.array(self.offsets),
                pa.array((self.ts // 86_400_000).astype(np.int32), pa.int32()).view(pa.date32()),
            ],
            schema=event_schema(columns, tuple(self.text)),
        )


class RecentIds:
    """Ids of accepted events of one source partition, each kept while its event time is at most
    ``span_ms`` behind the partition's newest event time.

    Memory: one entry per accepted event of that span (about 135 bytes plus the id), bounded by
    the partition's event rate times ``allowed_lateness`` plus one tile. Scope: one partition, so
    a copy of an event sent to another partition (another key, a changed partition count) is not
    caught.
    """

    def __init__(self, span_ms: float, entries: list[tuple[Any, float]] | None = None) -> None:
        self.span_ms = span_ms
        self.times: dict[Any, float] = {}
        self.queue: list[tuple[float, Any]] = []
        for key, t in entries or []:
            self.times[key] = t
            self.queue.append((t, key))
        heapq.heapify(self.queue)

    def duplicates(self, ids: list[Any], ts: np.ndarray, late: np.ndarray) -> np.ndarray:
        """Which events repeat an id seen before (in earlier batches or earlier in this one);
        the others, unless late, are remembered."""
        dup = np.zeros(len(ids), dtype=bool)
        times, queue = self.times, self.queue
        for j, (key, t, is_late) in enumerate(zip(ids, ts.tolist(), late.tolist(), strict=True)):
            if key in times:
                dup[j] = True
            elif not is_late:
                times[key] = t
                heapq.heappush(queue, (t, key))
        return dup

    def forget_before(self, newest_ts: float) -> None:
        horizon = newest_ts - self.span_ms
        times, queue = self.times, self.queue
        while queue and queue[0][0] < horizon:
            t, key = heapq.heappop(queue)
            if times.get(key) == t:
                del times[key]

    def snapshot(self) -> list[tuple[Any, float]]:
        return list(self.times.items())


class _DecodingPartition(StatefulSourcePartition[SourceBatch, dict]):
    def __init__(
        self,
        view: FeatureView,
        reader: PartitionReader,
        max_ts: float,
        batch_size: int,
        poll_timeout: float,
        topic_id: str | None = None,
        recent_ids: list[tuple[Any, float]] | None = None,
        end: int | None = None,
    ) -> None:
        self.view = view
        self.reader = reader
        self.end = end  # a bounded read (backfill) ends before this offset, whatever arrives later
        self.topic_id = topic_id
        self.decoder = EventDecoder(view)
        self.lateness = float(duration_ms(view.allowed_lateness))
        self.max_ts = max_ts
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self._awake: datetime | None = None
        labels = {"view": view.name, "topic": reader.topic, "partition": str(reader.partition)}
        self._in = EVENTS_IN.labels(**labels)
        self._wm = WATERMARK.labels(**labels)
        self._ok = EVENTS_ACCEPTED.labels(view=view.name)
        self._late = LATE_EVENTS.labels(view=view.name)
        self._lag = CONSUMER_LAG.labels(**labels)
        self._key = (view.name, reader.topic, reader.partition)
        self.recent: RecentIds | None = None
        key = view.source.dedup_key
        if key is not None:
            span = self.lateness + duration_ms(view.tile_size)
            self.recent = RecentIds(span, recent_ids)
            kind: Any = int if view.source.field(key).dtype == "int" else str  # type: ignore[union-attr]
            self._ids = msgspec.json.Decoder(msgspec.defstruct("EventId", [(key, kind)]))
            self._dups = DUPLICATES.labels(view=view.name)
        HEALTH.source_polled(*self._key)

    def next_batch(self) -> list[SourceBatch]:
        if self.reader.at_end or STOP.is_set() or (self.end is not None and self.reader.position >= self.end):
            raise StopIteration
        # Never wait inside the read: the client fetches in the background, so a read takes what
        # has arrived (a small batch when the stream is slow, up to batch_size when it is fast),
        # and a worker's other partitions are never held up by this one's timeout.
        raw = self.reader.read(self.batch_size, 0.0)
        if raw is not None and self.end is not None:
            raw = _before(raw, self.end, self.reader)
        read_at = time.time()
        HEALTH.source_polled(*self._key)
        self._lag.set(self.reader.lag())
        if raw is None:
            self._awake = datetime.now(UTC) + timedelta(seconds=self.poll_timeout)
            return []
        self._awake = None
        dec = self.decoder.decode(raw.values)
        ts = dec.ts
        dead = [
            DeadLetter(raw.topic, raw.partition, int(raw.offsets[i]), raw.keys[i], raw.values[i], why, msg)
            for i, why, msg in dec.failures
        ]
        keep = None
        if len(ts):
            seen = np.maximum.accumulate(np.concatenate(([self.max_ts], ts.astype(np.float64))))
            late = ts < seen[:-1] - self.lateness
            self.max_ts = float(seen[-1])
            dup = None
            if self.recent is not None:
                dup = self._duplicates(raw.values, dec.index, ts, late)
                late &= ~dup
            if late.any():
                self._late.inc(int(late.sum()))
                lag = format_duration(self.view.allowed_lateness)
                for j in np.flatnonzero(late).tolist():
                    i = int(dec.index[j])
                    wm = datetime.fromtimestamp((seen[j] - self.lateness) / 1000, UTC).isoformat()
                    dead.append(
                        DeadLetter(
                            raw.topic,
                            raw.partition,
                            int(raw.offsets[i]),
                            raw.keys[i],
                            raw.values[i],
                            Reason.LATE,
                            f"{self.view.source.timestamp_field}: event time is behind the watermark "
                            f"{wm} (newest event time minus allowed_lateness {lag}); raise the view's "
                            f"allowed_lateness to accept it",
                        )
                    )
                keep = ~late
            if dup is not None and dup.any():
                self._dups.inc(int(dup.sum()))
                keep = ~(late | dup)
        entity, columns, index, text = dec.entity, dec.columns, dec.index, dec.text
        if keep is not None:
            ts, index = ts[keep], index[keep]
            flags = keep.tolist()
            entity = [e for e, k in zip(entity, flags, strict=True) if k]
            columns = [c[keep] for c in columns]
            text = {name: [v for v, k in zip(vals, flags, strict=True) if k] for name, vals in text.items()}
        dead.sort(key=lambda d: d.offset)
        self._in.inc(len(raw.values))
        self._ok.inc(len(ts))
        for letter in dead:
            DEAD_LETTERS.labels(view=self.view.name, reason=letter.reason).inc()
        if self.max_ts > _NO_TS:
            self._wm.set((self.max_ts - self.lateness) / 1000)
        return [
            SourceBatch(
                topic=raw.topic,
                partition=raw.partition,
                entity=entity,
                ts=ts,
                columns=columns,
                offsets=raw.offsets[index] if len(index) else raw.offsets[:0],
                dead=dead,
                text=text,
                read=len(raw.values),
                watermark=self.max_ts - self.lateness,
                read_at=read_at,
                produced_at=raw.produced_at,
            )
        ]

    def _duplicates(
        self, values: list[bytes], index: np.ndarray, ts: np.ndarray, late: np.ndarray
    ) -> np.ndarray:
        """Events whose dedup_key repeats a recently accepted one (a duplicate is never late:
        it is dropped, not dead-lettered)."""
        assert self.recent is not None
        field = self.view.source.dedup_key
        ids = [getattr(self._ids.decode(values[i]), field) for i in index.tolist()]  # type: ignore[arg-type]
        dup = self.recent.duplicates(ids, ts, late)
        self.recent.forget_before(self.max_ts)
        return dup

    def next_awake(self) -> datetime | None:
        """After an empty read, poll again in ``poll_timeout`` seconds; else at once."""
        return self._awake

    def snapshot(self) -> dict:
        state = {"offset": self.reader.position, "max_ts": self.max_ts, "topic_id": self.topic_id}
        if self.recent is not None:
            state["recent_ids"] = self.recent.snapshot()
        return state

    def close(self) -> None:
        HEALTH.source_closed(*self._key)
        self.reader.close()


def _before(raw: RawBatch, end: int, reader: PartitionReader) -> RawBatch | None:
    """The messages of ``raw`` below offset ``end``; the reader's position then stops at ``end``."""
    if int(raw.offsets[-1]) < end:
        return raw
    reader.position = end
    n = int(np.searchsorted(raw.offsets, end))
    if n == 0:
        return None
    return RawBatch(raw.topic, raw.partition, raw.values[:n], raw.keys[:n], raw.offsets[:n], raw.produced_at)


class DecodingKafkaSource(FixedPartitionedSource[SourceBatch, dict]):
    """Reads a view's source topic, every partition, as decoded micro-batches.

    Delivery: each message exactly once into the dataflow's state when recovery is enabled
    (positions live in snapshots, with the topic's id); from the topic's start on a fresh run.
    Resuming on a topic with another id, or whose end lies below the position, raises
    :class:`~connectors.kafka.TopicChangedError` naming the fix, rather than skip events.
    ``kafka_config`` goes to every client; ``consumer_config`` to the readers only, over it.
    ``seed`` (partition -> snapshot) is where a partition without a recovery snapshot starts
    (a backfill's start, or the end a finished backfill handed over); with ``end_offsets``
    (partition -> offset) each partition ends before that offset (a bounded backfill).
    """

    def __init__(
        self,
        view: FeatureView,
        bootstrap: str,
        *,
        batch_size: int,
        poll_timeout: float,
        stop_at_end: bool,
        consumer_config: Mapping[str, Any],
        kafka_config: Mapping[str, Any] | None = None,
        seed: Mapping[str, dict] | None = None,
        end_offsets: Mapping[int, int] | None = None,
    ) -> None:
        self.view = view
        self.seed = dict(seed or {})
        self.end_offsets = end_offsets
        self.bootstrap = bootstrap
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.stop_at_end = stop_at_end
        self.kafka_config = dict(kafka_config or {})
        self.consumer_config = {**self.kafka_config, **consumer_config}
        self._topic_id: tuple[str | None] | None = None

    def list_parts(self) -> list[str]:
        topic = self.view.source.topic
        return [str(p) for p in range(partition_count(self.bootstrap, topic, config=self.kafka_config))]

    def current_topic_id(self) -> str | None:
        """The source topic's id as of this run (asked once per worker)."""
        if self._topic_id is None:
            self._topic_id = (topic_id(self.bootstrap, self.view.source.topic, self.kafka_config),)
        return self._topic_id[0]

    def build_part(self, step_id: str, for_part: str, resume_state: dict | None) -> _DecodingPartition:
        state = resume_state or self.seed.get(for_part) or {}
        topic, partition = self.view.source.topic, int(for_part)
        current = self.current_topic_id()
        stored = state.get("topic_id")
        if stored and current and stored != current:
            raise topic_reset_error(
                topic,
                partition,
                f"the recovery snapshot of view {self.view.name} ({self.view.version}) holds read "
                f"position {state.get('offset')} of the topic with id {stored}",
                f"a topic with id {current}",
            )
        reader = PartitionReader(
            self.bootstrap,
            topic,
            partition,
            state.get("offset"),
            stop_at_end=self.stop_at_end,
            config=self.consumer_config,
        )
        return _DecodingPartition(
            self.view,
            reader,
            state.get("max_ts", _NO_TS),
            self.batch_size,
            self.poll_timeout,
            topic_id=current,
            recent_ids=state.get("recent_ids"),
            end=None if self.end_offsets is None else self.end_offsets.get(partition, 0),
        )
