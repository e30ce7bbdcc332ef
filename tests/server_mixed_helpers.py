"""Shared by the server tests of session windows and object aggregations: the views, their
events (relative to now: the server reads as of now), a pipeline run into Redis, a served
`featurestream serve` and the Python client over the same store, and the comparison of an HTTP
answer with ``FeatureStore.get_online_features``."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine.definitions import Aggregation, Derived, Entity, EventSource, FeatureView, Field, Window
from featurestream.client import FeatureStore
from tests.conftest import Services
from tests.server_helpers import Server, serve, server_env
from tests.sessions_helpers import session_aggregations
from tests.support import create_topic, make_runtime, produce, run_views, unique

MIN = 60_000
ARROW = {"Accept": "application/vnd.apache.arrow.stream"}
USERS = ["u1", "u2", "u3", "u4", "u5"]  # live; idle 3 days (past the TTL); never seen; idle 40 min; nulls

PIPELINE = """
from tests.server_mixed_helpers import {builder}

views = [{builder}({topic!r})]
"""


def session_view(topic: str) -> FeatureView:
    """Every session function (current and last, 10-minute gap), a tile window beside them, and
    derived features reading session features (one also a tile one)."""
    current = Window.session("10m")
    return FeatureView(
        name="visits",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="visits",
            topic=topic,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float", nullable=True)),
        ),
        aggregations=(
            *session_aggregations(),
            Aggregation(function="sum", column="amount", window=current, name="cur_sum"),
            Aggregation(function="count", window=current, name="cur_count"),
            Aggregation(function="count", window="1h", name="hour_count"),
        ),
        derived=(
            Derived(name="cur_avg", expression="cur_sum / cur_count"),
            Derived(name="cur_share", expression="cur_count / hour_count"),
        ),
        tile_size="1m",
        allowed_lateness="7d",
        ttl="2h",
    )


def object_view(topic: str) -> FeatureView:
    """Every object aggregation over an hour and over 10 minutes (empty for an entity idle 40
    minutes: empty lists), numeric ones beside them, and a derived feature reading object ones."""
    aggs: list[Aggregation] = []
    for w, tag in (("1h", "h"), ("10m", "r")):
        aggs += [
            Aggregation(function="first", column="m", window=w, name=f"m_first_{tag}"),
            Aggregation(function="last", column="m", window=w, name=f"m_last_{tag}"),
            Aggregation(function="first", column="x", window=w, name=f"x_first_{tag}"),
            Aggregation(function="last_n", column="m", n=3, window=w, name=f"m_last3_{tag}"),
            Aggregation(function="last_n", column="x", n=2, window=w, name=f"x_last2_{tag}"),
            Aggregation(function="count_distinct", column="m", window=w, name=f"m_distinct_{tag}"),
            Aggregation(function="percentile", column="x", q=0.5, window=w, name=f"x_p50_{tag}"),
            Aggregation(function="top_k", column="m", k=2, window=w, name=f"m_top2_{tag}"),
            Aggregation(function="sum", column="x", window=w, name=f"x_sum_{tag}"),
            Aggregation(function="count", window=w, name=f"n_{tag}"),
        ]
    return FeatureView(
        name="picks",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="picks",
            topic=topic,
            timestamp_field="ts",
            fields=(
                Field(name="user_id", dtype="str"),
                Field(name="x", dtype="float", nullable=True),
                Field(name="m", dtype="str", nullable=True),
            ),
        ),
        aggregations=tuple(aggs),
        derived=(Derived(name="distinct_share", expression="m_distinct_h / n_h"),),
        tile_size="1m",
        allowed_lateness="7d",
        ttl="2h",
    )


def session_events(now: int) -> list[dict[str, Any]]:
    """u1: a closed session (-32..-21 min), then the current one (-6, -2, with a null amount);
    u2: 3 days ago; u4: a session ending 40 minutes ago; u5: only null amounts, now."""
    ev = [
        ("u2", 7.0, -3 * 24 * 60),
        ("u4", 3.0, -47),
        ("u4", 4.5, -40),
        ("u1", 5.0, -32),
        ("u1", 1.25, -25),
        ("u1", -2.0, -21),
        ("u5", None, -8),
        ("u1", 10.0, -6),
        ("u5", None, -3),
        ("u1", None, -2),
        ("u1", 0.5, -2),
    ]
    return [{"user_id": u, "amount": a, "ts": now + m * MIN} for u, a, m in ev]


def object_events(now: int) -> list[dict[str, Any]]:
    """Unicode and empty text, ties, repeats and nulls; u4 idle 40 minutes; u5 only nulls."""
    ev = [
        ("u2", 1.0, "old", -3 * 24 * 60),
        ("u4", 2.0, "日本語", -50),
        ("u4", -1.5, "🙂", -40),
        ("u1", 3.0, "é", -45),
        ("u1", None, "", -30),
        ("u1", 7.5, "é", -20),
        ("u5", None, None, -9),
        ("u1", 0.0, None, -8),
        ("u1", -0.0, "a b", -5),
        ("u1", 7.5, "é", -5),
        ("u1", 1e6, "x" * 300, -1),
    ]
    return [{"user_id": u, "x": x, "m": m, "ts": now + mins * MIN} for u, x, m, mins in ev]


@dataclass
class World:
    server: Server
    store: FeatureStore
    view: FeatureView
    now_ms: int


@contextmanager
def world(services: Services, tmp: Path, builder: str, events: Any) -> Iterator[World]:
    """Events produced out of order over 3 partitions, one pipeline run into Redis, then a server
    and a client."""
    topic = create_topic(services.kafka, unique(builder), 3)
    now = int(time.time() * 1000)
    sent = events(now)
    random.Random(7).shuffle(sent)  # out of event-time order (within the allowed lateness)
    produce(services.kafka, topic, sent, key_field="user_id")
    view = globals()[builder](topic)
    runtime = make_runtime(services.kafka, services.redis_url, tmp, builder[:4])
    run_views([view], runtime)
    pipeline = tmp / "pipeline.py"
    pipeline.write_text(PIPELINE.format(builder=builder, topic=topic))
    env = server_env(
        services.kafka, services.redis_url, runtime.redis_prefix, f"sqlite:///{tmp / 'r.db'}", tmp / "state"
    )
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    with serve(pipeline, env, tmp / "server.log", "--no-auth") as server:
        yield World(server, store, view, now)


def same_minute(fetch: Any) -> Any:
    """Run ``fetch()`` until the read and the reference time fall in the same 1-minute tile."""
    for _ in range(5):
        at = datetime.now(UTC)
        got = fetch()
        if int(time.time() // 60) == int(at.timestamp() // 60):
            return got, at
    raise AssertionError("could not read within one tile")


def rfc3339(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def online(w: World, features: list[str], users: list[str], arrow: bool = False) -> tuple[Any, Any]:
    """(HTTP answer, the client's values as of the same tile) for ``features`` of ``users``."""
    body = {"features": features, "entities": {"user_id": users}}
    headers = ARROW if arrow else None
    resp, at = same_minute(lambda: w.server.post("/features/online", json=body, headers=headers))
    assert resp.status_code == 200, resp.text
    return resp, w.store.get_online_features(features, users, as_of=at)


def assert_json_equals_client(w: World, users: list[str]) -> dict[str, dict[str, list[Any]]]:
    """The bare-view JSON answer equals the client's values and event times, feature by feature;
    returns the answer's columns by feature name."""
    name = w.view.name
    resp, expected = online(w, [name], users)
    names = resp.json()["metadata"]["feature_names"]
    assert names == ["user_id", *[f.feature_name for f in w.view.features]]
    cols = dict(zip(names, resp.json()["results"], strict=True))
    for feat in names[1:]:
        assert cols[feat]["values"] == expected.values[f"{name}:{feat}"], feat
        assert cols[feat]["event_timestamps"] == [
            rfc3339(t) for t in expected.event_times[f"{name}:{feat}"]
        ], feat
    return cols


def assert_arrow_equals_client(w: World, users: list[str]) -> pa.Table:
    name = w.view.name
    resp, expected = online(w, [name], users, arrow=True)
    table = pa.ipc.open_stream(resp.content).read_all()
    for f in w.view.features:
        feat = f.feature_name
        assert table.column(feat).to_pylist() == expected.values[f"{name}:{feat}"], feat
        times = table.column(f"{feat}__event_timestamp").to_pylist()
        assert times == expected.event_times[f"{name}:{feat}"], feat
    return table
