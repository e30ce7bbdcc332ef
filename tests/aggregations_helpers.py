"""Shared by tests/test_aggregations_*.py: a view using every object aggregation over every
window kind, random hostile events, an independent oracle from raw events, and a tiny model of
the Redis logs (rows and object records, appended or rewritten)."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from connectors.delta_store import event_schema
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window, duration_ms
from engine.state import TileUpdate

T0 = 1_700_000_000_000
TILE_MS = 1000
WINDOWS = (Window.sliding("5s"), Window.tumbling("4s"), Window.hopping("6s", "2s"))
TEXTS = ("", "a", "b", "é", "日本語", "x" * 300, "a b", "🙂", "A")


def aggs(windows: tuple[Window, ...] = WINDOWS) -> tuple[Aggregation, ...]:
    out: list[Aggregation] = []
    for w in windows:
        out += [
            Aggregation(function="first", column="x", window=w),
            Aggregation(function="first", column="m", window=w),
            Aggregation(function="last", column="m", window=w),
            Aggregation(function="last_n", column="m", n=3, window=w),
            Aggregation(function="last_n", column="x", n=2, window=w),
            Aggregation(function="count_distinct", column="m", window=w),
            Aggregation(function="count_distinct", column="x", window=w),
            Aggregation(function="percentile", column="x", q=0.5, window=w),
            Aggregation(function="percentile", column="x", q=0.9, window=w),
            Aggregation(function="top_k", column="m", k=2, window=w),
            Aggregation(function="sum", column="x", window=w),
        ]
    return tuple(out)


def view(topic: str = "objs", name: str = "objs", dedup: bool = False) -> FeatureView:
    return FeatureView(
        name=name,
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name=name,
            topic=topic,
            timestamp_field="ts",
            fields=(
                Field(name="user_id", dtype="str"),
                Field(name="x", dtype="float", nullable=True),
                Field(name="m", dtype="str", nullable=True),
                *([Field(name="id", dtype="str")] if dedup else []),
            ),
            dedup_key="id" if dedup else None,
        ),
        aggregations=aggs(),
        tile_size="1s",
        allowed_lateness="1h",
        # Redis keys expire by wall clock: with the default (9 s here) an entity idle while a
        # killed worker restarts would lose its keys, and appends after the restart would hold
        # only its newer tiles.
        ttl="1h",
    )


def random_events(rng: random.Random, n: int, entities: int = 5) -> list[dict[str, Any]]:
    """Events with ties in time, nulls, odd text and repeated values."""
    out = []
    for _ in range(n):
        x = (
            None
            if rng.random() < 0.15
            else rng.choice([0.0, -0.0, -3.5, 1.0, 2.0, 1e6, rng.uniform(-50, 50)])
        )
        m = None if rng.random() < 0.15 else rng.choice(TEXTS)
        out.append(
            {"user_id": f"u{rng.randrange(entities)}", "ts": T0 + rng.randrange(12) * 700, "x": x, "m": m}
        )
    return out


def window_events(agg: Aggregation, evs: list[dict[str, Any]], t: int) -> list[dict[str, Any]]:
    """The events ``agg``'s window holds at ``t`` (docs/windows.md), in (ts, partition, offset) order."""
    w = agg.window
    size = duration_ms(w.size)
    if w.kind == "sliding":
        lo, hi = ((t - size) // TILE_MS + 1) * TILE_MS, t
    else:
        end = (t // duration_ms(w.hop_or_size)) * duration_ms(w.hop_or_size)
        lo, hi = end - size, end - 1
    keep = [e for e in evs if lo <= e["ts"] <= hi]
    return sorted(keep, key=lambda e: (e["ts"], e["_partition"], e["_offset"]))


def oracle(agg: Aggregation, evs: list[dict[str, Any]]) -> Any:
    vals = [e[agg.column] for e in evs if e[agg.column] is not None]
    match agg.function:
        case "first":
            return vals[0] if vals else None
        case "last":
            return vals[-1] if vals else None
        case "last_n":
            return vals[::-1][: agg.n]
        case "count_distinct":
            return float(len({v + 0.0 if isinstance(v, float) else v for v in vals}))
        case "percentile":
            if not vals:
                return None
            return sorted(vals)[math.floor(agg.q * (len(vals) - 1))]
        case "top_k":
            top = sorted(Counter(vals).items(), key=lambda vc: (-vc[1], vc[0]))[: agg.k]
            return [{"value": v, "count": c} for v, c in top]
        case "sum":
            return float(sum(vals))
    raise AssertionError(agg.function)


def assert_matches(agg: Aggregation, got: Any, want: Any, where: str) -> None:
    if agg.function == "percentile":
        if want is None:
            assert got is None or got != got, where
        else:
            assert abs(got - want) <= 0.01 * abs(want) + 1e-300, (where, got, want)
    elif agg.function == "sum":
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6), (where, got, want)
    elif want is None or (agg.function == "first" and isinstance(want, float) and want != want):
        assert got is None or (isinstance(got, float) and got != got), (where, got)
    else:
        assert got == want, (where, got, want)


def same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN (online == offline must hold exactly)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def events_table(v: FeatureView, evs: list[dict[str, Any]]) -> pa.Table:
    n = len(evs)
    return pa.Table.from_arrays(
        [
            pa.array([e["user_id"] for e in evs], pa.string()),
            pa.array([e["ts"] for e in evs], pa.int64()).view(pa.timestamp("ms", tz="UTC")),
            pa.array([e["x"] for e in evs], pa.float64()),
            pa.array([e["m"] for e in evs], pa.string()),
            pa.array(["t"] * n, pa.string()),
            pa.array([e["_partition"] for e in evs], pa.int32()),
            pa.array([e["_offset"] for e in evs], pa.int64()),
            pa.array([e["ts"] // 86_400_000 for e in evs], pa.int32()).view(pa.date32()),
        ],
        schema=event_schema(v.columns, v.text_columns),
    )


class Logs:
    """Per entity: the row log and the object-record log, as the Redis script keeps them."""

    def __init__(self) -> None:
        self.rows: dict[str, bytes] = {}
        self.objects: dict[str, bytes] = {}
        self.rewrites = 0

    def write(self, u: TileUpdate) -> None:
        blob = np.ascontiguousarray(u.rows, dtype="<f8").tobytes()
        width = u.rows.shape[1] * 8 if u.rows.ndim == 2 else 0
        for i, name in enumerate(u.entities):
            rows = blob[int(u.starts[i]) * width : int(u.starts[i + 1]) * width]
            recs = u.objects[i] if u.objects is not None else b""
            if u.rewrite[i] or u.force:
                self.rewrites += 1
                self.rows[name], self.objects[name] = rows, recs
            else:
                self.rows[name] = self.rows.get(name, b"") + rows
                self.objects[name] = self.objects.get(name, b"") + recs
