"""Long windows over HTTP (engine.levels: 30 and 90 days read from 1-hour and 1-day tiles) equal
the Python client's and a count by hand, from a real pipeline run into Redis: for an entity with
95 days of history, one idle for 50 days (its short windows are empty but it is live), one whose
events are all older than the view's TTL, and one never seen; in JSON and Arrow."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from featurestream import Aggregation, Entity, EventSource, FeatureView, Field, Window
from featurestream.client import FeatureStore
from tests.conftest import Services
from tests.server_helpers import serve, server_env
from tests.server_mixed_helpers import World, assert_arrow_equals_client, assert_json_equals_client
from tests.support import create_topic, make_runtime, produce, run_views, unique

HOUR, DAY = 3_600_000, 86_400_000
USERS = ["u1", "u2", "u3", "u4"]  # 95 days of history; idle 50 days; never seen; only > 91 days ago
PIPELINE = """
from tests.test_server_long_windows import long_view

views = [long_view({topic!r})]
"""


def long_view(topic: str) -> FeatureView:
    windows = (Window.sliding("1h"), Window.sliding("30d"), Window.sliding("90d"), Window.tumbling("14d"))
    return FeatureView(
        name="longpay",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="pay",
            topic=topic,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float", nullable=True)),
        ),
        aggregations=tuple(
            Aggregation(function=f, column=None if f == "count" else "amount", window=w)
            for w in windows
            for f in ("count", "sum", "max", "last")
        ),
    )


def long_events(now: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    out = [{"user_id": "u1", "amount": float(i % 13), "ts": now - i * 7 * HOUR - 5_000} for i in range(330)]
    out += [{"user_id": "u1", "amount": None, "ts": now - 2 * HOUR}]
    out += [{"user_id": "u2", "amount": float(i), "ts": now - 50 * DAY - i * DAY} for i in range(20)]
    out += [{"user_id": "u4", "amount": 1.0, "ts": now - 92 * DAY - i * HOUR} for i in range(5)]
    out.sort(key=lambda e: e["ts"] + rng.randrange(0, 120_000))  # out of order within lateness (5m)
    return out


@pytest.fixture(scope="module")
def long_world(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("long")
    topic = create_topic(services.kafka, unique("long"), 3)
    now = int(time.time() * 1000)
    events = long_events(now)
    produce(services.kafka, topic, events, key_field="user_id")
    view = long_view(topic)
    runtime = make_runtime(services.kafka, services.redis_url, tmp, "long")
    run_views([view], runtime)
    pipeline = tmp / "pipeline.py"
    pipeline.write_text(PIPELINE.format(topic=topic))
    env = server_env(
        services.kafka, services.redis_url, runtime.redis_prefix, f"sqlite:///{tmp / 'r.db'}", tmp / "state"
    )
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    with serve(pipeline, env, tmp / "server.log", "--no-auth") as server:
        world = World(server, store, view, now)
        world.events = events  # type: ignore[attr-defined]
        yield world


def test_json_equals_the_client_and_a_count_by_hand(long_world: World) -> None:
    assert long_world.view.tile_levels_ms == (60_000, HOUR, DAY)
    cols = assert_json_equals_client(long_world, USERS)
    now = int(time.time() * 1000)
    start = ((now - 90 * DAY) // DAY + 1) * DAY  # the 90-day window's start moves in 1-day steps
    events = long_world.events  # type: ignore[attr-defined]
    for i, u in enumerate(("u1", "u2")):
        want = sum(e["user_id"] == u and start <= e["ts"] <= now for e in events)
        assert cols["events_count_90d"]["values"][i] == want > 0, u
    assert cols["events_count_30d"]["values"][1] == 0  # u2: idle 50 days, yet live
    assert cols["events_count_30d"]["statuses"][:3] == ["PRESENT", "PRESENT", "NOT_FOUND"]
    assert cols["amount_max_1h"]["statuses"][1] == "NULL_VALUE"
    assert cols["events_count_90d"]["statuses"][3] == "OUTSIDE_MAX_AGE"  # newest event 92 days ago


def test_arrow_equals_the_client(long_world: World) -> None:
    table = assert_arrow_equals_client(long_world, USERS)
    assert table.num_rows == len(USERS)
