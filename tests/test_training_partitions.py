"""Training sets computed one entity range at a time (featurestream.training_partitions), from a
real Delta table, against the events path over the same stored events.

Ranges as small as one entity, chunks smaller than one entity's rows, so an entity's rows land
in different chunks and every chunk draws from several ranges; rows on entities with no events.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from connectors.delta_store import DeltaOfflineStore
from engine.reads import point_in_time_values
from featurestream.training import iter_training_set, training_table
from featurestream.training_partitions import SpilledView, partition_bounds
from tests.test_training_columnar import VIEW, assert_close, query_rows, stored_events


def _store(tmp_path, seed: int) -> tuple[DeltaOfflineStore, str, pa.Table]:  # type: ignore[no-untyped-def]
    store = DeltaOfflineStore(str(tmp_path / "delta"))
    uri = store.table_uri(VIEW.name, VIEW.version)
    rng = np.random.default_rng(seed)
    store.append(uri, stored_events(rng, 600), "pay:test")
    events = store.read(uri)
    assert events is not None
    return store, uri, events


def _entity_table(entity: list[str], at: np.ndarray) -> pa.Table:
    return pa.table(
        {"user_id": pa.array(entity, pa.string()), "ts": pa.array(at, pa.timestamp("ms", tz="UTC"))}
    )


def test_partition_bounds_cap_events_per_range() -> None:
    counts = np.array([3, 0, 5, 1, 1, 9, 2])
    b = partition_bounds(counts, 5)
    assert b[0] == 0 and b[-1] == len(counts)
    for lo, hi in itertools.pairwise(b):
        assert hi > lo
        assert counts[lo:hi].sum() <= 5 or hi - lo == 1  # only a lone heavy entity exceeds it
    assert partition_bounds(np.zeros(0, dtype=np.int64), 5).tolist() == [0]


@pytest.mark.parametrize(("seed", "budget", "chunk"), [(0, 1, 13), (1, 150, 29), (2, 10**9, 7)])
def test_ranges_and_chunks_equal_the_events_path(tmp_path, seed: int, budget: int, chunk: int) -> None:  # type: ignore[no-untyped-def]
    store, uri, events = _store(tmp_path, seed)
    entity, at = query_rows(np.random.default_rng(100 + seed), 300)
    table = _entity_table(entity, at)
    wanted = [*VIEW.aggregations, *VIEW.derived]
    got = training_table(
        store, {"pay": VIEW}, {"pay": wanted}, table, "ts", {"pay": uri}, None,
        chunk_rows=chunk, partition_events=budget,
    )  # fmt: skip
    assert got.num_rows == table.num_rows
    assert got.column("user_id").to_pylist() == entity  # row order kept
    ref = point_in_time_values(VIEW, events, entity, at, wanted)
    for f in wanted:
        agg = f if f in VIEW.aggregations else None
        col = got.column(f"pay:{f.feature_name}").to_numpy(zero_copy_only=False).astype(np.float64)
        assert_close(col, ref[f.feature_name][0], agg, f.feature_name)


def test_one_entity_per_range_spreads_rows_over_ranges(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, uri, _ = _store(tmp_path, 3)
    entity, at = query_rows(np.random.default_rng(4), 120)
    ids = pa.array(entity, pa.string())
    spilled = SpilledView(store, VIEW, list(VIEW.aggregations), ids, at, uri, None, True, 11, 1)
    try:
        assert spilled.ranges == 6  # one per entity with events; frank and nobody (none) share one
        whole = spilled.read(0, len(at))
        parts = [spilled.read(s, min(s + 17, len(at))) for s in range(0, len(at), 17)]
        for name, vals in whole.items():
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), vals)
    finally:
        spilled.close()


def test_pinned_version_ignores_later_appends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, uri, _ = _store(tmp_path, 5)
    pin = store.version(uri)
    entity, at = query_rows(np.random.default_rng(6), 80)
    table = _entity_table(entity, at)
    wanted = {"pay": list(VIEW.aggregations)}
    before = training_table(
        store, {"pay": VIEW}, wanted, table, "ts", {"pay": uri}, {"pay": pin}, partition_events=50
    )
    later = stored_events(np.random.default_rng(9), 200)
    store.append(
        uri,
        later.set_column(
            later.schema.get_field_index("_offset"), "_offset", pa.array(np.arange(10_000, 10_200))
        ),
        "pay:test",
    )
    after = list(
        iter_training_set(store, {"pay": VIEW}, wanted, table, "ts", {"pay": uri}, {"pay": pin}, 31, None, 50)
    )
    assert pa.concat_tables(after).equals(before)


@pytest.mark.parametrize("budget", [1, 10**9])
def test_events_of_entities_no_row_asks_for_are_left_out(tmp_path, budget: int) -> None:  # type: ignore[no-untyped-def]
    """Rows for two of the five stored entities: the scan drops the others' events (one range,
    or one per entity), and values still equal the events path over all stored events."""
    store, uri, events = _store(tmp_path, 12)
    entity, at = query_rows(np.random.default_rng(13), 200)
    keep = [i for i, e in enumerate(entity) if e in ("alice", "carol")]
    entity, at = [entity[i] for i in keep], at[keep]
    table = _entity_table(entity, at)
    wanted = list(VIEW.aggregations)
    got = training_table(
        store, {"pay": VIEW}, {"pay": wanted}, table, "ts", {"pay": uri}, None,
        chunk_rows=23, partition_events=budget,
    )  # fmt: skip
    ref = point_in_time_values(VIEW, events, entity, at, wanted)
    for agg in wanted:
        col = got.column(f"pay:{agg.feature_name}").to_numpy(zero_copy_only=False).astype(np.float64)
        assert_close(col, ref[agg.feature_name][0], agg, agg.feature_name)
