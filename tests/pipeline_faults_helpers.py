"""Shared by the end-to-end fault and format tests: a small view per test, and a check of its
online and offline values against the pandas/numpy oracle of ``tests/pipeline_helpers.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from deltalake import DeltaTable

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from tests.pipeline_helpers import MIN, Spec, _store, ms_dt, oracle_value, same

SPECS = [
    Spec("count_events_sl10m", "count", None, "sliding", 10 * MIN, None),
    Spec("sum_amount_sl10m", "sum", "amount", "sliding", 10 * MIN, None),
    Spec("mean_amount_tu15m", "mean", "amount", "tumbling", 15 * MIN, 15 * MIN),
    Spec("last_amount_sl1h", "last", "amount", "sliding", 60 * MIN, None),
    Spec("stddev_amount_ho20m10m", "stddev", "amount", "hopping", 20 * MIN, 10 * MIN),
]


def _window(s: Spec) -> Window:
    if s.kind == "sliding":
        return Window.sliding(f"{s.size // MIN}m")
    if s.kind == "tumbling":
        return Window.tumbling(f"{s.size // MIN}m")
    return Window.hopping(f"{s.size // MIN}m", hop=f"{s.hop // MIN}m")  # type: ignore[operator]


def make_view(
    topic: str,
    name: str,
    *,
    keys: tuple[Field, ...] = (Field(name="user_id", dtype="str"),),
    ts_field: str = "ts",
    ts_format: str = "epoch_millis",
) -> FeatureView:
    source = EventSource(
        name=f"{name}_src",
        topic=topic,
        timestamp_field=ts_field,
        timestamp_format=ts_format,
        fields=(*keys, Field(name="amount", dtype="float")),
    )
    return FeatureView(
        name=name,
        entity=Entity(name="ent", join_keys=tuple(k.name for k in keys)),
        source=source,
        aggregations=tuple(
            Aggregation(function=s.function, column=s.column, window=_window(s), name=s.name) for s in SPECS
        ),
        tile_size="1m",
        allowed_lateness="5m",
    )


def _by_entity(events: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Oracle input: each entity's events sorted by (event time, partition, offset)."""
    events = events.sort_values(["entity", "ts", "partition", "offset"], kind="stable")
    return {k: g.reset_index(drop=True) for k, g in events.groupby("entity", sort=False)}


def _empty() -> pd.DataFrame:
    return pd.DataFrame({"ts": pd.Series([], dtype="int64"), "amount": pd.Series([], dtype="float64")})


def check_against_oracle(
    view: FeatureView,
    runtime: RuntimeConfig,
    events: pd.DataFrame,
    entity_rows: list[dict[str, Any]],
    entity_ids: list[str],
) -> int:
    """Online at the newest event time (and later) and offline at every event time (also 1 ms before
    and 10 min after) equal the oracle; online equals offline. Returns how many non-empty values
    were compared."""
    store = _store(view, runtime)
    by = _by_entity(events)
    newest = int(events["ts"].max())
    feats = [f"{view.name}:{s.name}" for s in SPECS]
    compared = 0
    for t in [newest, newest + 3 * MIN + 17, (newest // MIN) * MIN - 1]:
        got = store.get_online_features(feats, entity_rows, as_of=ms_dt(t))
        for s in SPECS:
            vals = got.values[f"{view.name}:{s.name}"]
            times = got.event_times[f"{view.name}:{s.name}"]
            for ent, v, when in zip(entity_ids, vals, times, strict=True):
                want, wt = oracle_value(by.get(ent, _empty()), t, s)
                assert same(v, want), (s.name, ent, t, v, want)
                assert when == (None if wt is None else ms_dt(wt)), (s.name, ent, t, when, wt)
                compared += want not in (None, 0)
    # Offline: at each event's time, 1 ms before it and 10 minutes after it.
    q = events[["entity", "ts"]].to_numpy().tolist()
    q_ent = [e for e, _ in q for _ in range(3)]
    q_t = [int(t) + d for _, t in q for d in (0, -1, 10 * MIN)]
    ident = {i: r for i, r in zip(entity_ids, entity_rows, strict=True)}
    keys = list(view.entity.join_keys)
    df = pd.DataFrame({k: [ident[e][k] for e in q_ent] for k in keys})
    df["event_timestamp"] = pd.to_datetime(np.asarray(q_t, np.int64), unit="ms", utc=True)
    out = store.get_training_set(df, feats).to_pandas()
    for s in SPECS:
        col = [None if isinstance(v, float) and np.isnan(v) else v for v in out[f"{view.name}:{s.name}"]]
        for ent, t, v in zip(q_ent, q_t, col, strict=True):
            want, _ = oracle_value(by[ent], t, s)
            assert same(v, want), ("offline", s.name, ent, t, v, want)
            compared += want not in (None, 0)
    # Online equals offline at the newest event time.
    on = store.get_online_features(feats, entity_rows, as_of=ms_dt(newest))
    df = pd.DataFrame({k: [r[k] for r in entity_rows] for k in keys})
    df["event_timestamp"] = pd.Timestamp(newest, unit="ms", tz="UTC")
    off = store.get_training_set(df, feats).to_pandas()
    for f in feats:
        offv = [None if isinstance(v, float) and np.isnan(v) else v for v in off[f]]
        assert all(same(a, b) and same(b, a) for a, b in zip(on.values[f], offv, strict=True)), f
    return compared


def _delta(view: FeatureView, runtime: RuntimeConfig) -> pa.Table:
    return DeltaTable(_store(view, runtime).offline.table_uri(view.name, view.version)).to_pyarrow_table()


def delta_positions(view: FeatureView, runtime: RuntimeConfig) -> list[tuple[int, int]]:
    t = _delta(view, runtime)
    return sorted(zip(t.column("_partition").to_pylist(), t.column("_offset").to_pylist(), strict=True))


def delta_times(view: FeatureView, runtime: RuntimeConfig) -> list[int]:
    col = _delta(view, runtime).column("event_ts")
    return sorted(col.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_pylist())
