"""Columnar point-in-time reads (engine.training) against a numpy oracle and the events path.

Events come from 4 partitions, arrive out of order, collide on timestamps and sit on tile and
window edges; rows sit exactly on boundaries, one ms before them, before any event, and on
entities with no events. A trending column (huge mean, tiny spread) makes the shifted sums behind
stddev/variance cancel, so the recompute path is exercised too.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from engine.definitions import (
    Aggregation,
    Derived,
    Entity,
    EventSource,
    FeatureView,
    Field,
    Window,
    duration_ms,
)
from engine.reads import point_in_time_values
from engine.training import PreparedEvents, training_values

TILE = 1000
FUNCTIONS = ("count", "sum", "mean", "min", "max", "last", "stddev", "variance")
WINDOWS = (
    Window.sliding("5s"),
    Window.sliding("1s"),
    Window.sliding("60s"),
    Window.tumbling("4s"),
    Window.hopping("6s", "2s"),
)
COLUMNS = ("x", "y", "z")
ENTITIES = np.array(["alice", "bob", "carol", "dave", "erin", "frank"])


def _aggs() -> tuple[Aggregation, ...]:
    out = []
    for wi, w in enumerate(WINDOWS):
        out.append(Aggregation(function="count", window=w, name=f"n_{wi}"))
        for c in COLUMNS:
            out += [Aggregation(function=f, column=c, window=w, name=f"{f}_{c}_{wi}") for f in FUNCTIONS]
    return tuple(out)


VIEW = FeatureView(
    name="pay",
    entity=Entity(name="user", join_keys=("user_id",)),
    source=EventSource(
        name="pay",
        topic="pay",
        timestamp_field="ts",
        fields=(
            Field(name="user_id", dtype="str"),
            *(Field(name=c, dtype="float", nullable=True) for c in COLUMNS),
        ),
    ),
    aggregations=_aggs(),
    derived=(Derived(name="ratio", expression="sum_x_0 / (n_0 + 1)"),),
    tile_size="1s",
)


def stored_events(rng: np.random.Generator, n: int) -> pa.Table:
    """Events of 5 of the 6 entities (``frank`` has none) over 4 partitions, in arrival order:
    each partition's offsets ascend, but event times within and across partitions do not."""
    ent = ENTITIES[rng.integers(0, 5, n)]
    ts = rng.integers(0, 40_000, n)
    edges = rng.random(n) < 0.3
    ts[edges] = (ts[edges] // TILE) * TILE + rng.choice([0, 999], edges.sum())  # on tile edges
    ts[: n // 5] = ts[n // 5 : 2 * (n // 5)]  # equal timestamps, often on the same entity
    x = rng.normal(50, 30, n)
    y = np.round(rng.normal(0, 1, n), 1)  # repeats: min/max/last ties
    z = ts * 1e4 + rng.normal(0, 1e-3, n)  # huge mean, tiny spread
    for c in (x, y, z):
        c[rng.random(n) < 0.25] = np.nan
    part = rng.integers(0, 4, n).astype(np.int32)
    offset = np.zeros(n, dtype=np.int64)
    for p in range(4):
        mine = np.flatnonzero(part == p)
        offset[mine] = np.arange(len(mine))
    cols = {c: pa.array(v, mask=np.isnan(v)) for c, v in zip(COLUMNS, (x, y, z), strict=True)}
    return pa.table(
        {
            "entity": pa.array(ent.tolist(), pa.string()),
            "event_ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
            **cols,
            "_topic": pa.array(["pay"] * n),
            "_partition": pa.array(part),
            "_offset": pa.array(offset),
            "date": pa.array([datetime.fromtimestamp(t / 1000, UTC).date() for t in ts.tolist()]),
        }
    )


def query_rows(rng: np.random.Generator, q: int) -> tuple[list[str], np.ndarray]:
    entity = [*ENTITIES[rng.integers(0, 6, q)].tolist(), "nobody"]
    at = rng.integers(-5_000, 50_000, q + 1)
    k = q // 4
    at[:k] = (at[:k] // 2000) * 2000  # on tile and hop boundaries
    at[k : 2 * k] = (at[k : 2 * k] // 2000) * 2000 - 1  # one ms before them
    at[2 * k] = -1  # before any event
    return entity, at.astype(np.int64)


class Oracle:
    """Features straight from their definitions over the raw events."""

    def __init__(self, events: pa.Table) -> None:
        self.ts = events.column("event_ts").cast(pa.int64()).to_numpy()
        self.ent = np.array(events.column("entity").to_pylist(), dtype=object)
        self.cols = {c: events.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}
        self.order = (self.ts, events.column("_partition").to_numpy(), events.column("_offset").to_numpy())

    def __call__(self, entity: str, t: int, agg: Aggregation) -> float:
        ts, w = self.ts, agg.window
        size = duration_ms(w.size)
        if w.kind == "sliding":
            inside = (ts <= t) & ((ts // TILE) * TILE > t - size)
        else:
            end = (t // duration_ms(w.hop_or_size)) * duration_ms(w.hop_or_size)
            inside = (ts >= end - size) & (ts < end)
        mask = inside & (self.ent == entity)
        if agg.column is None:
            return float(mask.sum())
        x = self.cols[agg.column]
        sel = np.flatnonzero(mask & ~np.isnan(x))
        v = x[sel]
        if agg.function == "last":  # newest; among equal times the later (partition, offset)
            if not len(sel):
                return np.nan
            return float(x[max(sel.tolist(), key=lambda i: tuple(k[i] for k in self.order))])
        if agg.function in ("count", "sum"):
            return float(len(v) if agg.function == "count" else v.sum())
        if agg.function in ("stddev", "variance"):
            if len(v) < 2:
                return np.nan
            return float(np.std(v, ddof=1) if agg.function == "stddev" else np.var(v, ddof=1))
        return float(getattr(np, agg.function)(v)) if len(v) else np.nan


def assert_close(got: np.ndarray, want: np.ndarray, agg: Aggregation | None, what: str) -> None:
    if agg is not None and agg.function in ("count", "min", "max", "last"):
        np.testing.assert_array_equal(got, want, err_msg=what)  # picks or counts: exact
    else:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("seed", range(6))
def test_columnar_equals_oracle_and_events_path(seed: int) -> None:
    rng = np.random.default_rng(seed)
    events = stored_events(rng, int(rng.integers(200, 700)))
    entity, at = query_rows(rng, 160)
    wanted = [*VIEW.aggregations, *VIEW.derived]
    got = training_values(VIEW, events, entity, at, wanted, chunk_rows=int(rng.integers(7, 200)))
    ref = point_in_time_values(VIEW, events, entity, at, wanted)
    assert set(got) == set(ref)
    for name, (vals, times) in ref.items():
        agg = next((a for a in VIEW.aggregations if a.feature_name == name), None)
        assert_close(got[name][0], vals, agg, f"{name} vs events path")
        np.testing.assert_array_equal(got[name][1], times, err_msg=f"{name} event time")
    oracle = Oracle(events)
    for agg in VIEW.aggregations:
        want = np.array([oracle(e, int(t), agg) for e, t in zip(entity, at.tolist(), strict=True)])
        if agg.function in ("stddev", "variance"):  # the oracle's two-pass rounding differs
            np.testing.assert_allclose(
                got[agg.feature_name][0], want, rtol=1e-7, atol=1e-12, equal_nan=True, err_msg=agg.name
            )
        else:
            assert_close(got[agg.feature_name][0], want, agg, f"{agg.feature_name} vs oracle")


def test_no_row_sees_a_later_event() -> None:
    """Adding events after every row's time changes nothing."""
    rng = np.random.default_rng(7)
    events = stored_events(rng, 400)
    entity, at = query_rows(rng, 100)
    at = np.minimum(at, 20_000)
    later = stored_events(np.random.default_rng(8), 300)
    later = later.set_column(
        1,
        "event_ts",
        pa.array(later.column("event_ts").cast(pa.int64()).to_numpy() + 20_001, pa.timestamp("ms", tz="UTC")),
    )
    wanted = list(VIEW.aggregations)
    before = training_values(VIEW, events, entity, at, wanted)
    after = training_values(VIEW, pa.concat_tables([events, later]), entity, at, wanted)
    for agg in VIEW.aggregations:  # equal up to rounding: prefix sums now span more events
        assert_close(after[agg.feature_name][0], before[agg.feature_name][0], agg, agg.feature_name)


def test_no_events_and_no_rows() -> None:
    empty = stored_events(np.random.default_rng(0), 0)
    got = training_values(VIEW, empty, ["alice", "nobody"], np.array([5000, 0]), list(VIEW.aggregations))
    for agg in VIEW.aggregations:
        vals = got[agg.feature_name][0]
        if agg.function in ("count", "sum"):
            assert vals.tolist() == [0.0, 0.0]
        else:
            assert np.isnan(vals).all(), agg.feature_name
    prepared = PreparedEvents(VIEW, stored_events(np.random.default_rng(1), 50))
    out = prepared.values([], np.zeros(0, dtype=np.int64), list(VIEW.aggregations))
    assert all(len(v) == 0 for v, _ in out.values())


def test_other_functions_and_text_columns_fall_back_to_the_events_path() -> None:
    """What tile rows cannot answer (object aggregations, ``last`` of text) comes from the events
    path, next to the columnar features of the same window."""
    view = FeatureView(
        name="shop",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="shop",
            topic="shop",
            timestamp_field="ts",
            fields=(
                Field(name="user_id", dtype="str"),
                Field(name="x", dtype="float", nullable=True),
                Field(name="merchant", dtype="str", nullable=True),
            ),
        ),
        aggregations=(
            Aggregation(function="sum", column="x", window="5s"),
            Aggregation(function="count", column="merchant", window="5s"),
            Aggregation(function="last", column="merchant", window="5s"),
            Aggregation(function="count_distinct", column="merchant", window="5s"),
        ),
        tile_size="1s",
    )
    rng = np.random.default_rng(3)
    base = stored_events(rng, 300)
    merchant = rng.choice(["m1", "m2", "m3", None], base.num_rows).tolist()
    events = base.select(["entity", "event_ts", "x", "_topic", "_partition", "_offset", "date"])
    events = events.add_column(3, "merchant", pa.array(merchant, pa.string()))
    entity, at = query_rows(rng, 80)
    got = training_values(view, events, entity, at, list(view.aggregations), chunk_rows=33)
    ref = point_in_time_values(view, events, entity, at, list(view.aggregations))
    for name, (vals, _) in ref.items():
        a, b = np.asarray(got[name][0]), np.asarray(vals)
        if a.dtype == object or b.dtype == object:
            assert a.tolist() == b.tolist(), name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=name)
