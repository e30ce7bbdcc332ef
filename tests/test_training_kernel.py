"""The compiled point-in-time kernel (engine.training) against the events path (engine.reads), on
random events and rows: nulls, equal timestamps (ties broken by partition and offset), empty
windows, rows before the first event or long after the last, unknown entities, and sliding,
tumbling and hopping windows of several lengths; and rows many enough to be sorted before the
kernel runs (its (entity, time) order), answered in shuffled order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from engine.reads import point_in_time_values
from engine.training import PreparedEvents
from tests.test_training_columnar import FUNCTIONS, assert_close

WINDOWS = (
    Window.sliding("3s"),
    Window.sliding("1s"),
    Window.sliding("30s"),
    Window.tumbling("2s"),
    Window.tumbling("5s"),
    Window.hopping("4s", "2s"),
    Window.hopping("9s", "3s"),
)
ENTITIES = ("a", "b", "c", "d")


def _view() -> FeatureView:
    aggs = []
    for wi, w in enumerate(WINDOWS):
        aggs.append(Aggregation(function="count", window=w, name=f"n_{wi}"))
        for c in ("x", "y"):
            aggs += [Aggregation(function=f, column=c, window=w, name=f"{f}_{c}_{wi}") for f in FUNCTIONS]
    return FeatureView(
        name="k",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="k",
            topic="k",
            timestamp_field="ts",
            fields=(
                Field(name="user_id", dtype="str"),
                Field(name="x", dtype="float", nullable=True),
                Field(name="y", dtype="float", nullable=True),
            ),
        ),
        aggregations=tuple(aggs),
        tile_size="1s",
    )


VIEW = _view()
values = st.one_of(
    st.none(),
    st.sampled_from([0.0, -1.5, 2.0, 1e9, 1e9 + 0.5]),  # repeats: ties in min/max/last
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
)


def _events(rows: list[tuple]) -> pa.Table:
    n = len(rows)
    ent, ts, x, y, part = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [], [])
    offset = np.zeros(n, dtype=np.int64)
    for p in set(part):  # each partition's offsets ascend in arrival order
        mine = [i for i in range(n) if part[i] == p]
        offset[mine] = np.arange(len(mine))
    return pa.table(
        {
            "entity": pa.array(ent, pa.string()),
            "event_ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
            "x": pa.array(x, pa.float64()),
            "y": pa.array(y, pa.float64()),
            "_partition": pa.array(part, pa.int32()),
            "_offset": pa.array(offset),
        }
    )


def _check(events: pa.Table, entity: list[str], at: np.ndarray) -> None:
    wanted = list(VIEW.aggregations)
    prepared = PreparedEvents(VIEW, events)
    got = prepared.values(entity, at, wanted)
    ref = point_in_time_values(VIEW, events, entity, at, wanted)
    for agg in wanted:
        vals, times = ref[agg.feature_name]
        assert_close(got[agg.feature_name][0], vals, agg, agg.feature_name)
        np.testing.assert_array_equal(got[agg.feature_name][1], times, err_msg=f"{agg.feature_name} time")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(ENTITIES[:3]),
            st.integers(0, 12_000).map(lambda t: (t // 500) * 500 if t % 3 == 0 else t),  # collide
            values,
            values,
            st.integers(0, 2),
        ),
        max_size=60,
    ),
    rows=st.lists(
        st.tuples(st.sampled_from([*ENTITIES, "nobody"]), st.integers(-3_000, 60_000)),
        min_size=1,
        max_size=40,
    ),
)
def test_kernel_equals_events_path(events: list[tuple], rows: list[tuple[str, int]]) -> None:
    entity = [e for e, _ in rows]
    at = np.array([t if i % 4 else (t // 1000) * 1000 for i, (_, t) in enumerate(rows)], dtype=np.int64)
    _check(_events(events), entity, at)


def test_many_rows_are_sorted_then_put_back() -> None:
    """Enough rows (more than 4096) that the kernel runs on them sorted by (entity, time): each
    row still gets its own values, in the order asked."""
    rng = np.random.default_rng(11)
    n = 3000
    ts = rng.integers(0, 40_000, n)
    ts[: n // 4] = ts[n // 4 : n // 2]
    x = rng.normal(0, 100, n)
    y = np.round(rng.normal(0, 1, n), 1)
    x[rng.random(n) < 0.2] = np.nan
    y[rng.random(n) < 0.3] = np.nan
    rows = [
        (
            ENTITIES[int(e)],
            int(t),
            None if np.isnan(a) else float(a),
            None if np.isnan(b) else float(b),
            int(p),
        )
        for e, t, a, b, p in zip(rng.integers(0, 3, n), ts, x, y, rng.integers(0, 3, n), strict=True)
    ]
    q = 6000
    entity = [[*ENTITIES, "nobody"][int(i)] for i in rng.integers(0, 5, q)]
    at = rng.integers(-2_000, 50_000, q).astype(np.int64)
    _check(_events(rows), entity, at)
