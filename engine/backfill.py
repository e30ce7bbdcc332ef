"""Backfill: compute one feature view version from a span of its topic's history, then stop.

It runs the streaming dataflow itself (:func:`engine.dataflow.build_dataflow`: the same decoding,
lateness, tiles and sinks), with two differences: each source partition starts at the offset
``--from`` resolves to, and ends before the offset ``--to`` resolves to (default: the end as of
the backfill's first start). It writes the version's own Redis namespace and Delta table, reads
with its own consumer group id and commits no offsets, so a live worker of another version is
not disturbed.

Each backfill has a directory ``<root>/<view>__<version>/<id>/`` holding ``plan.json`` (the
offset ranges, fixed at the first start), ``recovery/`` (Bytewax snapshots) and, once finished,
the handoff a worker of that version continues from (:mod:`engine.handoff`). A rerun after an
interruption (even ``kill -9``) resumes from the last snapshot; the stores drop what they
already hold, so nothing is lost or counted twice.

What a window sees before ``--from``: nothing. The backfill's state starts empty at the
``--from`` offsets, so a value is the aggregate of the events read from those offsets on (each
partition judges lateness from its first event read, as a fresh worker does).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as _TP

from connectors.delta_store import DeltaOfflineStore
from connectors.kafka import _client, _reader_config, partition_count, topic_id
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.definitions import FeatureView
from engine.errors import DefinitionError, FeaturestreamError
from engine.handoff import HANDOFF_FILE, ViewSeed, final_states, step_prefix, write_handoff

__all__ = ["BackfillPlan", "Position", "backfill_dir", "parse_position", "plan_backfill", "run_backfill"]

_NO_TS = -(2.0**62)  # a partition that has read nothing (engine.flow_io)


@dataclass(frozen=True)
class Position:
    """Where in each partition a backfill starts or ends (``text`` is how it was written).

    ``earliest``, ``latest`` (the end as of the first start), a time (the first offset whose Kafka
    record timestamp is at or after it, ``offsets_for_times``), or offsets: ``offset:N`` in
    every partition, ``offset:P=N,P=N`` per partition (others: earliest / latest).
    """

    text: str
    kind: str  # earliest | latest | time | offset
    time_ms: int | None = None
    offset: int | None = None
    offsets: dict[int, int] | None = None


def parse_position(text: str, option: str) -> Position:
    """Parse a ``--from``/``--to`` value; a bad one names the option and the accepted forms."""
    raw = text.strip()
    forms = "earliest, latest, an ISO-8601 time (e.g. 2026-01-31T12:00:00Z), offset:N or offset:P=N,P=N"
    if raw in ("earliest", "latest"):
        return Position(raw, raw)
    if raw.startswith("offset:"):
        body = raw.removeprefix("offset:")
        try:
            if "=" not in body:
                n = int(body)
                if n < 0:
                    raise ValueError
                return Position(raw, "offset", offset=n)
            pairs = [item.split("=", 1) for item in body.split(",") if item.strip()]
            offsets = {int(p): int(o) for p, o in pairs}
            if not offsets or min(offsets.values()) < 0 or min(offsets) < 0:
                raise ValueError
            return Position(raw, "offset", offsets=offsets)
        except ValueError:
            raise DefinitionError(
                f"{option} {text!r}: offsets must be non-negative integers; use {forms}"
            ) from None
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise DefinitionError(f"{option} {text!r} is not a position; use {forms}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # documented: a time without offset is UTC
    return Position(raw, "time", time_ms=int(when.timestamp() * 1000))


@dataclass(frozen=True)
class BackfillPlan:
    """The offset range ``[start, end)`` of every partition, fixed at a backfill's first start."""

    view: str
    version: str
    backfill_id: str
    topic: str
    topic_id: str | None
    ranges: dict[int, tuple[int, int]]
    start: str
    end: str

    @property
    def total(self) -> int:
        return sum(max(0, e - s) for s, e in self.ranges.values())

    def to_json(self) -> str:
        data = {**self.__dict__, "ranges": {str(p): list(r) for p, r in self.ranges.items()}}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> BackfillPlan:
        data = json.loads(text)
        data["ranges"] = {int(p): (int(r[0]), int(r[1])) for p, r in data["ranges"].items()}
        return cls(**data)


def backfill_id(start: Position, end: Position | None) -> str:
    """Same ``--from``/``--to`` text, same id: a rerun of the same command resumes it."""
    return hashlib.sha1(f"{start.text}|{end.text if end else 'latest'}".encode()).hexdigest()[:12]


def backfill_dir(root: Path, view: FeatureView, ident: str) -> Path:
    return Path(root) / f"{view.name}__{view.version}" / ident


def _bounds(consumer: Consumer, topic: str, partition: int) -> tuple[int, int, int | None]:
    """(log start, exact end, Kafka timestamp of the last record). The end comes from a fetch
    response's high watermark: some brokers (Tansu) understate it in ListOffsets."""
    low, high = consumer.get_watermark_offsets(_TP(topic, partition), timeout=10)
    if high <= low:
        return low, low, None
    consumer.assign([_TP(topic, partition, high - 1)])
    end, last_ts = high, None
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msgs = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
            if msgs:
                _, fetched = consumer.get_watermark_offsets(_TP(topic, partition), cached=True)
                end = max(high, fetched, msgs[-1].offset() + 1)
                if msgs[-1].offset() + 1 >= end:
                    last_ts = msgs[-1].timestamp()[1]
                    break
    finally:
        consumer.unassign()
    return low, end, last_ts


def _resolve(
    pos: Position,
    consumer: Consumer,
    topic: str,
    p: int,
    low: int,
    end: int,
    last_ts: int | None,
    default: int,
) -> int:
    if pos.kind == "earliest":
        return low
    if pos.kind == "latest":
        return end
    if pos.kind == "offset":
        n = pos.offset if pos.offsets is None else pos.offsets.get(p, default)
        return min(max(low, n if n is not None else default), end)
    assert pos.time_ms is not None
    if last_ts is None or pos.time_ms > last_ts:
        return end  # nothing at or after that time (some brokers answer 0 rather than the end)
    (found,) = consumer.offsets_for_times([_TP(topic, p, pos.time_ms)], timeout=10)
    return end if found.offset < 0 else min(max(low, found.offset), end)


def plan_backfill(
    view: FeatureView, runtime: RuntimeConfig, start: Position, end: Position | None, ident: str
) -> BackfillPlan:
    """Resolve ``start``/``end`` to offsets of every partition of the view's topic, now."""
    topic, bootstrap, config = view.source.topic, runtime.kafka_bootstrap_servers, runtime.kafka_config
    consumer = _client(Consumer, _reader_config(bootstrap, topic, {**config, "group.id": f"fs-plan-{ident}"}))
    ranges: dict[int, tuple[int, int]] = {}
    try:
        for p in range(partition_count(bootstrap, topic, config=config)):
            low, top, last_ts = _bounds(consumer, topic, p)
            s = _resolve(start, consumer, topic, p, low, top, last_ts, low)
            e = top if end is None else _resolve(end, consumer, topic, p, low, top, last_ts, top)
            ranges[p] = (s, max(s, e))
    finally:
        consumer.close()
    return BackfillPlan(
        view.name,
        view.version,
        ident,
        topic,
        topic_id(bootstrap, topic, config),
        ranges,
        start.text,
        end.text if end else "latest",
    )


@dataclass
class BackfillResult:
    directory: Path
    plan: BackfillPlan
    already_done: bool


def _consumed(directory: Path, view: FeatureView, plan: BackfillPlan) -> int:
    """Offsets consumed so far, from the last recovery snapshot of each source partition."""
    prefix = step_prefix(view)
    states = final_states(directory / "recovery", prefix)
    done = 0
    for p, (s, e) in plan.ranges.items():
        snap = states.get((prefix + "source", str(p)))
        if snap is not None:
            done += max(0, min(e, int(snap.get("offset") or s)) - s)
    return done


def run_backfill(
    view: FeatureView,
    runtime: RuntimeConfig,
    root: Path,
    start: Position,
    end: Position | None = None,
    *,
    ident: str | None = None,
    snapshot_seconds: float = 2.0,
    progress: Callable[[int, int], None] | None = None,
    over_existing: bool = False,
) -> BackfillResult:
    """Run (or resume) a backfill to its end; returns its directory and plan.

    ``progress(done, total)`` is called about every 0.2 s with offsets consumed of the plan's.
    A new backfill refuses a version whose offline table exists (a worker or another backfill
    computed it: its state would mix with this one's), unless ``over_existing``.
    """
    if view.source.format != "json":
        raise DefinitionError(
            f"feature view {view.name} reads {view.source.format}; backfill computes event views "
            "(a table view's current rows come from its CDC topic from the start: run a worker)"
        )
    ident = ident or backfill_id(start, end)
    directory = backfill_dir(root, view, ident)
    plan_file = directory / "plan.json"
    if plan_file.exists():
        plan = BackfillPlan.from_json(plan_file.read_text())
        if (plan.start, plan.end) != (start.text, end.text if end else "latest"):
            raise DefinitionError(
                f"backfill id {ident} of {view.name} ran with --from {plan.start} --to {plan.end}; "
                "pass the same options to resume it, or another --id"
            )
    else:
        if not over_existing:
            _check_not_computed(view, runtime)
        plan = plan_backfill(view, runtime, start, end, ident)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "plan.json.tmp"
        tmp.write_text(plan.to_json())
        tmp.replace(plan_file)
    if (directory / HANDOFF_FILE).exists():
        if progress:
            progress(plan.total, plan.total)
        return BackfillResult(directory, plan, True)
    seed = ViewSeed(
        sources={
            str(p): {"offset": s, "max_ts": _NO_TS, "topic_id": plan.topic_id}
            for p, (s, _) in plan.ranges.items()
        },
        end_offsets={p: e for p, (_, e) in plan.ranges.items()},
    )
    bounded = runtime.model_copy(
        update={
            "stop_at_end": False,
            "consumer_config": {**runtime.consumer_config, "group.id": f"featurestream-backfill-{ident}"},
        }
    )
    flow = build_dataflow([view], bounded, seeds={view.version: seed})
    watcher = _Progress(directory, view, plan, progress) if progress else None
    try:
        run_dataflow(flow, workers=1, recovery_dir=directory / "recovery", snapshot_seconds=snapshot_seconds)
    finally:
        if watcher:
            watcher.stop()
    _check_finished(directory, view, plan)
    write_handoff(directory, view, runtime)
    if progress:
        progress(plan.total, plan.total)
    return BackfillResult(directory, plan, False)


def _check_not_computed(view: FeatureView, runtime: RuntimeConfig) -> None:
    store = DeltaOfflineStore(runtime.delta_uri, runtime.delta_storage_options)
    uri = store.table_uri(view.name, view.version)
    if store.version(uri) is not None:
        raise DefinitionError(
            f"{view.name} ({view.version}) is already computed here (its Delta table {uri} exists: "
            "a worker serves it or another backfill ran); backfill a changed definition before any "
            "worker serves it, or `featurestream reset` the pipeline first"
        )


def _check_finished(directory: Path, view: FeatureView, plan: BackfillPlan) -> None:
    """Raise unless every partition reached its end (a stop request ends the run early)."""
    if _consumed(directory, view, plan) < plan.total:
        raise FeaturestreamError(
            f"backfill {directory} stopped before its end; run the same command again to resume it"
        )


class _Progress:
    """Reports offsets consumed: those in the recovery snapshot at start plus events read since."""

    def __init__(
        self, directory: Path, view: FeatureView, plan: BackfillPlan, report: Callable[[int, int], None]
    ) -> None:
        from engine.metrics import EVENTS_IN, total

        self.done = threading.Event()
        base = _consumed(directory, view, plan)
        seen0 = total(EVENTS_IN, view=view.name)

        def follow() -> None:
            while not self.done.wait(0.2):
                read = int(total(EVENTS_IN, view=view.name) - seen0)
                report(min(plan.total, base + read), plan.total)

        report(base, plan.total)
        self.thread = threading.Thread(target=follow, name="backfill-progress", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def describe_plan(plan: BackfillPlan) -> list[str]:
    return [f"partition {p}: offsets {s} to {e} ({e - s:,})" for p, (s, e) in sorted(plan.ranges.items())]
