"""Shared by the session window tests: a view with session aggregations and an independent oracle.

The oracle knows sessions only from docs/windows.md: a session is a maximal run of an entity's
events (sorted by time, then partition and offset) whose consecutive times are less than ``gap``
apart; as of ``t`` only events at or before ``t`` count; the current session is the newest one if
``t - newest < gap``; the last closed one is the newest whose last event + gap <= t. It walks the
events one by one in plain Python, sharing no code with the engine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window

MIN = 60_000
BASE = 1_710_111_600_000  # 2024-03-10T23:00:00Z
GAP = 10 * MIN
LATENESS = 5 * MIN
FUNCTIONS = ("count", "sum", "mean", "min", "max", "last", "stddev", "variance")


def session_aggregations(gap: str = "10m") -> tuple[Aggregation, ...]:
    out: list[Aggregation] = []
    for which in ("current", "last"):
        w = Window.session(gap, which=which)  # type: ignore[arg-type]
        out.append(Aggregation(function="count", window=w))
        out.append(Aggregation(function="duration", window=w))
        out.extend(Aggregation(function=f, column="amount", window=w) for f in FUNCTIONS)  # type: ignore[arg-type]
    return tuple(out)


def make_view(topic: str, extra: tuple[Aggregation, ...] = (), ttl: str | None = None) -> FeatureView:
    return FeatureView(
        name="sess",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="clicks",
            topic=topic,
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float", nullable=True)),
        ),
        aggregations=(*session_aggregations(), *extra),
        tile_size="1m",
        allowed_lateness="5m",
        ttl=ttl,
    )


def oracle(ev: pd.DataFrame, t: int, gap: int, which: str) -> dict[str, Any]:
    """Feature values (by function) of one entity's events ``ev`` (columns ts, amount, partition,
    offset) as of ``t``; None is null."""
    times = ev["ts"].to_numpy()
    rows = np.flatnonzero(times <= t)  # by (ts, partition, offset); lexsort is stable, like pandas'
    rows = rows[np.lexsort((ev["offset"].to_numpy()[rows], ev["partition"].to_numpy()[rows], times[rows]))]
    amounts = ev["amount"].to_numpy(dtype=object)[rows].tolist()
    sessions: list[list[tuple[int, float | None]]] = []
    prev = None
    for ts, amount in zip(times[rows].tolist(), amounts, strict=True):
        a = None if amount is None or (isinstance(amount, float) and math.isnan(amount)) else amount
        if prev is None or ts - prev >= gap:
            sessions.append([])
        sessions[-1].append((ts, a))
        prev = ts
    chosen = None
    if which == "current":
        if sessions and t - sessions[-1][-1][0] < gap:
            chosen = sessions[-1]
    else:
        closed = [s for s in sessions if s[-1][0] + gap <= t]
        chosen = closed[-1] if closed else None
    events = chosen or []
    vals = [a for _, a in events if a is not None]
    last = None
    for _ts, a in events:  # the newest value; on equal times the later (partition, offset)
        if a is not None:
            last = a
    return {
        "events_count": len(events),
        "duration": (events[-1][0] - events[0][0]) / 1000 if events else None,
        "count": len(vals),
        "sum": float(sum(vals)) if vals else 0.0,
        "mean": float(np.mean(vals)) if vals else None,
        "min": float(min(vals)) if vals else None,
        "max": float(max(vals)) if vals else None,
        "last": last,
        "variance": float(np.var(vals, ddof=1)) if len(vals) > 1 else None,
        "stddev": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
    }


def feature_key(agg: Aggregation) -> str:
    """The oracle's key of an aggregation."""
    if agg.function == "duration":
        return "duration"
    if agg.column is None:
        return "events_count"
    return agg.function


def close(actual: Any, expected: Any) -> bool:
    actual, expected = (None if isinstance(x, float) and math.isnan(x) else x for x in (actual, expected))
    if expected is None or actual is None:
        return actual is None and expected is None
    return bool(np.isclose(actual, expected, rtol=1e-9, atol=1e-9))


def make_events(
    seed: int,
    n: int = 300,
    entities: int = 6,
    span: int = 240 * MIN,
    disorder: int = 4 * MIN,
    ties: bool = True,
) -> list[dict[str, Any]]:
    """Bursty events (sessions), shuffled up to ``disorder`` (< lateness) out of order, with
    gaps of exactly GAP and just under, equal times, nulls, then a bridge per entity."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for e in range(entities):
        t = BASE + int(rng.integers(0, 30 * MIN))
        times: list[int] = []
        while len(times) < n // entities and t < BASE + span:
            times.append(t)
            r = rng.random()
            if r < 0.1:
                t += GAP  # exactly the gap: a new session
            elif r < 0.2:
                t += GAP - 1  # just under: the same session
            elif r < 0.3:
                t += 0 if ties else 1  # a tie (``last`` then takes the later offset)
            elif r < 0.4:
                t += int(rng.integers(GAP, 4 * GAP))  # a pause
            else:
                t += int(rng.integers(1, 3 * MIN))
        for ts in times:
            out.append({"user_id": f"u{e}", "ts": ts, "amount": _amount(rng)})
    ts = np.array([e["ts"] for e in out])
    jitter = rng.integers(0, disorder, len(out))
    order = np.argsort(ts + jitter, kind="stable")
    shuffled = [out[i] for i in order.tolist()]
    # Then per entity two sessions 13 minutes apart, bridged into one by an event between them
    # that arrives after both, 4 minutes behind the newest (within lateness).
    end = int(ts.max()) + 4 * GAP
    for e in range(entities):
        left = end + e * 4 * GAP
        for t in (left, left + 13 * MIN, left + 9 * MIN):
            shuffled.append({"user_id": f"u{e}", "ts": t, "amount": _amount(rng)})
    return shuffled


def _amount(rng: np.random.Generator) -> float | None:
    return None if rng.random() < 0.1 else float(np.round(rng.lognormal(3.0, 1.0), 2))
