"""Counting a text column end to end: nulls are not counted, strings are stored offline as text."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from featurestream.client import FeatureStore
from tests.support import produce, run_views

T0 = 1_700_000_000_000


def test_count_of_a_nullable_text_column(services, topic, runtime: RuntimeConfig) -> None:
    name = topic(partitions=2)
    view = FeatureView(
        name="notes",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="notes",
            topic=name,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="note", dtype="str", nullable=True)),
        ),
        aggregations=(
            Aggregation(function="count", column="note", window="1h"),
            Aggregation(function="count", window="1h"),
        ),
    )
    events = [
        {"user_id": f"u{i % 3}", "note": None if i % 4 == 0 else f"n{i}", "ts": T0 + i * 1000}
        for i in range(40)
    ]
    produce(services.kafka, name, events, key_field="user_id")
    run_views([view], runtime)
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    at = datetime.fromtimestamp((T0 + 40_000) / 1000, UTC)
    users = ["u0", "u1", "u2"]
    online = store.get_online_features(["notes"], users, as_of=at)
    expected_notes = [sum(1 for e in events if e["user_id"] == u and e["note"] is not None) for u in users]
    expected_events = [sum(1 for e in events if e["user_id"] == u) for u in users]
    assert online.values["notes:note_count_1h"] == expected_notes
    assert online.values["notes:events_count_1h"] == expected_events
    entity_df = pa.table({"user_id": users, "event_timestamp": pa.array([at] * 3, pa.timestamp("ms", "UTC"))})
    offline = store.get_training_set(entity_df, ["notes"])
    assert offline.column("notes:note_count_1h").to_pylist() == expected_notes
    stored = store.offline.read(store.offline.table_uri(view.name, view.version))
    assert stored.schema.field("note").type == pa.string()
    assert sorted(v for v in stored.column("note").to_pylist() if v) == sorted(
        e["note"] for e in events if e["note"]
    )
