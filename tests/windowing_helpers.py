"""Shared by the windowing tests (derived features, variance, dedup): a small view of payment
events, a real dataflow run, and a pandas/numpy oracle recomputed from the raw events.

The oracle knows the window semantics only from the README (via ``tests.pipeline_helpers``'s
``window_mask``), never from engine code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Derived, Entity, EventSource, FeatureView, Field, Window
from featurestream.client import FeatureStore
from tests.pipeline_helpers import MIN, window_mask
from tests.support import produce, read_topic, run_views

BASE = 1_710_111_600_000  # 2024-03-10T23:00:00Z
LATENESS = 5 * MIN

# name -> (function, column, window kind, size ms, hop ms)
AGGS: dict[str, tuple[str, str | None, str, int, int | None]] = {
    "c10": ("count", None, "sliding", 10 * MIN, None),
    "c1h": ("count", None, "sliding", 60 * MIN, None),
    "s10": ("sum", "amount", "sliding", 10 * MIN, None),
    "m10": ("mean", "amount", "sliding", 10 * MIN, None),
    "v1h": ("variance", "amount", "sliding", 60 * MIN, None),
    "sd1h": ("stddev", "amount", "sliding", 60 * MIN, None),
    "v15t": ("variance", "amount", "tumbling", 15 * MIN, 15 * MIN),
    "v30h": ("variance", "qty", "hopping", 30 * MIN, 10 * MIN),
}


def _window(kind: str, size: int, hop: int | None) -> Window:
    if kind == "sliding":
        return Window.sliding(f"{size // MIN}m")
    if kind == "tumbling":
        return Window.tumbling(f"{size // MIN}m")
    return Window.hopping(f"{size // MIN}m", hop=f"{hop // MIN}m")  # type: ignore[operator]


def make_view(topic: str, derived: tuple[Derived, ...] = (), dedup_key: str | None = None) -> FeatureView:
    fields = [
        Field(name="user_id", dtype="str"),
        Field(name="amount", dtype="float", nullable=True),
        Field(name="qty", dtype="int"),
    ]
    if dedup_key:
        fields.append(Field(name=dedup_key, dtype="str"))
    return FeatureView(
        name="win",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="payments", topic=topic, timestamp_field="ts", fields=tuple(fields), dedup_key=dedup_key
        ),
        aggregations=tuple(
            Aggregation(function=f, column=c, window=_window(k, s, h), name=n)
            for n, (f, c, k, s, h) in AGGS.items()
        ),
        derived=derived,
        tile_size="1m",
        allowed_lateness="5m",
    )


def make_events(
    seed: int, n: int = 400, entities: int = 8, span: int = 90 * MIN, big: bool = False
) -> list[dict[str, Any]]:
    """Events in a shuffled arrival order, each at most 4 minutes (< lateness) out of order.

    ``big`` puts a few amounts of 1e9 among the small ones (cancellation in a naive variance).
    """
    rng = np.random.default_rng(seed)
    ent = rng.integers(0, entities, n)
    ts = BASE + rng.integers(0, span, n)
    ts[rng.choice(n, 20, replace=False)] = BASE + rng.integers(0, span // MIN, 20) * MIN  # on tile starts
    amount = np.round(rng.lognormal(3.0, 1.0, n), 2)
    if big:
        amount[rng.choice(n, 6, replace=False)] = 1e9
    null = rng.random(n) < 0.1
    qty = rng.integers(-5, 20, n)
    jitter = rng.integers(0, 4 * MIN, n)
    order = np.argsort(ts + jitter, kind="stable")
    return [
        {
            "user_id": f"u{ent[i]}",
            "ts": int(ts[i]),
            "amount": None if null[i] else float(amount[i]),
            "qty": int(qty[i]),
            "event_id": f"e{i}",
        }
        for i in order.tolist()
    ]


def accepted(kafka: str, topic: str) -> pd.DataFrame:
    """The source topic as read back, with partition and offset, sorted as the engine orders ties."""
    import json

    rows = [
        {**json.loads(m.value()), "partition": m.partition(), "offset": m.offset()}
        for m in read_topic(kafka, topic)
    ]
    df = pd.DataFrame(rows)
    return df.sort_values(["user_id", "ts", "partition", "offset"], kind="stable").reset_index(drop=True)


def oracle(ev: pd.DataFrame, name: str, t: int) -> Any:
    """One aggregation ``name`` of AGGS over one entity's events ``ev`` as of ``t`` (None = null)."""
    fn, col, kind, size, hop = AGGS[name]
    sub = ev[window_mask(ev["ts"].to_numpy(), t, kind, size, hop)]
    if col is None:
        return len(sub)
    vals = sub[col].dropna().to_numpy(dtype=np.float64)
    match fn:
        case "count":
            return len(vals)
        case "sum":
            return float(vals.sum()) if len(vals) else 0.0
        case "mean":
            return float(vals.mean()) if len(vals) else None
        case "variance":
            return float(np.var(vals, ddof=1)) if len(vals) > 1 else None
        case "stddev":
            return float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    raise AssertionError(fn)


@dataclass
class Run:
    view: FeatureView
    store: FeatureStore
    events: pd.DataFrame  # accepted events as read back from the topic

    def by_entity(self) -> dict[str, pd.DataFrame]:
        return {k: g.reset_index(drop=True) for k, g in self.events.groupby("user_id", sort=True)}


def run(kafka: str, runtime: RuntimeConfig, topic: str, view: FeatureView, events: list[dict]) -> Run:
    produce(kafka, topic, events)
    run_views([view], runtime)
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    return Run(view, store, accepted(kafka, topic))


def training(store: FeatureStore, features: list[str], entities: list[str], times: list[int]) -> pd.DataFrame:
    stamps = pd.to_datetime(np.asarray(times, np.int64), unit="ms", utc=True)
    df = pd.DataFrame({"user_id": entities, "event_timestamp": stamps})
    return store.get_training_set(df, features).to_pandas()


def py(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def close(actual: Any, expected: Any, rtol: float = 1e-9) -> bool:
    actual, expected = py(actual), py(expected)
    if expected is None or actual is None:
        return actual is expected
    return bool(np.isclose(actual, expected, rtol=rtol, atol=1e-9))
