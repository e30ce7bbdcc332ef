"""Store contracts on real Redis and Delta: idempotent, ordered, never moving back."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from connectors.delta_store import DeltaOfflineStore, event_schema
from connectors.redis_store import RedisOnlineStore
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from engine.errors import StoreError
from engine.reads import online_values
from engine.state import TileState, TileUpdate
from engine.tiles import TileLayout
from engine.writer import BackgroundWriter
from tests.conftest import Services
from tests.support import unique

VIEW = FeatureView(
    name="spend",
    entity=Entity(name="user", join_keys=("user_id",)),
    source=EventSource(
        name="tx",
        topic="tx",
        timestamp_field="ts",
        fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float")),
    ),
    aggregations=(
        Aggregation(function="sum", column="amount", window="1h"),
        Aggregation(function="count", window="10m"),
    ),
    tile_size="1m",
)
LAYOUT = TileLayout.of(VIEW)
T0 = 1_700_000_000_000


def _apply(state: TileState, entity: str, ts: list[int], amounts: list[float]) -> TileUpdate:
    return state.apply(
        [entity],
        np.zeros(len(ts), dtype=np.int64),
        np.asarray(ts, dtype=np.int64),
        [np.asarray(amounts, dtype=np.float64)],
    )


def _sum_1h(store: RedisOnlineStore, ns: str, entity: str, at: int) -> float:
    blobs = store.read_tiles(ns, [entity])
    return float(online_values(VIEW, blobs, at, [VIEW.aggregations[0]])["amount_sum_1h"][0][0])


@pytest.fixture
def store(services: Services) -> RedisOnlineStore:
    s = RedisOnlineStore(services.redis_url, unique("store"))
    yield s
    s.delete_namespace(s.prefix + ":")
    s.client.close()


def test_older_write_never_replaces_newer(store: RedisOnlineStore) -> None:
    ns = store.namespace("spend", VIEW.version)
    state = TileState(LAYOUT, 3_600_000 * 3)
    first = _apply(state, "u1", [T0], [10.0])
    second = _apply(state, "u1", [T0 + 1000], [5.0])
    assert store.write(ns, [first], 60_000, LAYOUT.row_bytes) == 1
    assert store.write(ns, [second], 60_000, LAYOUT.row_bytes) == 1
    assert _sum_1h(store, ns, "u1", T0 + 2000) == 15.0
    # A replay of the first batch (as after a restart) is refused: the value stays at 15.
    assert store.write(ns, [first], 60_000, LAYOUT.row_bytes) == 0
    assert _sum_1h(store, ns, "u1", T0 + 2000) == 15.0


def test_log_is_rewritten_and_stays_bounded(store: RedisOnlineStore) -> None:
    ns = store.namespace("spend", VIEW.version)
    state = TileState(LAYOUT, 3_600_000 * 3)
    total = 0.0
    rewrites = 0
    for i in range(200):  # the same entity, a new batch each time, mostly the same tile
        update = _apply(state, "u1", [T0 + i * 1000], [1.0])
        rewrites += int(update.rewrite.sum())
        total += 1.0
        store.write(ns, [update], 60_000, LAYOUT.row_bytes)
    assert rewrites > 0
    live = len(state.tiles_of("u1"))
    logged_rows = len(store.client.get(ns + "u1")) // LAYOUT.row_bytes
    assert logged_rows <= 2 * live + 16
    assert _sum_1h(store, ns, "u1", T0 + 200_000) == total


def test_keys_expire_after_ttl(store: RedisOnlineStore) -> None:
    ns = store.namespace("spend", VIEW.version)
    state = TileState(LAYOUT, 3_600_000 * 3)
    store.write(ns, [_apply(state, "u9", [T0], [1.0])], 120_000, LAYOUT.row_bytes)
    ttl = store.client.pttl(ns + "u9")
    assert 0 < ttl <= 120_000


def test_unknown_entity_reads_as_empty(store: RedisOnlineStore) -> None:
    ns = store.namespace("spend", VIEW.version)
    vals = online_values(VIEW, store.read_tiles(ns, ["nobody"]), T0, list(VIEW.aggregations))
    assert vals["amount_sum_1h"][0][0] == 0.0
    assert vals["events_count_10m"][0][0] == 0.0


def test_write_failure_raises_store_error() -> None:
    s = RedisOnlineStore("redis://127.0.0.1:1/0", "x", socket_timeout=0.5)
    state = TileState(LAYOUT, 3_600_000)
    with pytest.raises(StoreError, match=re.escape("online write to redis://127.0.0.1:1/0 failed")):
        s.write("x:", [_apply(state, "u", [T0], [1.0])], 1000, LAYOUT.row_bytes)


def _rows(topic: str, partition: int, offsets: list[int], entity: str = "u1") -> pa.Table:
    n = len(offsets)
    ts = np.full(n, T0, dtype=np.int64)
    return pa.Table.from_arrays(
        [
            pa.array([entity] * n),
            pa.array(ts).view(pa.timestamp("ms", tz="UTC")),
            pa.array(np.ones(n)),
            pa.array([topic] * n),
            pa.array(np.full(n, partition, np.int32)),
            pa.array(np.asarray(offsets, np.int64)),
            pa.array((ts // 86_400_000).astype(np.int32)).view(pa.date32()),
        ],
        schema=event_schema(("amount",)),
    )


def test_delta_append_skips_replayed_offsets(tmp_path: Path) -> None:
    store = DeltaOfflineStore(str(tmp_path))
    uri = store.table_uri("spend", "v1")
    assert store.append(uri, _rows("t", 0, [0, 1, 2]), "spend:v1") == 3
    # A replay overlapping the committed offsets writes only the new ones.
    assert store.append(uri, _rows("t", 0, [1, 2, 3, 4]), "spend:v1") == 2
    assert store.append(uri, _rows("t", 0, [0, 1, 2, 3, 4]), "spend:v1") == 0
    # Another partition has its own position.
    assert store.append(uri, _rows("t", 1, [0, 1]), "spend:v1") == 2
    table = store.read(uri)
    assert table.num_rows == 7
    got = sorted(
        zip(table.column("_partition").to_pylist(), table.column("_offset").to_pylist(), strict=True)
    )
    assert got == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]
    assert store.committed_offsets(uri, ["spend:v1:t:0", "spend:v1:t:1"]) == {
        "spend:v1:t:0": 4,
        "spend:v1:t:1": 1,
    }
    assert "date" in store._open(uri).metadata().partition_columns


def test_delta_concurrent_writers_of_different_partitions(tmp_path: Path) -> None:
    store = DeltaOfflineStore(str(tmp_path))
    uri = store.table_uri("spend", "v1")
    store.append(uri, _rows("t", 9, [0]), "spend:v1")  # the table exists before the race
    errors: list[BaseException] = []

    def write(partition: int) -> None:
        try:
            for start in range(0, 50, 10):
                store.append(uri, _rows("t", partition, list(range(start, start + 10))), "spend:v1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.read(uri).num_rows == 1 + 4 * 50


def test_background_writer_keeps_order_and_surfaces_errors() -> None:
    seen: list[int] = []
    w: BackgroundWriter[int] = BackgroundWriter(seen.extend, depth=2)
    for i in range(100):
        w.submit([i])
    w.drain()
    assert seen == list(range(100))
    w.close()

    def boom(items: list[int]) -> None:
        raise RuntimeError("store down")

    bad: BackgroundWriter[int] = BackgroundWriter(boom, depth=2)
    bad.submit([1])
    with pytest.raises(StoreError, match="RuntimeError: store down"):  # not retried: a bug
        bad.drain()
    bad.close()  # raised once: a second raise while the dataflow unwinds would abort the process


def test_read_from_a_redis_that_is_not_there_says_how_to_start_one() -> None:
    s = RedisOnlineStore("redis://:secret@127.0.0.1:1/0", "x", socket_timeout=0.5)
    with pytest.raises(StoreError) as err:
        s.read_tiles("x:", ["u"])
    text = str(err.value)
    assert "featurestream services up" in text and "featurestream doctor" in text
    assert "secret" not in text


@pytest.mark.parametrize("gone", ["moved", "file"])
def test_delta_table_whose_log_vanishes_is_an_outage_not_a_new_table(tmp_path: Path, gone: str) -> None:
    """A table this store (or a fresh one, as a restarted worker) has seen, whose log is gone or
    is not a directory, is retried as an outage: never re-created from version 0, which would
    drop its history and the offsets that filter a replay."""
    from engine.errors import ServiceUnavailable
    from engine.writer import is_transient

    first = DeltaOfflineStore(str(tmp_path))
    uri = first.table_uri("spend", "v1")
    assert first.append(uri, _rows("t", 0, [0, 1, 2]), "spend:v1") == 3
    restarted = DeltaOfflineStore(str(tmp_path))
    assert restarted.stored_position(uri, "spend:v1", "t", 0, None).offset == 2  # it sees the table
    log = Path(uri) / "_delta_log"
    away = log.with_name("_delta_log.away")
    log.rename(away)
    if gone == "file":
        log.write_text("not a directory")
    for store in (first, restarted):
        with pytest.raises(ServiceUnavailable) as info:
            store.append(uri, _rows("t", 0, [2, 3]), "spend:v1")
        assert is_transient(info.value)
    assert not log.is_dir()  # no new table was started
    if gone == "file":
        log.unlink()
    away.rename(log)
    assert restarted.append(uri, _rows("t", 0, [1, 2, 3, 4]), "spend:v1") == 2  # 3 and 4 only
    assert sorted(first.read(uri).column("_offset").to_pylist()) == [0, 1, 2, 3, 4]
