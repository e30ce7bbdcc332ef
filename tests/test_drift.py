"""Drift: the statistics and distances, then a real stream whose distribution shifts mid-way."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY as PROMETHEUS

from engine.dataflow import RuntimeConfig
from engine.definitions import DriftThresholds, FeatureView
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from registry.core import Registry, RegistryError
from registry.drift import (
    capture_baseline,
    drift_history,
    drift_status,
    feature_stats,
    ks,
    measure_drift,
    plot_drift,
    psi,
)
from registry.versions import apply
from tests.conftest import Services
from tests.registry_fixtures import *  # noqa: F403
from tests.support import create_topic, make_runtime, produce, run_views, unique

H = 3_600_000
HOURS = 6  # hours 0-2 are the baseline period; from hour 3 on, amounts are 3x larger
SHIFT_AT = 3
ENTITIES = 200
SHIFTED = ("amount_mean_1h", "amount_sum_1h")
STABLE = ("qty_mean_1h", "qty_sum_1h")

values = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300)


@settings(deadline=None)
@given(values, values)
def test_psi_is_nonnegative_and_ks_within_unit_interval(base: list[float], live: list[float]) -> None:
    stats = feature_stats(base)
    assert psi(stats, live) >= 0
    assert psi(stats, feature_stats(live, stats["edges"])) == pytest.approx(psi(stats, live))
    assert 0 <= ks(stats, live) <= 1


@settings(deadline=None)
@given(values)
def test_a_sample_against_itself_is_close(x: list[float]) -> None:
    stats = feature_stats(x)
    assert psi(stats, x) < 1e-9
    assert ks(stats, x) <= 1 / len(x) + 0.011  # the ECDF's step plus the 1% sketch resolution
    assert sum(stats["counts"]) == len(x) and len(stats["counts"]) == len(stats["edges"]) + 1
    assert all(a < b for a, b in zip(stats["edges"], stats["edges"][1:], strict=False))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(-1e3, 1e3), st.floats(0.1, 100.0))
def test_shifted_distributions_are_far(seed: int, loc: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    base = feature_stats(rng.normal(loc, scale, 2000))
    same, shifted = rng.normal(loc, scale, 500), rng.normal(loc + 3 * scale, scale, 500)
    assert psi(base, shifted) > 1.5 and ks(base, shifted) > 0.7
    assert psi(base, same) < 0.15 and ks(base, same) < 0.15  # sampling noise is ~0.02 and ~0.04


def test_nulls_and_empty_sides() -> None:
    stats = feature_stats([1.0, float("nan"), 2.0, float("inf"), 3.0, 4.0])
    assert stats["n"] == 6 and stats["count"] == 4 and stats["null_rate"] == pytest.approx(1 / 3)
    assert stats["mean"] == 2.5 and stats["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert len(stats["quantiles"]) == 101 and stats["quantiles"][0] == 1 and stats["quantiles"][-1] == 4
    assert psi(stats, [float("nan")]) is None and ks(stats, []) is None
    discrete = feature_stats([0.0] * 90 + [5.0] * 10)
    assert discrete["counts"][0] == 0 and sum(discrete["counts"]) == 100  # point mass kept in one bin
    assert ks(discrete, [0.0] * 90 + [5.0] * 10) < 0.02 and ks(discrete, [5.0] * 10) > 0.85
    with pytest.raises(ValueError, match="other edges"):
        psi(stats, feature_stats([1.0, 2.0]))


def test_status_uses_the_features_thresholds() -> None:
    t = DriftThresholds(psi_warn=0.2, psi_alert=0.5, ks_warn=0.3, ks_alert=0.4)
    assert drift_status(0.19, 0.29, t) == "ok"
    assert drift_status(0.2, 0.0, t) == "warn" and drift_status(0.0, 0.3, t) == "warn"
    assert drift_status(0.5, 0.0, t) == "alert" and drift_status(0.21, 0.4, t) == "alert"
    assert drift_status(None, None, t) == "ok"


PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="orders", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float"),
            Field(name="qty", dtype="int")),
)
orders = FeatureView(
    name="orders", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=tuple(
        Aggregation(function=fn, column=col, window="1h")
        for col in ("amount", "qty") for fn in ("mean", "sum")
    ),
    tile_size="1m", allowed_lateness="10m",
)
views = [orders]
"""


@dataclass(frozen=True)
class Stream:
    view: FeatureView
    store: FeatureStore
    pipeline: Path
    runtime: RuntimeConfig
    t0: int  # start of hour 0 (ms); hours are whole UTC hours ending at the current hour
    active: list[list[str]]  # per hour, the users with events in it


def _events(t0: int) -> tuple[list[dict], list[list[str]]]:
    rng = np.random.default_rng(20240601)
    level = rng.lognormal(3.0, 0.5, ENTITIES)
    events, active = [], []
    for hour in range(HOURS):
        users = set()
        for u in range(ENTITIES):
            for _ in range(rng.poisson(5)):
                amount = level[u] * rng.gamma(4.0, 0.25) * (3.0 if hour >= SHIFT_AT else 1.0)
                ts = t0 + hour * H + int(rng.integers(0, H))
                events.append(
                    {"user_id": f"u{u}", "amount": round(amount, 2), "qty": int(rng.integers(1, 6)), "ts": ts}
                )
                users.add(f"u{u}")
        active.append(sorted(users))
    return sorted(events, key=lambda e: e["ts"]), active


@pytest.fixture(scope="module")
def stream(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Stream:
    tmp = tmp_path_factory.mktemp("drift")
    topic = create_topic(services.kafka, unique("orders"), 2)
    pipeline = tmp / "orders_pipeline.py"
    pipeline.write_text(PIPELINE.format(topic=topic))
    (view,) = load_views(pipeline)
    t0 = int(datetime.now(UTC).timestamp() * 1000) // H * H - HOURS * H
    events, active = _events(t0)
    produce(services.kafka, topic, events, key_field="user_id")
    runtime = make_runtime(services.kafka, services.redis_url, tmp, "drift")
    run_views([view], runtime)
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    return Stream(view, store, pipeline, runtime, t0, active)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _baseline_training_set(s: Stream) -> pa.Table:
    """Each baseline-period hour's active users, as of the hour's end: what drift measures live."""
    users = [u for hour in range(SHIFT_AT) for u in s.active[hour]]
    times = [_at(s.t0 + (hour + 1) * H - 1) for hour in range(SHIFT_AT) for _ in s.active[hour]]
    entity_df = pa.table({"user_id": users, "event_timestamp": pa.array(times, pa.timestamp("ms", "UTC"))})
    return s.store.get_training_set(entity_df, ["orders"])


def test_unapplied_view_or_missing_baseline_is_refused(stream: Stream, registry: Registry) -> None:
    training = pa.table({"orders:amount_mean_1h": [1.0, 2.0]})
    with pytest.raises(RegistryError, match="not in the registry"):
        capture_baseline(registry, stream.view, training)
    apply(registry, [stream.view])
    with pytest.raises(RegistryError, match="no drift baseline"):
        measure_drift(registry, stream.store, stream.view, _at(stream.t0), _at(stream.t0 + H))
    with pytest.raises(RegistryError, match="no column"):
        capture_baseline(registry, stream.view, training, features=["qty_sum_1h"])


def test_drift_of_a_shifting_stream(
    stream: Stream, registry: Registry, registry_url: str, tmp_path: Path
) -> None:
    s, view = stream, stream.view
    apply(registry, [view])
    training = _baseline_training_set(s)
    base = capture_baseline(registry, view, training, training_set_id=None)
    assert sorted(base) == sorted(view.feature_names)
    assert base["amount_mean_1h"]["n"] == sum(len(a) for a in s.active[:SHIFT_AT])

    # The baseline period measured live is exactly the training set's values, hour by hour.
    before = measure_drift(registry, s.store, view, _at(s.t0), _at(s.t0 + SHIFT_AT * H))
    assert len(before) == SHIFT_AT * 4
    first_hour = training.slice(0, len(s.active[0]))
    for m in before:
        assert m.status != "alert" and m.psi < view.aggregation(m.feature).drift.psi_alert, m
        if m.bucket_start == _at(s.t0):
            col = first_hour.column(f"orders:{m.feature}").to_numpy()
            assert m.n == len(s.active[0]) and m.mean == pytest.approx(float(np.mean(col)))
            assert m.stats["counts"] == feature_stats(col, base[m.feature]["edges"])["counts"]

    after = measure_drift(registry, s.store, view, _at(s.t0 + SHIFT_AT * H), _at(s.t0 + HOURS * H))
    assert [m.bucket_start for m in after[::4]] == [_at(s.t0 + h * H) for h in range(SHIFT_AT, HOURS)]
    for m in after:
        limits = view.aggregation(m.feature).drift
        assert m.n == len(s.active[(m.bucket_start - _at(s.t0)) // timedelta(hours=1)])
        if m.feature in SHIFTED:
            assert m.psi >= limits.psi_alert and m.ks >= limits.ks_alert and m.status == "alert", m
        else:
            assert m.psi < limits.psi_alert and m.ks < limits.ks_alert and m.status != "alert", m

    # History: every bucket once per feature; re-measuring replaces the rows.
    history = drift_history(registry, "orders")
    assert len(history) == HOURS * 4
    assert drift_history(registry, "orders", feature="amount_mean_1h") == [
        m for m in before + after if m.feature == "amount_mean_1h"
    ]
    again = measure_drift(registry, s.store, view, _at(s.t0 + SHIFT_AT * H), _at(s.t0 + HOURS * H))
    assert [(m.psi, m.ks) for m in again] == [(m.psi, m.ks) for m in after]
    assert len(drift_history(registry, "orders")) == HOURS * 4

    latest = {m.feature: m for m in after}
    for feature, m in latest.items():
        labels = {"view": "orders", "feature": feature}
        assert PROMETHEUS.get_sample_value("featurestream_drift_psi", labels) == pytest.approx(m.psi)
        assert PROMETHEUS.get_sample_value("featurestream_drift_ks", labels) == pytest.approx(m.ks)

    png = plot_drift(registry, view, tmp_path / "plots" / "drift.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000

    _check_cli(s, registry_url, tmp_path)
    assert len(drift_history(registry, "orders")) == HOURS * 4  # the CLI re-measured, in place


def _check_cli(s: Stream, registry_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": s.runtime.kafka_bootstrap_servers,
        "FEATURESTREAM_REDIS_URL": s.runtime.redis_url,
        "FEATURESTREAM_DELTA_URI": s.runtime.delta_uri,
        "FEATURESTREAM_REDIS_PREFIX": s.runtime.redis_prefix,
        "FEATURESTREAM_STATE_DIR": str(tmp_path / "state"),
        "FEATURESTREAM_REGISTRY_URL": registry_url,
        "COLUMNS": "200",
    }
    cli = [sys.executable, "-m", "featurestream.cli", "drift"]
    plot = tmp_path / "cli.png"
    args = ["orders", "--pipeline", str(s.pipeline), "--since", "4h", "--bucket", "1h", "--plot", str(plot)]
    proc = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in proc.stdout.splitlines() if "│" in line]
    rows = [r for r in rows if r and r[0] in SHIFTED + STABLE]
    shifted_hours = {f"{_at(s.t0 + h * H):%Y-%m-%d %H:%M}" for h in range(SHIFT_AT, HOURS)}
    assert {r[1] for r in rows} >= shifted_hours, proc.stdout
    for feature, bucket, n, _psi, _ks, status in rows:
        assert int(n) > 150 and float(_psi) >= 0
        assert (status == "alert") == (feature in SHIFTED and bucket in shifted_hours), proc.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG" and "plot written" in proc.stdout

    bad = subprocess.run(
        [*cli, "nosuch", "--pipeline", str(s.pipeline)], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "error:" in bad.stdout and "no feature view 'nosuch'" in bad.stdout
