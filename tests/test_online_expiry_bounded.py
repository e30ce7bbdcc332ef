"""A bounded run that ends right after its events reach entities whose online keys expired
(their TTL ran out in wall-clock time while event time lagged, as in a replay) leaves every such
entity whole online: the worker's state knows the entity was idle for most of the TTL and
rewrites it instead of appending, so no refused append is left for a rewrite that never comes."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
from confluent_kafka import Producer

from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field
from featurestream.client import FeatureStore
from tests.conftest import Services

T0 = 1_700_000_000_000
USERS = [f"u{i}" for i in range(6)]
PARTITIONS = 3


def _view(topic: str) -> FeatureView:
    aggs = (
        Aggregation(function="count", window="4s"),
        Aggregation(function="sum", column="amount", window="4s"),
    )
    return FeatureView(
        name="brief",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="pay",
            topic=topic,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float")),
        ),
        aggregations=aggs,
        tile_size="1s",
        allowed_lateness="1m",
        ttl="4s",  # online keys expire 4 s (wall clock) after an entity's last write
    )


def _produce(kafka: str, topic: str, events: list[dict]) -> None:
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5})
    for i, e in enumerate(events):
        p.produce(topic, value=json.dumps(e).encode(), partition=i % PARTITIONS)
    assert p.flush(30) == 0


def test_bounded_run_rewrites_entities_idle_past_their_ttl(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=PARTITIONS)
    view = _view(name)
    recovery = tmp_path / "recovery"
    # Event time: 3 s of events per user (tiles 0-2), every user on every partition.
    first = [{"user_id": u, "amount": float(i), "ts": T0 + i * 250} for i in range(12) for u in USERS]
    _produce(services.kafka, name, first)
    run_dataflow(build_dataflow([view], runtime), recovery_dir=recovery, snapshot_seconds=0.2)
    client = redis.Redis.from_url(services.redis_url)
    ns = RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version)
    assert all(client.exists(ns + u) for u in USERS)
    time.sleep(4.5)  # wall clock passes the TTL: the keys expire by themselves
    assert not any(client.exists(ns + u) for u in USERS)
    # The replay goes on: one more event per user at 3.0 s, inside the 4 s window of the others.
    more = [{"user_id": u, "amount": 100.0, "ts": T0 + 3000} for u in USERS]
    _produce(services.kafka, name, more)
    run_dataflow(build_dataflow([view], runtime), recovery_dir=recovery, snapshot_seconds=0.2)
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    at = datetime.fromtimestamp((T0 + 3000) / 1000, UTC)
    got = store.get_online_features(["brief"], USERS, as_of=at).values
    for i, u in enumerate(USERS):
        mine = [e for e in first + more if e["user_id"] == u]
        assert got["brief:events_count_4s"][i] == len(mine) == 13, (u, got)
        assert got["brief:amount_sum_4s"][i] == sum(e["amount"] for e in mine), (u, got)
    assert not client.smembers(RedisOnlineStore.lost_key(ns))  # nothing left waiting for a rewrite
