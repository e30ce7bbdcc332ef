"""The server's vectorised online read equals the engine's (every function and window kind), its
statuses follow the documented rules, its cache changes nothing, and concurrent reads share one
Redis read."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from connectors.redis_store import RedisOnlineStore
from engine.reads import online_values
from engine.tiles import TileLayout, partials_from_events
from featurestream.server.batch import ReadBatcher
from featurestream.server.catalog import Catalog
from featurestream.server.metrics import ServerMetrics
from featurestream.server.reads import STATUSES, ReadCache, ViewReader
from tests.conftest import Services
from tests.pipeline_helpers import HOUR, MIN, make_view
from tests.support import unique

NOW = 1_780_000_000_000 // MIN * MIN + 17_123  # inside a tile, not on its start


def _log(layout: TileLayout, rng: np.random.Generator, n: int, newest_ago: int, now: int = NOW) -> bytes:
    """A tile log as the store keeps it: rows appended per update, a tile's last row current."""
    ts = now - newest_ago - rng.integers(0, 3 * HOUR, n)
    ts[0] = now - newest_ago
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


def test_cached_values_equal_computed_ones_and_expire_with_the_tile_or_the_log() -> None:
    view = make_view("t")
    layout = TileLayout.of(view)
    rng = np.random.default_rng(5)
    blobs = [_log(layout, rng, 30, int(rng.integers(0, HOUR))) for _ in range(8)]
    ids = [f"e{i}" for i in range(8)]
    reader = ViewReader(view)
    wanted = [view.aggregations[i] for i in (3, 0, 17, 30)]
    plan = reader.plan(wanted)
    counts: list[tuple[int, int]] = []
    cache = ReadCache(1 << 20, lambda h, m: counts.append((h, m)))

    def same(at: int, logs: list[bytes]) -> None:
        want = reader.read(logs, at, plan)
        got = reader.read(logs, at, plan, ids, cache)
        assert np.array_equal(got.values, want.values, equal_nan=True)
        assert np.array_equal(got.times, want.times, equal_nan=True)
        assert np.array_equal(got.status, want.status)

    same(NOW, blobs)
    same(NOW + 1_000, blobs)  # same tile: every entity from the cache
    assert counts == [(0, 8), (8, 0)]
    changed = [*blobs[:3], _log(layout, rng, 5, 0), *blobs[4:]]
    same(NOW + 2_000, changed)  # one entity's log changed
    assert counts[-1] == (7, 1)
    same(NOW + MIN, changed)  # the next tile: windows moved, all recomputed
    assert counts[-1] == (0, 8)
    small = ReadCache(len(blobs[0]) + 2_000)  # room for about one entity
    reader.read(blobs, NOW, plan, ids, small)
    assert 0 < len(small) <= 2


def test_concurrent_reads_share_one_redis_read(services: Services) -> None:
    view = make_view("t")
    layout = TileLayout.of(view)
    rng = np.random.default_rng(9)
    store = RedisOnlineStore(services.redis_url, unique("batch"))
    ns = store.namespace(view.name, view.version)
    logs = {f"e{i}": _log(layout, rng, 20, 0, int(time.time() * 1000)) for i in range(6)}
    store.client.mset({ns + k: v for k, v in logs.items()})
    catalog = Catalog([view])
    metrics = ServerMetrics()
    batcher = ReadBatcher(store, ReadCache(0), metrics)
    sel = catalog.resolve([f"{view.name}:count_events_sl10m", f"{view.name}:mean_amount_sl1h"])[0]
    groups = [["e0"], ["e1", "e2"], ["e3"], ["nobody", "e4", "e5"]]

    async def together() -> list:  # type: ignore[type-arg]
        return list(await asyncio.gather(*[batcher.read(sel, ids) for ids in groups]))

    for _ in range(3):  # the reference must be read within the same 1-minute tile
        minute = time.time() // 60
        blocks = asyncio.run(together())
        alone = [
            sel.reader.read(store.read_tiles(ns, ids), int(time.time() * 1000), sel.plan) for ids in groups
        ]
        if time.time() // 60 == minute:
            break
    batches = sum(b.get() for b in metrics.batch._buckets)
    assert metrics.batch._sum.get() == 4 * batches and batches <= 3  # one read per round
    for ids, block, ref in zip(groups, blocks, alone, strict=True):
        assert block.values.shape == (2, len(ids))
        assert np.array_equal(block.values, ref.values, equal_nan=True)
        assert np.array_equal(block.status, ref.status)
    assert STATUSES[blocks[3].status].tolist() == [["NOT_FOUND", "PRESENT", "PRESENT"]] * 2
