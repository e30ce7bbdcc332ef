"""The server's vectorised online read equals the engine's (every function and window kind), and
its statuses follow the documented rules."""

from __future__ import annotations

import numpy as np
import pytest

from engine.reads import online_values
from engine.tiles import TileLayout, partials_from_events
from featurestream.server.reads import STATUSES, ViewReader
from tests.pipeline_helpers import HOUR, MIN, make_view

NOW = 1_780_000_000_000 // MIN * MIN + 17_123  # inside a tile, not on its start


def _log(layout: TileLayout, rng: np.random.Generator, n: int, newest_ago: int) -> bytes:
    """A tile log as the store keeps it: rows appended per update, a tile's last row current."""
    ts = NOW - newest_ago - rng.integers(0, 3 * HOUR, n)
    ts[0] = NOW - newest_ago
    amount = np.round(rng.lognormal(2, 1, n), 2)
    amount[rng.random(n) < 0.2] = np.nan
    qty = rng.integers(-3, 9, n).astype(np.float64)
    parts = []
    for half in (slice(0, n // 2), slice(0, n)):  # an older version of some tiles, then the newer
        tiles = ts[half] // layout.tile_ms
        _, rows = partials_from_events(layout, tiles, tiles, ts[half], [amount[half], qty[half]])
        parts.append(rows)
    return np.concatenate(parts).astype("<f8").tobytes()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_values_and_times_equal_the_engine_read(seed: int) -> None:
    view = make_view("t")
    layout = TileLayout.of(view)
    rng = np.random.default_rng(seed)
    blobs = [_log(layout, rng, int(rng.integers(1, 60)), int(rng.integers(0, 2 * HOUR))) for _ in range(30)]
    blobs += [b"", _log(layout, rng, 5, 0)]
    reader = ViewReader(view)
    aggs = list(view.aggregations)
    picked = [aggs[i] for i in rng.choice(len(aggs), 9, replace=False)]  # a subset, in any order
    for at in (NOW, NOW + 7 * MIN, NOW + 95 * MIN, NOW + 30 * HOUR):
        for wanted in (aggs, picked):
            want = online_values(view, blobs, at, wanted)
            got = reader.read(blobs, at, wanted)
            for i, a in enumerate(wanted):
                vals, times = want[a.feature_name]
                assert np.array_equal(got.values[i], vals, equal_nan=True), (a.feature_name, at)
                assert np.array_equal(got.times[i], times, equal_nan=True), (a.feature_name, at)


def test_statuses() -> None:
    view = make_view("t")  # longest lookback 1h: TTL 1h + 1m
    layout = TileLayout.of(view)
    rng = np.random.default_rng(0)
    live, idle, stale = (_log(layout, rng, 20, ago) for ago in (0, 20 * MIN, 2 * HOUR))
    reader = ViewReader(view)
    aggs = [view.aggregation("count_events_sl10m"), view.aggregation("mean_amount_sl10m")]
    block = reader.read([live, idle, b"", stale], NOW, aggs)
    status = STATUSES[block.status].tolist()
    assert status[0] == ["PRESENT", "PRESENT", "NOT_FOUND", "OUTSIDE_MAX_AGE"]  # a count of 0 is a value
    assert status[1][1:] == ["NULL_VALUE", "NOT_FOUND", "OUTSIDE_MAX_AGE"]  # idle 20 min: empty 10m mean
    assert block.values[0][1] == 0 and np.isnan(block.values[1][1])
