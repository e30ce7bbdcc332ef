"""Lineage end to end, on SQLite and PostgreSQL: topic -> view version -> training set -> model,
and exact reproduction of a training set after the offline store has grown."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from featurestream.client import TRAINING_SET_ID, FeatureStore
from registry import lineage, versions
from registry.core import Registry, RegistryError
from registry.schema import training_sets
from tests.conftest import Services
from tests.registry_fixtures import *  # noqa: F403
from tests.support import produce, run_views

T0 = 1_700_000_000_000
USERS = ["u0", "u1", "u2", "u3"]


def _view(topic: str) -> FeatureView:
    return FeatureView(
        name="clicks",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="clicks",
            topic=topic,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="value", dtype="float")),
        ),
        aggregations=(
            Aggregation(function="count", window="1h"),
            Aggregation(function="sum", column="value", window="1h"),
        ),
    )


def _events(first: int, n: int) -> list[dict]:
    return [
        {"user_id": USERS[i % 4], "value": float(i), "ts": T0 + i * 1000} for i in range(first, first + n)
    ]


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _entity_df() -> pa.Table:
    times = [_at(T0 + 20_500)] * 4 + [_at(T0 + 100_500)] * 4
    return pa.table({"user_id": USERS * 2, "event_timestamp": pa.array(times, pa.timestamp("ms", "UTC"))})


def _store(runtime: RuntimeConfig, views: list[FeatureView], delta_uri: str | None = None) -> FeatureStore:
    return FeatureStore(
        views,
        redis_url=runtime.redis_url,
        delta_uri=delta_uri or runtime.delta_uri,
        redis_prefix=runtime.redis_prefix,
    )


def _cli(registry: Registry, services: Services, runtime: RuntimeConfig, tmp: Path, *args: str):
    env = {
        **os.environ,
        "FEATURESTREAM_REGISTRY_URL": registry.url,
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": services.kafka,
        "FEATURESTREAM_REDIS_URL": services.redis_url,
        "FEATURESTREAM_DELTA_URI": runtime.delta_uri,
        "FEATURESTREAM_STATE_DIR": str(tmp / "state"),
        "COLUMNS": "200",
    }
    cmd = [sys.executable, "-m", "featurestream.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=tmp)


def test_model_lineage_and_exact_reproduction(
    services: Services, topic, runtime: RuntimeConfig, registry: Registry, tmp_path: Path
) -> None:
    name = topic(partitions=2)
    view = _view(name)
    produce(services.kafka, name, _events(0, 40), key_field="user_id")
    run_views([view], runtime)
    versions.apply(registry, [view])
    applied = versions.find_version(registry, "clicks", view.version)
    assert applied is not None
    store = _store(runtime, [view])
    uri = str(Path(store.offline.table_uri("clicks", view.version)).resolve())
    pinned = DeltaTable(uri).version()

    entity_df = _entity_df()
    trained = store.get_training_set(entity_df, ["clicks"], registry=registry, name="clicks-train")
    ts_id = int(trained.schema.metadata[TRAINING_SET_ID])
    # 40 events, 10 per user, all before the late rows (T0 + 100.5 s); values 0..39 by user i % 4.
    assert trained.column("clicks:events_count_1h").to_pylist()[4:] == [10] * 4
    assert trained.column("clicks:value_sum_1h").to_pylist()[4:] == [
        float(sum(range(u, 40, 4))) for u in range(4)
    ]

    record = lineage.get_training_set_record(registry, ts_id)
    assert record.name == "clicks-train"
    assert record.view_version_ids == [applied.id]
    assert record.delta_versions == {uri: pinned}
    assert record.features == ["clicks:events_count_1h", "clicks:value_sum_1h"]
    assert record.timestamp_column == "event_timestamp"
    assert record.entity_rows == 8
    assert record.entity_uri.startswith(str(Path(runtime.delta_uri).resolve()) + "/_training_sets/")
    snapshot = Path(record.entity_uri).read_bytes()
    assert record.entity_sha256 == hashlib.sha256(snapshot).hexdigest()
    assert record.entity_uri.endswith(f"{record.entity_sha256}.parquet")
    assert pq.read_table(record.entity_uri).equals(entity_df)

    model = lineage.register_model(registry, "fraud", "1", ts_id, {"max_depth": 4}, {"auc": 0.91})
    assert lineage.register_model(registry, "fraud", "1", ts_id, {"max_depth": 4}, {"auc": 0.91}) == model
    with pytest.raises(RegistryError, match="different"):
        lineage.register_model(registry, "fraud", "1", ts_id, {"max_depth": 4}, {"auc": 0.95})
    with pytest.raises(RegistryError, match="not in the registry"):
        lineage.register_model(registry, "fraud", "2", ts_id + 99, {}, {})
    assert lineage.models(registry) == [model]
    assert lineage.models(registry, "other") == []

    lin = lineage.model_lineage(registry, "fraud", "1")
    assert lin.model == model
    assert lin.training_set == record
    assert [v.id for v in lin.view_versions] == [applied.id]
    assert lin.view_versions[0].view().version == view.version
    assert lin.source_topics == [name]
    with pytest.raises(RegistryError, match="fraud@9"):
        lineage.model_lineage(registry, "fraud", "9")

    # More events: the Delta table grows, a fresh training set changes, the recorded one does not.
    produce(services.kafka, name, _events(40, 40), key_field="user_id")
    run_views([view], runtime)
    assert DeltaTable(uri).version() > pinned
    fresh = store.get_training_set(entity_df, ["clicks"])
    assert fresh.column("clicks:events_count_1h").to_pylist()[4:] == [20] * 4
    assert not fresh.equals(trained)
    again = store.reproduce_training_set(registry, ts_id)
    assert again.equals(trained)
    assert again.schema.metadata[TRAINING_SET_ID] == str(ts_id).encode()
    # Definitions come from the registry and tables from the recorded URIs, not from this store.
    elsewhere = _store(runtime, [], delta_uri=str(tmp_path / "other-root"))
    assert elsewhere.reproduce_training_set(registry, ts_id).equals(trained)

    view_label, ts_label = applied.label, record.label
    expected = {(name, view_label), (view_label, ts_label), (ts_label, "fraud@1")}
    graph = lineage.lineage_graph(registry, "fraud")
    assert graph.label_edges() == expected
    assert {n.kind for n in graph.nodes.values()} == {"topic", "view_version", "training_set", "model"}
    assert lineage.lineage_graph(registry, "clicks").label_edges() == expected
    with pytest.raises(RegistryError, match="no model or feature view"):
        lineage.lineage_graph(registry, "nothing")

    png = lineage.render_lineage(graph, tmp_path / "img" / "lineage.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000

    out = _cli(
        registry, services, runtime, tmp_path, "lineage", "fraud", "--image", str(tmp_path / "cli.png")
    )
    assert out.returncode == 0, out.stderr
    for text in ("fraud@1", view_label, name, "auc=0.91"):
        assert text in out.stdout
    assert (tmp_path / "cli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = _cli(registry, services, runtime, tmp_path, "models")
    assert listed.returncode == 0, listed.stderr
    assert "fraud" in listed.stdout and "max_depth=4" in listed.stdout
    missing = _cli(registry, services, runtime, tmp_path, "lineage", "nothing")
    assert missing.returncode == 2
    assert "error:" in missing.stdout and "nothing" in missing.stdout


def test_training_set_needs_applied_views_and_pins_missing_tables(
    services: Services, runtime: RuntimeConfig, registry: Registry
) -> None:
    view = _view("never-written")
    store = _store(runtime, [view])
    with pytest.raises(RegistryError, match="featurestream apply"):
        store.get_training_set(_entity_df(), ["clicks"], registry=registry)
    with registry.read() as conn:
        assert conn.execute(training_sets.select()).first() is None

    versions.apply(registry, [view])
    empty = store.get_training_set(_entity_df(), ["clicks:events_count_1h"], registry=registry)
    ts_id = int(empty.schema.metadata[TRAINING_SET_ID])
    record = lineage.get_training_set_record(registry, ts_id)
    assert list(record.delta_versions.values()) == [None]  # no table yet: pinned as "no events"
    assert empty.column("clicks:events_count_1h").to_pylist() == [0] * 8
    assert store.reproduce_training_set(registry, ts_id).equals(empty)
    with pytest.raises(RegistryError, match="#999"):
        store.reproduce_training_set(registry, 999)
