"""Verify on a view with session windows and object aggregations: session features and
first/last_n/count_distinct are recomputed from the raw events (no false mismatches, a damaged
session value found); percentile and top_k are listed as not checked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import redis
from confluent_kafka import Producer

from connectors.redis_store import RedisOnlineStore
from engine.definitions import Aggregation, Window
from engine.sessions import session_namespace
from engine.verify import verify_view
from engine.verify_recompute import recompute, same
from tests.backfill_helpers import now_ms, store_of
from tests.conftest import Services
from tests.sessions_helpers import GAP, MIN, make_view
from tests.support import make_runtime, run_views

USERS = 12
PARTITIONS = 3


def _objects() -> tuple[Aggregation, ...]:
    w = Window.sliding("1h")
    return (
        Aggregation(function="first", column="amount", window=w),
        Aggregation(function="last_n", column="amount", n=3, window=w),
        Aggregation(function="count_distinct", column="amount", window=w),
        Aggregation(function="percentile", column="amount", q=0.5, window=w),
        Aggregation(function="top_k", column="amount", k=2, window=w),
    )


def _events(now: int, rng: random.Random) -> list[dict]:
    """Per user, runs of events 1 to 25 minutes apart over the last 3 hours (sessions of a
    10-minute gap form and split); half the users were active in the last few minutes."""
    out = []
    for u in range(USERS):
        t = now - 3 * 60 * MIN
        end = now - (2 * MIN if u % 2 else 40 * MIN)
        while t < end:
            amount = None if rng.random() < 0.1 else float(rng.randint(0, 6))
            out.append({"user_id": f"u{u}", "amount": amount, "ts": t})
            t += rng.choice((1, 2, 3, 9, 10, 11, 25)) * MIN - rng.randint(0, 30_000)
    return out


def _produce(kafka: str, topic: str, events: list[dict], rng: random.Random) -> None:
    # Spread over partitions, out of order by up to 3 minutes (within the 5-minute lateness).
    order = sorted(events, key=lambda e: e["ts"] + rng.randint(0, 3 * MIN))
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5})
    for e in order:
        p.produce(topic, value=json.dumps(e).encode(), partition=rng.randrange(PARTITIONS))
    assert p.flush(30) == 0


def test_session_recomputation_follows_the_documented_rules() -> None:
    view = make_view("t")
    current = next(a for a in view.aggregations if a.window.kind == "session" and a.function == "count")
    last = next(a for a in view.aggregations if a.window.which == "last" and a.function == "count")
    dur = next(a for a in view.aggregations if a.window.which == "last" and a.function == "duration")
    ts = np.array([0, 5 * MIN, 5 * MIN + GAP, 5 * MIN + 2 * GAP - 1], dtype=np.int64)  # gap exactly: split
    assert recompute(view, current, ts, None, ts[-1]) == 2
    assert recompute(view, last, ts, None, ts[-1]) == 2 and recompute(view, dur, ts, None, ts[-1]) == 300.0
    assert recompute(view, current, ts, None, ts[-1] + GAP) == 0  # closed at newest + gap
    assert recompute(view, last, ts, None, ts[-1] + GAP) == 2
    assert recompute(view, dur, ts, None, ts[-1] + GAP) == (GAP - 1) / 1000
    assert recompute(view, last, ts, None, 5 * MIN) == 0  # as of then: nothing closed yet
    assert same("last_n", [3.0, 1.0], np.array([3.0, 1.0])) and not same("last_n", [3.0], [3.0, 1.0])


def test_verify_sessions_and_object_aggregations(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=PARTITIONS)
    view = make_view(name, extra=_objects())
    rng = random.Random(11)
    events = _events(now_ms(), rng)
    _produce(services.kafka, name, events, rng)
    runtime = make_runtime(services.kafka, services.redis_url, tmp_path, "verify-sess")
    run_views([view], runtime)

    store = store_of(view, runtime)
    report = verify_view(store, view, services.kafka, sample=USERS, seed=3)
    bad = {k: c.examples for k, c in report.checks.items() if c.mismatched}
    assert report.mismatches == 0, bad
    assert sorted(report.not_checked) == ["amount_p50_1h", "amount_top_2_1h"]
    assert report.sampled == USERS and report.unsettled == 0
    assert all(c.compared == USERS for c in report.checks.values())
    session_features = [a.feature_name for a in view.aggregations if a.window.kind == "session"]
    assert set(session_features) <= set(report.checks)
    # Not vacuous: some users have a current session and every user a closed one.
    values = store.get_online_features(
        [f"{view.name}:{f}" for f in session_features], [f"u{u}" for u in range(USERS)]
    )
    counts = {f: values.values[f"{view.name}:{f}"] for f in session_features if f.startswith("events_count")}
    assert any(all(v > 0 for v in vals) for vals in counts.values())
    assert any(0 < sum(v > 0 for v in vals) < USERS for vals in counts.values())

    # A damaged session value is found: one user's session key lost.
    ns = session_namespace(RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version))
    redis.Redis.from_url(services.redis_url).delete(ns + "u0")
    damaged = verify_view(store, view, services.kafka, sample=USERS, seed=3)
    wrong = {k for k, c in damaged.checks.items() if c.mismatched}
    assert wrong and wrong <= set(session_features), wrong
