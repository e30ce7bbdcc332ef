"""Shared by the end-to-end tests: the view, the data set and a pandas oracle of the window semantics.

The oracle computes each window from the raw events with pandas/numpy only (no engine code)
following the documented semantics:

* sliding ``size`` as of ``t``: events with ``ts <= t`` and ``tile_start(ts) > t - size``;
* hopping/tumbling as of ``t``: ``E = t // hop * hop``, events with ``E - size <= ts < E``;
* count/sum of an empty window are 0, the rest null; stddev is the sample one; ``last`` is the
  newest (by event time, then offset) non-null value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from featurestream.client import FeatureStore
from tests.support import unique

SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN
BASE = int(datetime(2024, 3, 10, 23, 0, tzinfo=UTC).timestamp() * 1000)  # crosses midnight UTC
SPAN = 2 * HOUR
N_EVENTS = 700
N_ENTITIES = 20
PARTITIONS = 4
MAX_DISORDER = 3 * MIN  # below the view's allowed lateness (5m): out of order but accepted
LATENESS = 5 * MIN
RTOL = 1e-9

# label -> (kind, size ms, hop ms); the oracle uses these numbers, never the engine's windows.
WINDOWS: dict[str, tuple[str, int, int | None]] = {
    "sl10m": ("sliding", 10 * MIN, None),
    "sl1h": ("sliding", HOUR, None),
    "tu15m": ("tumbling", 15 * MIN, 15 * MIN),
    "ho30m10m": ("hopping", 30 * MIN, 10 * MIN),
}
# (function, column); column None = count of events.
FUNCS: list[tuple[str, str | None]] = [
    ("count", None),
    ("count", "amount"),
    ("sum", "amount"),
    ("mean", "amount"),
    ("min", "amount"),
    ("max", "amount"),
    ("last", "amount"),
    ("stddev", "amount"),
]
EXTRA: list[tuple[str, str | None, str]] = [
    ("sum", "qty", "sl10m"),
    ("max", "qty", "tu15m"),
    ("last", "qty", "ho30m10m"),
    ("stddev", "qty", "sl1h"),
]


@dataclass(frozen=True)
class Spec:
    name: str
    function: str
    column: str | None
    kind: str
    size: int
    hop: int | None


def _specs() -> list[Spec]:
    out = []
    for label, (kind, size, hop) in WINDOWS.items():
        for fn, col in FUNCS:
            out.append(Spec(f"{fn}_{col or 'events'}_{label}", fn, col, kind, size, hop))
    for fn, col, label in EXTRA:
        kind, size, hop = WINDOWS[label]
        out.append(Spec(f"{fn}_{col}_{label}", fn, col, kind, size, hop))
    return out


SPECS = _specs()


def _window(kind: str, size: int, hop: int | None) -> Window:
    if kind == "sliding":
        return Window.sliding(f"{size // MIN}m")
    if kind == "tumbling":
        return Window.tumbling(f"{size // MIN}m")
    return Window.hopping(f"{size // MIN}m", hop=f"{hop // MIN}m")  # type: ignore[operator]


def make_view(topic: str, name: str = "txn_features") -> FeatureView:
    source = EventSource(
        name="transactions",
        topic=topic,
        timestamp_field="ts",
        fields=(
            Field(name="user_id", dtype="str"),
            Field(name="amount", dtype="float", nullable=True),
            Field(name="qty", dtype="int"),
        ),
    )
    return FeatureView(
        name=name,
        entity=Entity(name="user", join_keys=("user_id",)),
        source=source,
        aggregations=tuple(
            Aggregation(
                function=s.function, column=s.column, window=_window(s.kind, s.size, s.hop), name=s.name
            )
            for s in SPECS
        ),
        tile_size="1m",
        allowed_lateness="5m",
    )


# ---------------------------------------------------------------------------------------------
# Oracle: pandas/numpy only.
# ---------------------------------------------------------------------------------------------


def window_mask(ts: np.ndarray, t: int, kind: str, size: int, hop: int | None) -> np.ndarray:
    if kind == "sliding":
        return (ts <= t) & ((ts // MIN) * MIN > t - size)
    assert hop is not None
    end = (t // hop) * hop
    return (ts >= end - size) & (ts < end)


def oracle_value(ev: pd.DataFrame, t: int, spec: Spec) -> tuple[Any, int | None]:
    """(value, newest contributing event time ms) of one feature for one entity's events ``ev``.

    ``ev`` is sorted by (ts, partition, offset).
    """
    values = None if spec.column is None else _floats(ev[spec.column])
    return _oracle_arrays(ev["ts"].to_numpy(np.int64), values, t, spec)


def _floats(column: pd.Series) -> np.ndarray:
    """The column as float64, null (None or NaN) as NaN."""
    return column.to_numpy(dtype=np.float64, na_value=np.nan)


def _oracle_arrays(ts: np.ndarray, values: np.ndarray | None, t: int, spec: Spec) -> tuple[Any, int | None]:
    """:func:`oracle_value` over one entity's event times and ``spec.column`` values (NaN: null)."""
    inside = window_mask(ts, t, spec.kind, spec.size, spec.hop)
    if values is None:
        count = int(inside.sum())
        return count, (int(ts[inside].max()) if count else None)
    keep = inside & ~np.isnan(values)
    vals = values[keep]
    newest = int(ts[keep].max()) if len(vals) else None
    match spec.function:
        case "count":
            return len(vals), newest
        case "sum":
            return float(vals.sum()) if len(vals) else 0.0, newest
        case "mean":
            return (float(vals.mean()) if len(vals) else None), newest
        case "min":
            return (float(vals.min()) if len(vals) else None), newest
        case "max":
            return (float(vals.max()) if len(vals) else None), newest
        case "last":
            return (float(vals[-1]) if len(vals) else None), newest
        case "stddev":
            return (float(np.std(vals, ddof=1)) if len(vals) > 1 else None), newest
    raise AssertionError(spec.function)


def accepted_events(messages: list[Any], lateness_ms: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse the source topic as read back; split into (accepted, late) by the per-partition rule."""
    rows = []
    for m in messages:
        e = json.loads(m.value())
        rows.append({**e, "partition": m.partition(), "offset": m.offset()})
    df = pd.DataFrame(rows).sort_values(["partition", "offset"], kind="stable").reset_index(drop=True)
    late = np.zeros(len(df), dtype=bool)
    for _, g in df.groupby("partition", sort=False):
        newest = -np.inf
        for i, ts in zip(g.index, g["ts"], strict=True):
            late[i] = ts < newest - lateness_ms
            newest = max(newest, ts)
    acc = df[~late].sort_values(["user_id", "ts", "partition", "offset"], kind="stable")
    return acc.reset_index(drop=True), df[late].reset_index(drop=True)


class Oracle:
    """:func:`oracle_value` per entity, with each entity's columns as numpy arrays taken once
    (the tests ask it thousands of times)."""

    def __init__(self, events: pd.DataFrame, key: str = "user_id") -> None:
        self.by_entity = {k: g.reset_index(drop=True) for k, g in events.groupby(key, sort=False)}
        self.empty = events.iloc[:0]
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def _array(self, entity: str, column: str) -> np.ndarray:
        got = self._arrays.get((entity, column))
        if got is None:
            ev = self.by_entity.get(entity, self.empty)
            got = ev["ts"].to_numpy(np.int64) if column == "ts" else _floats(ev[column])
            self._arrays[(entity, column)] = got
        return got

    def value(self, entity: str, t: int, spec: Spec) -> tuple[Any, int | None]:
        values = None if spec.column is None else self._array(entity, spec.column)
        return _oracle_arrays(self._array(entity, "ts"), values, t, spec)


def same(actual: Any, expected: Any) -> bool:
    if expected is None:
        return actual is None
    if actual is None:
        return False
    if isinstance(expected, int):
        return actual == expected
    return bool(np.isclose(actual, expected, rtol=RTOL, atol=1e-9))


def ms_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


# ---------------------------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------------------------


def make_events(seed: int = 20240310) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.2, 3.0, N_ENTITIES)
    ent = rng.choice(N_ENTITIES, N_EVENTS, p=weights / weights.sum())
    ts = BASE + rng.integers(0, SPAN, N_EVENTS)
    ts[ent == N_ENTITIES - 1] = BASE + (ts[ent == N_ENTITIES - 1] - BASE) // 2  # goes quiet after 1h
    on_start = rng.choice(N_EVENTS, 30, replace=False)  # exactly on a tile start
    ts[on_start] = BASE + rng.integers(0, SPAN // MIN, 30) * MIN
    on_end = rng.choice(N_EVENTS, 20, replace=False)  # last ms of a tile
    ts[on_end] = BASE + rng.integers(1, SPAN // MIN, 20) * MIN - 1
    for i in rng.choice(N_EVENTS, 25, replace=False):  # same entity, same time: ties for `last`
        j = rng.choice(np.flatnonzero(ent == ent[i]))
        ts[j] = ts[i]
    amount = np.round(rng.lognormal(3.0, 1.0, N_EVENTS), 2)
    null = rng.random(N_EVENTS) < 0.1
    qty = rng.integers(-5, 20, N_EVENTS)
    null[np.argmax(ts)] = False
    # Produce order: event time plus up to MAX_DISORDER of jitter for 30% of events.
    jitter = np.where(rng.random(N_EVENTS) < 0.3, rng.integers(0, MAX_DISORDER, N_EVENTS), 0)
    order = np.argsort(ts + jitter, kind="stable")
    return [
        {
            "user_id": f"u{ent[i]:02d}",
            "ts": int(ts[i]),
            "amount": None if null[i] else float(amount[i]),
            "qty": int(qty[i]),
        }
        for i in order.tolist()
    ]


@dataclass
class World:
    kafka: str
    topic: str
    view: FeatureView
    runtime: RuntimeConfig
    store: FeatureStore
    events: pd.DataFrame
    oracle: Oracle
    entities: list[str]
    newest: int
    online_times: list[int]


def _runtime(kafka: str, redis_url: str, delta: Path) -> RuntimeConfig:
    return RuntimeConfig(
        kafka_bootstrap_servers=kafka,
        redis_url=redis_url,
        redis_prefix=unique("test"),
        delta_uri=str(delta),
        stop_at_end=True,
        batch_size=5_000,
        poll_timeout_seconds=0.02,
    )


def _store(view: FeatureView, runtime: RuntimeConfig) -> FeatureStore:
    return FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )


def _features(view: FeatureView) -> list[str]:
    return [f"{view.name}:{s.name}" for s in SPECS]


def _online(store: FeatureStore, view: FeatureView, entities: list[str], t: int) -> Any:
    return store.get_online_features(_features(view), entities, as_of=ms_dt(t))


def _training(store: FeatureStore, view: FeatureView, entities: list[str], times: list[int]) -> pd.DataFrame:
    stamps = pd.to_datetime(np.asarray(times, np.int64), unit="ms", utc=True)
    df = pd.DataFrame({"user_id": entities, "event_timestamp": stamps})
    return store.get_training_set(df, _features(view)).to_pandas(types_mapper=None)


def _col(df: pd.DataFrame, name: str) -> list[Any]:
    return [None if (isinstance(v, float) and np.isnan(v)) else v for v in df[name].tolist()]
