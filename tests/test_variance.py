"""variance: the sample variance from the tiles' Welford M2, equal to numpy's ``var(ddof=1)``
incrementally, in batch, over windows, and online and offline after a real dataflow run."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Window
from tests.conftest import Services
from tests.pipeline_helpers import MIN
from tests.tiles_helpers import (
    COLUMNS,
    LAYOUT,
    SETTINGS,
    TILE_MS,
    Events,
    events,
    finalized,
    in_window,
    incremental_state,
    splits,
    window_values,
)
from tests.windowing_helpers import close, make_events, make_view, oracle, run, training

WINDOWS = (Window.sliding("5s"), Window.tumbling("4s"), Window.hopping("6s", "2s"))


def _numpy_var(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(np.var(x, ddof=1)) if len(x) > 1 else np.nan


@SETTINGS
@given(data=st.data(), ev=events(min_size=1))
def test_variance_over_windows_equals_numpy_incrementally(data, ev: Events) -> None:
    batches = data.draw(splits(len(ev)))
    state = incremental_state(ev, batches)
    # Online semantics are exact at or after the newest event (the newest tile is read whole).
    t = int(ev.ts.max()) + data.draw(st.integers(0, 7000))
    for window in WINDOWS:
        for col in COLUMNS:
            var = Aggregation(function="variance", column=col, window=window)
            sd = Aggregation(function="stddev", column=col, window=window)
            for name in set(ev.entity.tolist()):
                mask = (ev.entity == name) & in_window(window, ev.ts, t)
                want = _numpy_var(ev.cols[COLUMNS.index(col)][mask])
                rows = state.tiles_of(name)
                got, _ = window_values(rows, var, t)
                got_sd, _ = window_values(rows, sd, t)
                np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-6, equal_nan=True)
                np.testing.assert_allclose(got_sd**2, got, rtol=1e-9, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("function", ["variance", "stddev"])
def test_one_value_is_null_two_equal_values_are_zero(function: str) -> None:
    """The sample statistic of one value is undefined (n - 1 = 0): null, never 0 or NaN-as-number."""
    agg = Aggregation(function=function, column="x", window="1s")
    for xs, want in (([], np.nan), ([4.0], np.nan), ([4.0, np.nan], np.nan), ([4.0, 4.0], 0.0)):
        ev = Events(
            np.array(["a"] * len(xs), dtype=object),
            np.zeros(len(xs), np.int64),
            [np.array(xs, np.float64), np.full(len(xs), np.nan)],
        )
        rows = incremental_state(ev, [slice(0, len(xs))] if xs else []).tiles_of("a")
        got = finalized(rows[0], agg) if len(rows) else np.nan
        np.testing.assert_equal(got, want)


def test_large_offsets_keep_precision() -> None:
    """1e9 + (1, 2, 3): a naive sum-of-squares variance loses every digit; Welford keeps 1.0."""
    xs = 1e9 + np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    ev = Events(np.array(["a"] * 6, dtype=object), np.arange(6, dtype=np.int64) * TILE_MS, [xs, xs * 0])
    state = incremental_state(ev, [slice(0, 2), slice(2, 3), slice(3, 6)])
    got, _ = window_values(
        state.tiles_of("a"), Aggregation(function="variance", column="x", window="10s"), 5000
    )
    assert got == pytest.approx(np.var(xs, ddof=1), rel=1e-9)
    assert LAYOUT.width == 3 + 7 * len(COLUMNS)  # no layout change


def test_variance_equals_the_oracle_online_and_offline(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=2)
    r = run(services.kafka, runtime, name, make_view(name), make_events(seed=11, big=True))
    groups = r.by_entity()
    entities = sorted(groups)
    newest = int(r.events["ts"].max())
    names = ["v1h", "sd1h", "v15t", "v30h"]
    features = [f"win:{n}" for n in names]
    checked = 0
    for t in (newest, newest + 20 * MIN, newest + 61 * MIN):
        online = r.store.get_online_features(features, entities, as_of=datetime.fromtimestamp(t / 1000, UTC))
        offline = training(r.store, features, entities, [t] * len(entities))
        for i, e in enumerate(entities):
            for n in names:
                want = oracle(groups[e], n, t)
                got = online.values[f"win:{n}"][i]
                assert close(got, want, rtol=1e-7), (n, e, t, got, want)
                assert close(offline[f"win:{n}"][i], got, rtol=1e-9), (n, e, t)
                checked += want is not None
    assert checked > 20
    rng = np.random.default_rng(5)
    lo = int(r.events["ts"].min())
    times = (lo + rng.integers(0, newest - lo, 200)).tolist()
    ents = rng.choice(entities, 200).tolist()
    offline = training(r.store, features, ents, times)
    for i, (e, t) in enumerate(zip(ents, times, strict=True)):
        for n in names:
            assert close(offline[f"win:{n}"][i], oracle(groups[e], n, t), rtol=1e-7), (n, e, t)
