"""Side-by-side serving of registered versions, and the worker's drift job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from engine.metrics import DRIFT_PSI
from featurestream.client import FeatureStore
from featurestream.config import Settings
from featurestream.registered import DriftWatch, served_views
from registry.core import Registry, RegistryError
from registry.drift import capture_baseline, drift_history
from registry.versions import apply, deprecate, retire
from tests.support import produce, run_views


def _view(topic: str, window: str) -> FeatureView:
    return FeatureView(
        name="spend",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="tx",
            topic=topic,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float")),
        ),
        aggregations=(Aggregation(function="sum", column="amount", window=window, name="amount_sum"),),
        tile_size="1m",
        allowed_lateness="1h",
    )


def _store(
    views: list[FeatureView], runtime: RuntimeConfig, registry: Registry | None = None
) -> FeatureStore:
    return FeatureStore(
        views,
        redis_url=runtime.redis_url,
        delta_uri=runtime.delta_uri,
        redis_prefix=runtime.redis_prefix,
        registry=registry,
    )


def _settings(tmp_path: Path, runtime: RuntimeConfig) -> Settings:
    return Settings(
        registry_url=f"sqlite:///{tmp_path / 'registry.db'}",
        state_dir=tmp_path / "state",
        redis_url=runtime.redis_url,
        delta_uri=runtime.delta_uri,
        redis_prefix=runtime.redis_prefix,
    )


def test_breaking_change_is_served_side_by_side_until_retired(
    services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=2)
    old, new = _view(name, "1h"), _view(name, "2h")
    settings = _settings(tmp_path, runtime)
    registry = Registry(settings.resolved_registry_url())
    apply(registry, [old])
    apply(registry, [new])  # breaking: spend@2; spend@1 stays active
    assert served_views([new], settings) == [new, old]

    t0 = int(datetime(2026, 1, 5, 12, tzinfo=UTC).timestamp() * 1000)
    # amount 1.0 at t0 - 90 min (inside 2h only) and 5.0 at t0 - 10 min (inside both).
    produce(
        services.kafka,
        name,
        [
            {"user_id": "u1", "amount": 1.0, "ts": t0 - 90 * 60_000},
            {"user_id": "u1", "amount": 5.0, "ts": t0 - 10 * 60_000},
        ],
        key_field="user_id",
    )
    run_views(served_views([new], settings), runtime)

    store = _store([new], runtime, registry)
    at = datetime.fromtimestamp(t0 / 1000, UTC)
    got = store.get_online_features(["spend:amount_sum", "spend@1:amount_sum"], ["u1"], as_of=at)
    assert got.values == {"spend:amount_sum": [6.0], "spend@1:amount_sum": [5.0]}
    entity_df = pa.table({"user_id": ["u1"], "event_timestamp": pa.array([at], pa.timestamp("ms", "UTC"))})
    offline = store.get_training_set(entity_df, ["spend", "spend@1"])
    assert offline.column("spend:amount_sum").to_pylist() == [6.0]
    assert offline.column("spend@1:amount_sum").to_pylist() == [5.0]

    deprecate(registry, "spend", 1, retire_after=datetime(2030, 1, 1, tzinfo=UTC))
    fresh = _store([new], runtime, registry)
    with pytest.warns(DeprecationWarning, match="spend@1 is deprecated"):
        fresh.get_online_features(["spend@1:amount_sum"], ["u1"], as_of=at)

    retire(registry, "spend", 1)
    assert served_views([new], settings) == [new]
    gone = _store([new], runtime, registry)
    with pytest.raises(RegistryError, match="retired"):
        gone.get_online_features(["spend@1:amount_sum"], ["u1"], as_of=at)
    registry.close()


def test_no_registry_means_just_the_pipeline(tmp_path: Path) -> None:
    settings = Settings(registry_url=f"sqlite:///{tmp_path / 'none.db'}", state_dir=tmp_path)
    view = _view("t", "1h")
    assert served_views([view], settings) == [view]
    assert not (tmp_path / "none.db").exists()


def test_drift_watch_measures_views_with_baselines(
    services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=1)
    view = _view(name, "1h")
    settings = _settings(tmp_path, runtime)
    registry = Registry(settings.resolved_registry_url())
    apply(registry, [view])
    rng = np.random.default_rng(3)
    hour = 3_600_000
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    end = (now_ms // hour) * hour
    events = [
        {"user_id": f"u{i % 50}", "amount": float(rng.normal(10, 2)), "ts": end - 2 * hour + i * 20_000}
        for i in range(360)
    ]
    produce(services.kafka, name, events, key_field="user_id")
    run_views([view], runtime)
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    at = pa.array([datetime.fromtimestamp((end - hour - 1) / 1000, UTC)] * 50, pa.timestamp("ms", "UTC"))
    training = store.get_training_set(
        pa.table({"user_id": [f"u{i}" for i in range(50)], "event_timestamp": at}), ["spend"]
    )
    capture_baseline(registry, view, training)
    watch = DriftWatch([view], settings, interval=3600, bucket=timedelta(hours=1))
    assert watch.run_once() == 2  # the last two complete hourly buckets, one feature
    history = drift_history(registry, "spend")
    assert len(history) == 2 and all(m.psi is not None for m in history)
    assert DRIFT_PSI.labels(view="spend", feature="amount_sum")._value.get() == pytest.approx(history[-1].psi)
    assert watch.run_once() == 2 and len(drift_history(registry, "spend")) == 2  # re-measured, not duplicated
    registry.close()
