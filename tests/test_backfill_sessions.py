"""A finished backfill hands its session state over: the worker of its version continues each
entity's sessions (a session open at the backfill's end is extended, not restarted), so session
features equal a recomputation from the raw events after the worker's run."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

from confluent_kafka import Producer

from engine.backfill import parse_position, run_backfill
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.handoff import HANDOFF_FILE
from engine.sessions import SessionState
from engine.verify import verify_view
from tests.backfill_helpers import now_ms, store_of
from tests.conftest import Services
from tests.sessions_helpers import MIN, make_view

USERS = [f"u{i}" for i in range(10)]
PARTITIONS = 3


def _produce(kafka: str, topic: str, events: list[dict], rng: random.Random) -> None:
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5})
    for e in sorted(events, key=lambda e: e["ts"]):
        p.produce(topic, value=json.dumps(e).encode(), partition=rng.randrange(PARTITIONS))
    assert p.flush(30) == 0


def _events(rng: random.Random, start: dict[str, int], end: int) -> list[dict]:
    """Per user, events 1 to 4 minutes apart (one session per user at a 10-minute gap) from
    ``start[user]`` until ``end``."""
    out = []
    for u in USERS:
        t = start[u]
        while t < end:
            out.append({"user_id": u, "amount": float(rng.randint(1, 9)), "ts": t})
            t += rng.randint(1, 4) * MIN
    return out


def test_worker_continues_the_backfills_sessions(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=PARTITIONS)
    view = make_view(name)
    runtime = runtime.model_copy(update={"backfill_dir": str(tmp_path / "backfills")})
    rng = random.Random(21)
    now = now_ms()
    before = _events(rng, {u: now - 60 * MIN for u in USERS}, now - 25 * MIN)
    _produce(services.kafka, name, before, rng)
    result = run_backfill(view, runtime, tmp_path / "backfills", parse_position("earliest", "--from"))
    with open(result.directory / HANDOFF_FILE, "rb") as f:
        seed = pickle.load(f)
    assert seed.sessions and all(isinstance(s, SessionState) for s in seed.sessions.values())

    # New events continue every user's open session (each starts within the gap of its last).
    last = {u: max(e["ts"] for e in before if e["user_id"] == u) for u in USERS}
    after = _events(rng, {u: last[u] + 3 * MIN for u in USERS}, now - MIN)
    _produce(services.kafka, name, after, rng)
    run_dataflow(build_dataflow([view], runtime.model_copy(update={"stop_at_end": True})))

    report = verify_view(store_of(view, runtime), view, services.kafka, sample=len(USERS), seed=1)
    bad = {k: c.examples for k, c in report.checks.items() if c.mismatched}
    assert report.mismatches == 0 and report.not_checked == [], bad
    assert all(c.compared == len(USERS) for c in report.checks.values())
    # Not vacuous: each user's current session spans the handoff.
    values = store_of(view, runtime).get_online_features([f"{view.name}:events_count_session_10m"], USERS)
    counts = values.values[f"{view.name}:events_count_session_10m"]
    for u, n in zip(USERS, counts, strict=True):
        assert n == sum(e["user_id"] == u for e in before + after), u
