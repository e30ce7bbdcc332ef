"""Shared by the backfill and verify tests: two versions of one view, hostile events, a pandas
oracle recomputed from the topic as read back, and comparisons online and offline."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from engine.dataflow import RuntimeConfig
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field
from featurestream.client import FeatureStore
from tests.support import produce, read_topic

TILE = 60_000
LATENESS = 10 * TILE
HOUR, DAY = 3_600_000, 86_400_000

# feature -> (function, column, sliding window ms)
BASE = {
    "events_count_1d": ("count", None, DAY),
    "amount_sum_1d": ("sum", "amount", DAY),
    "amount_last_1d": ("last", "amount", DAY),
    "amount_max_1h": ("max", "amount", HOUR),
}
EXTRA = {
    "amount_mean_1h": ("mean", "amount", HOUR),
    "events_count_30m": ("count", None, 30 * TILE),
}

_PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="pay", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float", nullable=True)),
)
views = [FeatureView(
    name="pay", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=(
{aggs}
    ),
    tile_size="1m", allowed_lateness="10m",
)]
"""


def specs(extra: bool) -> dict[str, tuple[str, str | None, int]]:
    return {**BASE, **(EXTRA if extra else {})}


def _label(ms: int) -> str:
    return "1d" if ms == DAY else "1h" if ms == HOUR else f"{ms // TILE}m"


def pay_view(topic: str, extra: bool = False) -> FeatureView:
    """Version A (``extra=False``) or B (two more features: another version of the same view)."""
    source = EventSource(
        name="pay",
        topic=topic,
        timestamp_field="ts",
        fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float", nullable=True)),
    )
    aggs = tuple(
        Aggregation(function=fn, column=col, window=_label(ms)) for fn, col, ms in specs(extra).values()
    )
    return FeatureView(
        name="pay",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=source,
        aggregations=aggs,
        tile_size="1m",
        allowed_lateness="10m",
    )


def pipeline_text(topic: str, extra: bool = False) -> str:
    aggs = "\n".join(
        f'        Aggregation(function="{fn}", column={col!r}, window="{_label(ms)}"),'
        for fn, col, ms in specs(extra).values()
    )
    return _PIPELINE.format(topic=topic, aggs=aggs)


def make_events(n: int, users: int, seed: int, start_ms: int | None = None) -> list[dict[str, Any]]:
    """Events over the last ~3 hours, out of order (jitter up to 15 minutes, so some are late),
    with unique times, some null amounts; keyed by event id so one user spreads over partitions."""
    rng = random.Random(seed)
    now = int(datetime.now(UTC).timestamp() * 1000)
    start = start_ms if start_ms is not None else now - 3 * HOUR
    step = max(1, (now - 5 * TILE - start) // n)
    used: set[int] = set()
    out = []
    for i in range(n):
        ts = start + i * step + rng.randint(-15 * TILE, 2 * TILE)
        while ts in used:
            ts += 1
        used.add(ts)
        amount = None if rng.random() < 0.05 else round(rng.uniform(-50, 500), 2)
        out.append({"eid": f"{seed}-{i}", "user_id": f"u{rng.randrange(users)}", "amount": amount, "ts": ts})
    return out


def produce_spread(kafka: str, topic: str, events: list[dict[str, Any]]) -> None:
    produce(kafka, topic, events, key_field="eid")


def topic_frame(kafka: str, topic: str) -> pd.DataFrame:
    """Every message of the topic, with partition, offset and Kafka timestamp."""
    rows = [
        {**json.loads(m.value()), "partition": m.partition(), "offset": m.offset(), "kts": m.timestamp()[1]}
        for m in read_topic(kafka, topic)
    ]
    return pd.DataFrame(rows).sort_values(["partition", "offset"], kind="stable").reset_index(drop=True)


def accepted(frame: pd.DataFrame, start: dict[int, int] | None = None) -> pd.DataFrame:
    """Events at or after ``start`` offsets, minus late ones (per-partition rule, judged from the
    first event read), sorted as the engine breaks ties."""
    df = frame
    if start is not None:
        df = df[df["offset"].to_numpy() >= df["partition"].map(start).fillna(0).to_numpy()]
    keep = np.ones(len(df), dtype=bool)
    times = df["ts"].to_numpy()
    for _, idx in df.groupby("partition", sort=False).indices.items():
        newest = -np.inf
        for j, ts in zip(idx.tolist(), times[idx].tolist(), strict=True):
            keep[j] = not ts < newest - LATENESS
            newest = max(newest, ts)
    return (
        df[keep].sort_values(["user_id", "ts", "partition", "offset"], kind="stable").reset_index(drop=True)
    )


def oracle(ev: pd.DataFrame, spec: tuple[str, str | None, int], t: int) -> Any:
    col = spec[1]
    values = None if col is None else ev[col].to_numpy(dtype=np.float64, na_value=np.nan)
    return _oracle_arrays(ev["ts"].to_numpy(np.int64), values, spec, t)


def _oracle_arrays(
    ts: np.ndarray, values: np.ndarray | None, spec: tuple[str, str | None, int], t: int
) -> Any:
    """:func:`oracle` over one user's event times and ``spec``'s column values (NaN: null)."""
    fn, _, size = spec
    inside = (ts <= t) & ((ts // TILE) * TILE > t - size)
    if values is None:
        return int(inside.sum())
    vals = values[inside & ~np.isnan(values)]
    match fn:
        case "count":
            return len(vals)
        case "sum":
            return float(vals.sum()) if len(vals) else 0.0
        case "mean":
            return float(vals.mean()) if len(vals) else None
        case "max":
            return float(vals.max()) if len(vals) else None
        case "last":
            return float(vals[-1]) if len(vals) else None
    raise AssertionError(fn)


def py(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def close(actual: Any, expected: Any) -> bool:
    actual, expected = py(actual), py(expected)
    if expected is None or actual is None:
        return actual is expected
    return bool(np.isclose(actual, expected, rtol=1e-9, atol=1e-9))


def store_of(view: FeatureView, runtime: RuntimeConfig) -> FeatureStore:
    return FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )


@dataclass
class Values:
    online: dict[str, list[Any]]
    offline: dict[str, list[Any]]


def read_values(store: FeatureStore, view: FeatureView, users: list[str], t: int) -> Values:
    names = [f"{view.name}:{a.feature_name}" for a in view.aggregations]
    at = datetime.fromtimestamp(t / 1000, UTC)
    online = store.get_online_features(names, users, as_of=at).values
    df = pd.DataFrame(
        {"user_id": users, "event_timestamp": pd.to_datetime([t] * len(users), unit="ms", utc=True)}
    )
    table = store.get_training_set(df, names).to_pandas()
    offline = {
        a.feature_name: [py(v) for v in table[f"{view.name}:{a.feature_name}"].tolist()]
        for a in view.aggregations
    }
    return Values({k.split(":", 1)[1]: v for k, v in online.items()}, offline)


def mismatches(values: Values, events: pd.DataFrame, extra: bool, users: list[str], t: int) -> list[str]:
    """Every (where, feature, user) whose value differs from the oracle over ``events``."""
    by_user = {k: g.reset_index(drop=True) for k, g in events.groupby("user_id", sort=False)}
    empty = events.iloc[:0]
    arrays: dict[tuple[str, str], np.ndarray] = {}  # (user, column) -> values, taken once

    def array(user: str, column: str) -> np.ndarray:
        if (user, column) not in arrays:
            ev = by_user.get(user, empty)
            arrays[user, column] = (
                ev["ts"].to_numpy(np.int64)
                if column == "ts"
                else ev[column].to_numpy(dtype=np.float64, na_value=np.nan)
            )
        return arrays[user, column]

    bad = []
    for name, spec in specs(extra).items():
        for i, u in enumerate(users):
            column = None if spec[1] is None else array(u, spec[1])
            want = _oracle_arrays(array(u, "ts"), column, spec, t)
            for where, got in (("online", values.online[name][i]), ("offline", values.offline[name][i])):
                if not close(got, want):
                    bad.append(f"{where} {name} {u}: {got!r} != {want!r}")
    return bad


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
