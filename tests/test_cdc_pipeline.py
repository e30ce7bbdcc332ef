"""End to end: Debezium change events on a multi-partition topic through a real dataflow run to
Redis (current table features) and Delta (the change log, point-in-time training sets)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import redis
from confluent_kafka import Producer
from deltalake import DeltaTable

from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from featurestream.client import FeatureStore
from registry.core import Registry
from registry.versions import apply, get_version, plan
from tests.cdc_helpers import EMPTY, envelope, key, oracle, order_view, orders_view
from tests.conftest import Services
from tests.support import headers, read_topic, run_views

BASE = 1_700_000_000_000
CUSTOMERS = [f"cust_{i}" for i in range(6)]


def history(seed: int = 7) -> list[dict[str, Any]]:
    """Snapshot reads of 20 orders, then 200 inserts, updates (some moving an order to another
    customer) and deletes, in log order: lsn and event time increase."""
    rng = random.Random(seed)
    rows: dict[int, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    lsn, ts = 1000, BASE
    next_id = 1

    def row(pk: int) -> dict[str, Any]:
        return {
            "id": pk,
            "customer_id": rng.choice([*CUSTOMERS, None]) if rng.random() < 0.1 else rng.choice(CUSTOMERS),
            "amount": rng.choice([None, *(x * 0.5 for x in range(1, 200))]),
            "status": rng.choice(["open", "paid", "shipped", None]),
        }

    for _ in range(20):
        lsn += 8
        rows[next_id] = row(next_id)
        out.append({"op": "r", "pk": next_id, "before": None, "after": rows[next_id], "lsn": lsn, "ts": ts})
        next_id += 1
    for _ in range(200):
        lsn += rng.randint(1, 50)
        ts += rng.randint(0, 60_000)
        kind = rng.random()
        if kind < 0.35 or not rows:
            rows[next_id] = row(next_id)
            after = rows[next_id]
            out.append({"op": "c", "pk": next_id, "before": None, "after": after, "lsn": lsn, "ts": ts})
            next_id += 1
        elif kind < 0.8:
            pk = rng.choice(sorted(rows))
            new = row(pk) if rng.random() < 0.3 else {**rows[pk], "amount": rng.choice([None, 1.5, 99.0])}
            out.append({"op": "u", "pk": pk, "before": rows[pk], "after": new, "lsn": lsn, "ts": ts})
            rows[pk] = new
        else:
            pk = rng.choice(sorted(rows))
            out.append({"op": "d", "pk": pk, "before": rows.pop(pk), "after": None, "lsn": lsn, "ts": ts})
    return out


def table_at(changes: list[dict[str, Any]], t: int) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for c in sorted(changes, key=lambda c: c["lsn"]):
        if c["ts"] > t:
            continue
        if c["op"] == "d":
            rows.pop(c["pk"], None)
        else:
            rows[c["pk"]] = c["after"]
    return rows


def publish(
    kafka: str,
    topic: str,
    changes: list[dict[str, Any]],
    bad: list[tuple[bytes, bytes]],
    redeliver: float = 0.1,
) -> None:
    """Keyed by primary key, one key's changes in one partition (as Debezium): both envelope
    styles, a tombstone after each delete, redeliveries of earlier changes, and bad messages."""
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "acks": "all"})
    rng = random.Random(3)
    for i, c in enumerate(changes):
        wrapped = i % 2 == 1
        value = envelope(c["op"], c["before"], c["after"], c["ts"], c["lsn"], wrapped=wrapped)
        part = c["pk"] % 3
        p.produce(topic, key=key(c["pk"], wrapped), value=value, partition=part)
        if c["op"] == "d":
            p.produce(topic, key=key(c["pk"]), value=None, partition=part)  # tombstone
        if rng.random() < redeliver:  # a redelivery of an earlier change of this partition's keys
            old = rng.choice([o for o in changes[: i + 1] if o["pk"] % 3 == part])
            again = envelope(old["op"], old["before"], old["after"], old["ts"], old["lsn"])
            p.produce(topic, key=key(old["pk"]), value=again, partition=part)
    for k, v in bad:
        p.produce(topic, key=k, value=v, partition=0)
    assert p.flush(30) == 0


BAD = [
    (key(1), b'{"op": "x", "after": null, "ts_ms": 1}'),
    (key(2), b"{broken"),
    (b'{"other": 1}', b'{"op": "c", "after": {"id": 2}, "ts_ms": 1}'),
]


def store_for(runtime: RuntimeConfig, *views: Any) -> FeatureStore:
    return FeatureStore(
        views, redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )


def online(store: FeatureStore) -> dict[str, dict[str, Any]]:
    got = store.get_online_features(["customer_orders"], CUSTOMERS).values
    return {
        c: {name.split(":", 1)[1]: vals[i] for name, vals in got.items()} for i, c in enumerate(CUSTOMERS)
    }


def test_cdc_topic_to_redis_and_point_in_time_training_sets(
    services: Services, topic: Callable[..., str], runtime: RuntimeConfig, redis_client: redis.Redis
) -> None:
    name = topic(3, prefix="dbserver1.public.orders")
    changes = history()
    publish(services.kafka, name, changes, BAD)
    views = [orders_view(name), order_view(name)]
    run_views(views, runtime, workers=2)

    store = store_for(runtime, *views)
    final = table_at(changes, 2**62)
    want = oracle(final)
    assert online(store) == {c: want.get(c, EMPTY) for c in CUSTOMERS}
    pks = sorted({c["pk"] for c in changes})
    latest = store.get_online_features(["order_latest"], [{"id": pk} for pk in pks]).values
    assert latest["order_latest:status"] == [final[pk]["status"] if pk in final else None for pk in pks]
    assert latest["order_latest:amount"] == [final[pk]["amount"] if pk in final else None for pk in pks]

    # training set: the table as it was at several times, per customer
    end = changes[-1]["ts"]
    times = [BASE - 1, BASE, BASE + (end - BASE) // 3, BASE + (end - BASE) // 2, end - 1, end + 1]
    entity_df = pa.table(
        {
            "customer_id": [c for _ in times for c in CUSTOMERS],
            "event_timestamp": pa.array(
                [datetime.fromtimestamp(t / 1000, UTC) for t in times for _ in CUSTOMERS],
                pa.timestamp("ms", "UTC"),
            ),
        }
    )
    training = store.get_training_set(entity_df, ["customer_orders"]).to_pylist()
    i = 0
    for t in times:
        want_t = oracle(table_at(changes, t))
        for c in CUSTOMERS:
            got = {k.split(":", 1)[1]: v for k, v in training[i].items() if k.startswith("customer_orders:")}
            assert got == want_t.get(c, EMPTY), (t, c)
            i += 1

    # malformed envelopes went to the dead-letter topic, the flow kept running
    letters = read_topic(services.kafka, f"{name}.dlq")
    assert sorted(headers(m)["fs-reason"] for m in letters) == sorted(
        ["invalid_value", "malformed_json", "missing_field"] * 2  # once per view
    )

    # a restart replaying the whole topic changes nothing
    log_uri = store.offline.table_uri(views[0].name, views[0].version)
    stored = DeltaTable(log_uri).to_pyarrow_table()
    assert stored.num_rows == _accepted(services.kafka, name)  # every change, once
    before = online(store)
    run_views(views, runtime, workers=1)
    assert online(store) == before
    assert DeltaTable(log_uri).to_pyarrow_table().num_rows == stored.num_rows

    # an online store that lost its data is rebuilt
    ns = store.online.namespace(views[0].name, views[0].version)
    for k in redis_client.scan_iter(match=ns[:-1] + "*"):
        redis_client.delete(k)
    assert online(store) == {c: EMPTY for c in CUSTOMERS}
    run_views(views, runtime, workers=2)
    assert online(store) == before


def _accepted(kafka: str, topic: str) -> int:
    """Messages that are changes (not tombstones, not dead letters)."""
    return sum(1 for m in read_topic(kafka, topic) if m.value()) - len(BAD)


def test_registry_plans_and_applies_table_views(tmp_path: Any) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    view = orders_view()
    assert [c.kind for c in plan(registry, [view])] == ["new"]
    apply(registry, [view])
    stored = get_version(registry, view.name)
    assert stored.view() == view and stored.version_hash == view.version
    edited = view.model_copy(update={"description": "open orders per customer"})
    assert [c.kind for c in plan(registry, [edited])] == ["metadata"]
    fewer = view.model_copy(update={"features": view.features[:3]})
    (change,) = plan(registry, [fewer])
    assert change.kind == "breaking" and change.reasons
    apply(registry, [fewer])
    assert get_version(registry, view.name).seq == 2


def test_windowed_features_over_changes(
    services: Services, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    """'Orders created in the last day' through the window engine: only op c counts, the row
    image's fields are the event's, source.ts_ms its time."""
    name = topic(3, prefix="dbserver1.public.orders")
    created = EventSource(
        name="orders_created",
        topic=name,
        format="debezium-json",
        ops=("c",),
        timestamp_field="ts",
        fields=(
            Field(name="customer_id", dtype="str"),
            Field(name="amount", dtype="float", nullable=True),
            Field(name="op", dtype="str"),
        ),
    )
    view = FeatureView(
        name="orders_created_1d",
        entity=Entity(name="customer", join_keys=("customer_id",)),
        source=created,
        aggregations=(
            Aggregation(function="count", window="1d"),
            Aggregation(function="sum", column="amount", window="1d"),
            Aggregation(function="count", column="op", window="1d", name="ops_1d"),
        ),
        tile_size="1m",
        allowed_lateness="1h",
    )
    rng = random.Random(11)
    day = 86_400_000
    now = BASE + 10 * day
    changes = []
    for i in range(150):
        ts = now - 3 * day + i * 60_000 if i < 30 else now - 2 * 3_600_000 + i * 30_000
        row = {"id": i, "customer_id": rng.choice(CUSTOMERS[:3]), "amount": float(i), "status": "open"}
        changes.append({"op": "c", "pk": i, "before": None, "after": row, "lsn": 10 + i, "ts": ts})
        if i % 5 == 0:  # updates and deletes are not creations
            op = "u" if i % 10 else "d"
            after = None if op == "d" else {**row, "amount": 1.0}
            changes.append({"op": op, "pk": i, "before": row, "after": after, "lsn": 10 + i, "ts": ts})
    # no redeliveries: as events, a redelivered change counts again (see the README)
    publish(services.kafka, name, changes, [(key(1), b'{"op": "c", "ts_ms": 1}')], redeliver=0)
    run_views([view], runtime)

    store = store_for(runtime, view)
    at = max(c["ts"] for c in changes) + 60_000
    got = store.get_online_features(
        ["orders_created_1d"], CUSTOMERS[:3], as_of=datetime.fromtimestamp(at / 1000, UTC)
    )
    for i, cust in enumerate(CUSTOMERS[:3]):
        mine = [
            c for c in changes if c["op"] == "c" and c["after"]["customer_id"] == cust and c["ts"] > at - day
        ]
        assert got.values["orders_created_1d:events_count_1d"][i] == len(mine)
        assert got.values["orders_created_1d:ops_1d"][i] == len(mine)
        assert got.values["orders_created_1d:amount_sum_1d"][i] == sum(c["after"]["amount"] for c in mine)
    letters = read_topic(services.kafka, f"{name}.dlq")
    assert [headers(m)["fs-reason"] for m in letters] == ["missing_field"]  # the c without after
    entity_df = pa.table(
        {
            "customer_id": CUSTOMERS[:3],
            "event_timestamp": pa.array(
                [datetime.fromtimestamp(at / 1000, UTC)] * 3, pa.timestamp("ms", "UTC")
            ),
        }
    )
    training = store.get_training_set(entity_df, ["orders_created_1d"])
    for feature, values in got.values.items():
        assert training.column(feature).to_pylist() == values


def test_recovery_resumes_table_state(
    services: Services, topic: Callable[..., str], runtime: RuntimeConfig, tmp_path: Any
) -> None:
    """With a recovery dir, a second run resumes the row guards and entity rows from the
    snapshot and reads only the new changes, and still ends at the recomputed table."""
    name = topic(3, prefix="dbserver1.public.orders")
    changes = history(seed=21)
    half = len(changes) // 2
    views = [orders_view(name)]
    flow_runtime = runtime.model_copy(update={"stop_at_end": True})
    publish(services.kafka, name, changes[:half], [], redeliver=0)
    run_dataflow(build_dataflow(views, flow_runtime), 2, recovery_dir=tmp_path / "rec", snapshot_seconds=0.2)
    store = store_for(runtime, *views)
    first = oracle(table_at(changes[:half], 2**62))
    assert online(store) == {c: first.get(c, EMPTY) for c in CUSTOMERS}  # the first run
    uri = store.offline.table_uri(views[0].name, views[0].version)
    shutil.rmtree(uri)  # a resumed run stores only what it reads from now on
    publish(services.kafka, name, changes[half:], [], redeliver=0)
    run_dataflow(build_dataflow(views, flow_runtime), 2, recovery_dir=tmp_path / "rec", snapshot_seconds=0.2)
    assert DeltaTable(uri).to_pyarrow_table().num_rows == len(changes) - half
    want = oracle(table_at(changes, 2**62))
    assert online(store) == {c: want.get(c, EMPTY) for c in CUSTOMERS}
