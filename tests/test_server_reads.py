"""The server's vectorised online read equals the engine's (every function and window kind, and
derived features), its statuses follow the documented rules, its cache changes nothing, concurrent
reads share one Redis read, and derived features are served over HTTP as the Python client reads
them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from connectors.redis_store import RedisOnlineStore
from engine.definitions import Derived, FeatureView
from engine.reads import online_values
from engine.tiles import TileLayout, partials_from_events
from featurestream.client import FeatureStore
from featurestream.server.batch import ReadBatcher
from featurestream.server.catalog import Catalog
from featurestream.server.metrics import ServerMetrics
from featurestream.server.reads import STATUSES, ReadCache, ViewReader
from tests.conftest import Services
from tests.pipeline_helpers import HOUR, MIN, make_view
from tests.server_helpers import RATIO_PIPELINE, Server, payment_events, ratio_view, serve, server_env
from tests.support import create_topic, make_runtime, produce, run_views, unique

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
    view = _derived_view()
    layout = TileLayout.of(view)
    rng = np.random.default_rng(9)
    store = RedisOnlineStore(services.redis_url, unique("batch"))
    ns = store.namespace(view.name, view.version)
    logs = {f"e{i}": _log(layout, rng, 20, 0, int(time.time() * 1000)) for i in range(6)}
    store.client.mset({ns + k: v for k, v in logs.items()})
    catalog = Catalog([view])
    metrics = ServerMetrics()
    batcher = ReadBatcher(store, ReadCache(0), metrics)
    sel = catalog.resolve(
        [f"{view.name}:{n}" for n in ("count_events_sl10m", "mean_amount_sl1h", "per_recent")]
    )[0]
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
        assert block.values.shape == (3, len(ids))
        assert np.array_equal(block.values, ref.values, equal_nan=True)
        assert np.array_equal(block.status, ref.status)
    assert STATUSES[blocks[3].status].tolist() == [["NOT_FOUND", "PRESENT", "PRESENT"]] * 3


def _derived_view() -> FeatureView:
    """``make_view`` plus derived features: a ratio, a division by a count that is 0 for an idle
    entity, one from another derived feature (over another window), one that always divides by 0."""
    return make_view("t").model_copy(
        update={
            "derived": (
                Derived(name="ratio", expression="sum_amount_sl1h / count_events_sl1h"),
                Derived(name="per_recent", expression="sum_amount_sl1h / count_events_sl10m"),
                Derived(name="twice", expression="ratio * 2 - last_qty_ho30m10m"),
                Derived(
                    name="never", expression="mean_amount_tu15m / (count_events_sl10m - count_events_sl10m)"
                ),
            )
        }
    )


def test_derived_values_equal_the_engine_read_cached_or_not() -> None:
    view = _derived_view()
    layout = TileLayout.of(view)
    rng = np.random.default_rng(11)
    blobs = [_log(layout, rng, int(rng.integers(1, 40)), int(rng.integers(0, 2 * HOUR))) for _ in range(20)]
    blobs += [b"", _log(layout, rng, 5, 0), _log(layout, rng, 5, 30 * MIN)]
    ids = [f"e{i}" for i in range(len(blobs))]
    reader = ViewReader(view)
    f = view.aggregation
    shapes = [
        list(view.features),
        [f("twice")],  # derived from derived, its inputs not requested
        [f("per_recent"), f("count_events_sl10m"), f("never"), f("ratio")],
    ]
    cache = ReadCache(1 << 22)
    for at in (NOW, NOW + 7 * MIN, NOW + 95 * MIN):
        for wanted in shapes:
            plan = reader.plan(wanted)
            want = online_values(view, blobs, at, wanted)
            for got in (reader.read(blobs, at, plan), reader.read(blobs, at, plan, ids, cache)):
                assert got.values.shape == (len(wanted), len(blobs))
                for i, feat in enumerate(wanted):
                    vals, times = want[feat.feature_name]
                    assert np.array_equal(got.values[i], vals, equal_nan=True), (feat.feature_name, at)
                    assert np.array_equal(got.times[i], times, equal_nan=True), (feat.feature_name, at)
                assert got.counts.tolist() == [getattr(x, "function", None) == "count" for x in wanted]
    block = reader.read(blobs, NOW, [f("never"), f("per_recent")])
    status = STATUSES[block.status].tolist()
    assert status[0][-3:] == ["NOT_FOUND", "NULL_VALUE", "NULL_VALUE"]  # 0 / 0 is null, not an error
    assert status[1][-2:] == ["PRESENT", "NULL_VALUE"]  # live, nothing in the last 10 minutes
    assert np.isnan(block.values[1][-1]) and not np.isnan(block.values[1][-2])


@dataclass
class DerivedWorld:
    server: Server
    store: FeatureStore
    now_ms: int


@pytest.fixture(scope="module")
def derived_world(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DerivedWorld]:
    tmp = tmp_path_factory.mktemp("derived")
    topic = create_topic(services.kafka, unique("pay"), 1)
    now = int(time.time() * 1000)
    produce(services.kafka, topic, payment_events(now), key_field="user_id")
    view = ratio_view(topic)
    runtime = make_runtime(services.kafka, services.redis_url, tmp, "drv")
    run_views([view], runtime)
    pipeline = tmp / "ratio_pipeline.py"
    pipeline.write_text(RATIO_PIPELINE.format(topic=topic))
    env = server_env(
        services.kafka, services.redis_url, runtime.redis_prefix, f"sqlite:///{tmp / 'r.db'}", tmp / "state"
    )
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    with serve(pipeline, env, tmp / "server.log", "--no-auth") as server:
        yield DerivedWorld(server, store, now)


def _same_minute(fetch: Any) -> Any:
    """Run ``fetch()`` until the read and the reference time fall in the same 1-minute tile."""
    for _ in range(5):
        at = datetime.now(UTC)
        got = fetch()
        if int(time.time() // 60) == int(at.timestamp() // 60):
            return got, at
    raise AssertionError("could not read within one tile")


def _rfc3339(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


USERS = ["u1", "u2", "u3", "u4"]  # live; idle 3 days (past the TTL); never seen; idle 40 minutes
DERIVED = ["avg_amount", "per_recent", "avg_x2", "over_avg"]


def test_server_serves_derived_features_as_the_client_reads_them(derived_world: DerivedWorld) -> None:
    server, store = derived_world.server, derived_world.store
    body = {"features": ["ratios"], "entities": {"user_id": USERS}}
    (resp, at) = _same_minute(lambda: server.post("/features/online", json=body))
    assert resp.status_code == 200, resp.text
    names = resp.json()["metadata"]["feature_names"]
    assert names == ["user_id", "tx_count", "amount_sum", "recent_count", "amount_max_10m", *DERIVED]
    cols = dict(zip(names, resp.json()["results"], strict=True))
    expected = store.get_online_features(["ratios"], USERS, as_of=at)
    for name in names[1:]:
        assert cols[name]["values"] == expected.values[f"ratios:{name}"], name
        assert cols[name]["event_timestamps"] == [_rfc3339(t) for t in expected.event_times[f"ratios:{name}"]]
    # u1: 3 events in the hour (one amount null), 15.0 in all, one in the last 10 minutes (10.0).
    assert cols["avg_amount"]["values"] == [5.0, None, None, 3.0]
    assert cols["per_recent"]["values"] == [15.0, None, None, None]  # u4: 3.0 / 0 recent events
    assert cols["per_recent"]["statuses"] == ["PRESENT", "OUTSIDE_MAX_AGE", "NOT_FOUND", "NULL_VALUE"]
    assert cols["avg_x2"]["values"] == [11.0, None, None, 7.0]  # from avg_amount, itself derived
    assert cols["over_avg"]["values"] == [5.0, None, None, None]  # u4: no max in the last 10 minutes
    assert cols["over_avg"]["statuses"][3] == "NULL_VALUE"
    u4_newest = _rfc3339(datetime.fromtimestamp((derived_world.now_ms - 40 * 60_000) / 1000, UTC))
    assert cols["per_recent"]["event_timestamps"][3] == u4_newest  # newest of its inputs'

    # One derived feature alone (its inputs, derived or not, are read but not answered).
    only = {"features": ["ratios:avg_x2", "ratios:tx_count"], "entities": {"user_id": USERS}}
    (resp, at) = _same_minute(lambda: server.post("/features/online", json=only))
    assert resp.json()["metadata"]["feature_names"] == ["user_id", "avg_x2", "tx_count"]
    expected = store.get_online_features(["ratios:avg_x2", "ratios:tx_count"], USERS, as_of=at)
    assert resp.json()["results"][1]["values"] == expected.values["ratios:avg_x2"] == [11.0, None, None, 7.0]
    assert resp.json()["results"][2]["values"] == expected.values["ratios:tx_count"]

    # Arrow: derived columns are floats with a status and an event time each.
    (arrow, _) = _same_minute(
        lambda: server.post(
            "/features/online", json=body, headers={"Accept": "application/vnd.apache.arrow.stream"}
        )
    )
    assert arrow.status_code == 200, arrow.text
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.schema.field("per_recent").type == pa.float64()
    assert table.column("per_recent").to_pylist() == [15.0, None, None, None]
    assert table.column("per_recent__status").to_pylist() == cols["per_recent"]["statuses"]
    assert table.column("avg_x2__event_timestamp").to_pylist()[2] is None


def test_vector_includes_derived_features(derived_world: DerivedWorld) -> None:
    server, store = derived_world.server, derived_world.store
    (resp, at) = _same_minute(lambda: server.get("/features/ratios/u4"))
    assert resp.status_code == 200, resp.text
    vec = resp.json()
    expected = store.get_online_features(["ratios"], ["u4"], as_of=at)
    assert vec["features"] == {k.split(":")[1]: v[0] for k, v in expected.values.items()}
    assert list(vec["features"])[-4:] == DERIVED
    assert vec["statuses"]["per_recent"] == "NULL_VALUE" and vec["statuses"]["avg_x2"] == "PRESENT"
    some = server.get("/features/ratios/u1?features=avg_x2,per_recent").json()
    assert some["features"] == {"avg_x2": 11.0, "per_recent": 15.0}
    arrow = server.get("/features/ratios/u1", headers={"Accept": "application/vnd.apache.arrow.stream"})
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.column("avg_x2").to_pylist() == [11.0] and table.column("tx_count").to_pylist() == [3]


def test_unknown_features_name_the_derived_ones_in_the_fix(derived_world: DerivedWorld) -> None:
    server = derived_world.server
    bad = server.post("/features/online", json={"features": ["ratios:nope"], "entities": {"user_id": ["u1"]}})
    assert bad.status_code == 400, bad.text
    err = bad.json()
    assert err["error"] == "unknown_feature" and err["field"] == "features[0]"
    assert "'avg_x2'" in err["fix"] and "'tx_count'" in err["fix"] and "'ratios' alone" in err["fix"]
    vec = server.get("/features/ratios/u1?features=avg_x2,nope").json()
    assert vec["error"] == "unknown_feature" and "'per_recent'" in vec["fix"]
    schema = server.get("/openapi.json").json()
    params = schema["paths"]["/features/{view}/{entity}"]["get"]["parameters"]
    assert "default: all of the view" in next(p for p in params if p["name"] == "features")["description"]
    assert "fix" in schema["components"]["schemas"]["ErrorResponse"]["properties"]
