"""EventSource(dedup_key=...): a redelivered event is counted once, online and offline, across
batches and across a restart from a recovery snapshot; the id memory stays bounded."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from connectors.delta_store import DeltaOfflineStore
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.definitions import EventSource, Field
from engine.flow_io import RecentIds
from engine.metrics import DUPLICATES, total
from featurestream.client import FeatureStore
from tests.conftest import Services
from tests.definitions_helpers import fails, source, view
from tests.pipeline_helpers import MIN, accepted_events
from tests.support import produce, read_topic, unique
from tests.windowing_helpers import close, make_events, make_view, oracle

SPAN = 5 * MIN + 1 * MIN  # allowed_lateness + one tile of the test view
NAMES = ("c10", "c1h", "s10", "v1h")

# ---------------------------------------------------------------------------------------------
# definitions


def test_dedup_key_must_be_a_required_str_or_int_field() -> None:
    fails(lambda: source(dedup_key="nope"), "dedup_key", "declare Field(name='nope'")
    fails(lambda: source(dedup_key="amount"), "dedup_key", "non-nullable str or int")  # nullable float
    fails(lambda: source(dedup_key="score"), "non-nullable str or int")  # float
    ok = source(dedup_key="merchant")
    assert ok.dedup_key == "merchant"
    fails(
        lambda: EventSource(
            name="c",
            topic="t",
            timestamp_field="ts",
            format="debezium-json",
            fields=(Field(name="id", dtype="str"),),
            dedup_key="id",
        ),
        "Debezium",
    )


def test_version_changes_only_when_dedup_key_is_set() -> None:
    plain = view()
    assert "dedup_key" not in plain.canonical()
    deduped = view(source=source(dedup_key="merchant"))
    assert deduped.version != plain.version
    assert view(source=source(dedup_key="merchant")).version == deduped.version
    assert view(source=source(dedup_key="user_id")).version != deduped.version


# ---------------------------------------------------------------------------------------------
# the id memory


def test_recent_ids_forget_after_the_span_and_never_remember_late_events() -> None:
    ids = RecentIds(span_ms=100)
    dup = ids.duplicates(["a", "b", "a", "c"], np.array([10, 20, 30, 40]), np.array([0, 0, 0, 1], bool))
    assert dup.tolist() == [False, False, True, False]
    assert set(ids.times) == {"a", "b"}  # the late "c" is not remembered
    assert ids.duplicates(["c"], np.array([40]), np.array([False])).tolist() == [False]
    ids.forget_before(125)  # horizon 25: "a" (10) and "b" (20) go, "c" (40) stays
    assert set(ids.times) == {"c"}
    assert ids.duplicates(["a"], np.array([10]), np.array([True])).tolist() == [False]
    restored = RecentIds(100, ids.snapshot())
    assert restored.duplicates(["c", "d"], np.array([40, 50]), np.zeros(2, bool)).tolist() == [True, False]


def test_memory_is_bounded_by_the_span_of_event_time() -> None:
    ids = RecentIds(span_ms=1000)
    for start in range(0, 100_000, 500):
        ts = np.arange(start, start + 500)
        ids.duplicates([f"e{t}" for t in ts.tolist()], ts, np.zeros(500, bool))
        ids.forget_before(float(ts.max()))
        assert len(ids.times) <= 1000 + 500
        assert len(ids.queue) <= 1000 + 500


# ---------------------------------------------------------------------------------------------
# end to end


def _redeliveries(events: list[dict], rng: np.random.Generator, n: int) -> list[dict]:
    """Copies of ``n`` events (same event_id), some with another payload: the first one counts."""
    out = []
    for i in rng.choice(len(events), n, replace=False).tolist():
        e = dict(events[i])
        if rng.random() < 0.3:
            e["amount"] = 12345.0
        out.append(e)
    return out


def _oracle_events(kafka: str, topic: str) -> tuple[pd.DataFrame, int]:
    """The counted events by the documented rule, from the topic as read back: per partition in
    offset order, an event is late when more than the lateness behind the newest event time
    before it, and counted when not late and its id was not counted before in that partition.
    Returns them and the number of redeliveries dropped or dead-lettered."""
    rows = [
        {**json.loads(m.value()), "partition": m.partition(), "offset": m.offset()}
        for m in read_topic(kafka, topic)
    ]
    df = pd.DataFrame(rows).sort_values(["partition", "offset"], kind="stable").reset_index(drop=True)
    counted = np.zeros(len(df), dtype=bool)
    for _, g in df.groupby("partition", sort=False):
        newest, taken = -np.inf, set()
        for i, ts, eid in zip(g.index, g["ts"], g["event_id"], strict=True):
            if ts >= newest - 5 * MIN and eid not in taken:
                counted[i] = True
                taken.add(eid)
            newest = max(newest, ts)
    acc = df[counted].sort_values(["user_id", "ts", "partition", "offset"], kind="stable")
    return acc.reset_index(drop=True), int((~counted).sum())


def _check(store: FeatureStore, acc: pd.DataFrame, delta: str, view: Any) -> None:
    groups = {k: g.reset_index(drop=True) for k, g in acc.groupby("user_id")}
    entities = sorted(groups)
    newest = int(acc["ts"].max())
    features = [f"win:{n}" for n in NAMES]
    for t in (newest, newest + 8 * MIN):
        online = store.get_online_features(features, entities, as_of=datetime.fromtimestamp(t / 1000, UTC))
        stamps = pd.to_datetime(np.full(len(entities), t, np.int64), unit="ms", utc=True)
        offline = store.get_training_set(
            pd.DataFrame({"user_id": entities, "event_timestamp": stamps}), features
        ).to_pandas()
        for i, e in enumerate(entities):
            for n in NAMES:
                want = oracle(groups[e], n, t)
                assert close(online.values[f"win:{n}"][i], want, rtol=1e-7), (n, e, t)
                assert close(offline[f"win:{n}"][i], want, rtol=1e-7), (n, e, t)
    # Delta holds each counted event once: the filter runs before the offline sink.
    offline_store = DeltaOfflineStore(delta)
    stored = offline_store.read(offline_store.table_uri(view.name, view.version))
    pairs = sorted(
        zip(stored.column("_partition").to_pylist(), stored.column("_offset").to_pylist(), strict=True)
    )
    assert pairs == sorted(zip(acc["partition"].tolist(), acc["offset"].tolist(), strict=True))


def test_redelivered_events_count_once_across_batches(
    services: Services, topic, runtime: RuntimeConfig
) -> None:
    name = topic(partitions=2)
    view = make_view(name, dedup_key="event_id")
    rng = np.random.default_rng(1)
    events = make_events(seed=21, n=300)
    # Redeliveries right after their original (same batch or the next: batches of 40) and
    # again shuffled through the stream within the lateness.
    mixed: list[dict] = []
    for e in events:
        mixed.append(e)
        if rng.random() < 0.15:
            mixed.append(dict(e))
    for d in _redeliveries(events, rng, 60):
        pos = next(i for i, e in enumerate(mixed) if e["event_id"] == d["event_id"])
        mixed.insert(min(len(mixed), pos + int(rng.integers(1, 40))), d)
    produce(services.kafka, name, mixed, key_field="user_id")
    before = total(DUPLICATES, view="win")
    rt = runtime.model_copy(update={"batch_size": 40})
    run_dataflow(build_dataflow([view], rt))
    acc, dropped = _oracle_events(services.kafka, name)
    assert len(acc) == len(events)  # no late events here: every original once
    # Each copy is dropped as a duplicate, or dead-lettered as late when it arrived more than
    # the lateness after newer events (then its id may be forgotten): never counted.
    late = [json.loads(m.value()) for m in read_topic(services.kafka, f"{name}.dlq")]
    assert {d["event_id"] for d in late} <= set(acc["event_id"])
    assert total(DUPLICATES, view="win") - before + len(late) == dropped > 60
    store = FeatureStore([view], redis_url=rt.redis_url, delta_uri=rt.delta_uri, redis_prefix=rt.redis_prefix)
    _check(store, acc, rt.delta_uri, view)


def test_duplicates_after_a_restart_from_a_snapshot_count_once(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=2)
    view = make_view(name, dedup_key="event_id")
    recovery = tmp_path / "recovery"
    wave1 = make_events(seed=5, n=200, span=30 * MIN)
    produce(services.kafka, name, wave1, key_field="user_id")
    run_dataflow(build_dataflow([view], runtime), recovery_dir=recovery, snapshot_seconds=0.2)

    # After the restart: redeliveries of the newest events of wave 1 (within the lateness, so
    # only the snapshot's id memory can catch them), one far older copy (late: dead-lettered),
    # then new events.
    newest = max(e["ts"] for e in wave1)
    recent = [dict(e) for e in wave1 if e["ts"] >= newest - 3 * MIN]
    old = next(dict(e) for e in wave1 if e["ts"] < newest - 20 * MIN)
    fresh = [
        {**e, "event_id": f"n{e['event_id']}", "ts": e["ts"] + 30 * MIN}
        for e in make_events(seed=6, n=100, span=10 * MIN)
    ]
    assert len(recent) >= 10
    produce(services.kafka, name, [*recent, old, *fresh], key_field="user_id")
    before = total(DUPLICATES, view="win")
    run_dataflow(build_dataflow([view], runtime), recovery_dir=recovery, snapshot_seconds=0.2)
    assert total(DUPLICATES, view="win") - before == len(recent)
    dlq = [json.loads(m.value()) for m in read_topic(services.kafka, f"{name}.dlq")]
    assert [d["event_id"] for d in dlq] == [old["event_id"]]

    acc, _ = _oracle_events(services.kafka, name)
    assert len(acc) == len(wave1) + len(fresh)
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    _check(store, acc, runtime.delta_uri, view)

    # Without recovery, a run from the topic's start relearns the ids and decides the same.
    again = runtime.model_copy(
        update={"redis_prefix": unique("again"), "delta_uri": str(tmp_path / "delta-again")}
    )
    run_dataflow(build_dataflow([view], again))
    store2 = FeatureStore(
        [view], redis_url=again.redis_url, delta_uri=again.delta_uri, redis_prefix=again.redis_prefix
    )
    _check(store2, acc, again.delta_uri, view)


def test_without_dedup_key_redeliveries_are_counted_twice(
    services: Services, topic, runtime: RuntimeConfig
) -> None:
    """The control: the same stream without dedup_key counts copies (events are facts)."""
    name = topic(partitions=1)
    view = make_view(name)
    events = make_events(seed=0, n=50)
    copies = [dict(e) for e in events[-5:]]
    produce(services.kafka, name, [*events, *copies])
    run_dataflow(build_dataflow([view], runtime))
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    t = max(e["ts"] for e in events)
    users = sorted({e["user_id"] for e in events})
    got = store.get_online_features(["win:c10"], users, as_of=_at(t)).values["win:c10"]

    def count(df: pd.DataFrame) -> list[int]:
        return [oracle(df[df["user_id"] == u], "c10", t) for u in users]

    acc, _ = accepted_events(read_topic(services.kafka, name), 5 * MIN)  # late rule, no dedup
    assert got == count(acc) != count(pd.DataFrame(events))


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
