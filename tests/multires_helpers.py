"""Shared by the multi-resolution window tests: views mixing windows from minutes to 90 days,
~100 days of events, and an independent oracle.

The oracle knows window semantics only from docs (the precision rule of long windows and the
window spans), written here in plain Python with no engine code: a window of size ``W`` has a
*precision* ``R``: the tile size when ``W`` spans at most 10,000 tiles, else the finest coarse
level (1 hour, 1 day; only those larger than the tile and multiples of it) with ``W / R <= 1000``
(hopping and tumbling windows: ``R`` must also divide size and hop); no such level: the view is
rejected. Sliding, as of ``t``: events in ``[((t - W) // R + 1) * R, t]``. Hopping and tumbling
(hop ``H``): ``E = (t // H) * H``, events in ``[E - W, E - 1]``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window

SEC = 1_000
MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
LATENESS = 5 * MIN
LADDER = (HOUR, DAY)
FINE_LIMIT = 10_000  # tiles of the view's own size a window may span at tile precision
COARSE_LIMIT = 1_000  # coarse tiles a window may span
DAY0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z, a UTC day boundary
START = DAY0 + 7 * HOUR + 13 * MIN + 17 * SEC  # first event: no boundary of any level
SPAN = 100 * DAY

# window label -> (kind, size ms, hop ms or None)
WINDOWS: dict[str, tuple[str, int, int | None]] = {
    "10m": ("sliding", 10 * MIN, None),
    "1h": ("sliding", HOUR, None),
    "1d": ("sliding", DAY, None),
    "30d": ("sliding", 30 * DAY, None),
    "90d": ("sliding", 90 * DAY, None),
    "7d_tumbling": ("tumbling", 7 * DAY, None),
    "30d_tumbling": ("tumbling", 30 * DAY, None),
    "60d_every_2d": ("hopping", 60 * DAY, 2 * DAY),
}
# Windows of at most 10,000 one-minute tiles: one level, values and version as before.
FINE_WINDOWS: dict[str, tuple[str, int, int | None]] = {
    "10m": ("sliding", 10 * MIN, None),
    "1d": ("sliding", DAY, None),
    "6d_tumbling": ("tumbling", 6 * DAY, None),
    "1d_every_1h": ("hopping", DAY, HOUR),
}
# A view whose level-0 windows reach back one hour: its 1-minute tiles are bounded by ~1h05m.
MEM_WINDOWS: dict[str, tuple[str, int, int | None]] = {
    "10m": ("sliding", 10 * MIN, None),
    "1h": ("sliding", HOUR, None),
    "10d": ("sliding", 10 * DAY, None),
    "45d": ("sliding", 45 * DAY, None),
}
# 16-minute tiles: no 1-hour level (3,600 s is not a multiple of 960 s), 1 day is 90 tiles.
COARSE_TILE_WINDOWS: dict[str, tuple[str, int, int | None]] = {
    "80m": ("sliding", 80 * MIN, None),
    "1d": ("sliding", DAY, None),
    "200d": ("sliding", 200 * DAY, None),
    "160d_tumbling": ("tumbling", 160 * DAY, None),
}
COLUMN_FUNCTIONS = ("sum", "mean", "min", "max", "last", "stddev")
EXACT = ("count", "min", "max", "last", "count_distinct")


# ---------------------------------------------------------------------------------------------
# the rule, from the docs


def ladder(tile_ms: int) -> tuple[int, ...]:
    return tuple(level for level in LADDER if level > tile_ms and level % tile_ms == 0)


def precision(kind: str, size: int, hop: int | None, tile_ms: int) -> int | None:
    """A window's precision (ms); None: no level fits, the view is rejected."""
    if size // tile_ms <= FINE_LIMIT:
        return tile_ms
    h = size if hop is None else hop
    for level in ladder(tile_ms):
        if kind == "sliding":
            if size <= COARSE_LIMIT * level:
                return level
        elif size % level == 0 and h % level == 0 and size // level <= COARSE_LIMIT:
            return level
    return None


def levels(precisions: list[int], tile_ms: int) -> tuple[int, ...]:
    """The tile sizes a view keeps: its tile, then consecutive ladder levels up to the coarsest used."""
    coarsest = max(precisions)
    return (tile_ms, *(level for level in ladder(tile_ms) if level <= coarsest))


def span(kind: str, size: int, hop: int | None, r: int, t: int) -> tuple[int, int]:
    """Inclusive event-time span (ms) of a window read as of ``t``."""
    if kind == "sliding":
        return ((t - size) // r + 1) * r, t
    h = size if hop is None else hop
    end = (t // h) * h
    return end - size, end - 1


def lookback(kind: str, size: int, hop: int | None) -> int:
    return size if kind == "sliding" else size + (size if hop is None else hop)


def live_bound(
    windows: list[tuple[str, int, int | None]], levels_ms: tuple[int, ...], level: int, lateness: int
) -> int:
    """Most live tiles one entity may hold at ``level``: the level keeps its own windows' lookback
    (and, but for the coarsest, one tile of the next level, for the end of coarser windows) plus
    the lateness, with as much again for eviction slack, plus 16."""
    tile = levels_ms[0]
    i = levels_ms.index(level)
    reach = [lookback(*w) for w in windows if precision(*w, tile) == level]
    if i + 1 < len(levels_ms):
        reach.append(levels_ms[i + 1])
    keep = max(reach) + lateness
    return 2 * (-(-(keep + level) // level)) + 16


# ---------------------------------------------------------------------------------------------
# views


def _window(kind: str, size: int, hop: int | None) -> Window:
    if kind == "sliding":
        return Window.sliding(f"{size // MIN}m")
    if kind == "tumbling":
        return Window.tumbling(f"{size // MIN}m")
    return Window.hopping(f"{size // MIN}m", hop=f"{hop // MIN}m")  # type: ignore[operator]


def source(topic: str) -> EventSource:
    return EventSource(
        name="payments",
        topic=topic,
        timestamp_field="ts",
        fields=(
            Field(name="user_id", dtype="str"),
            Field(name="amount", dtype="float", nullable=True),
            Field(name="merchant", dtype="str", nullable=True),
        ),
    )


def view_of(
    name: str, topic: str, aggs: tuple[Aggregation, ...], tile_size: str = "1m", lateness: int = LATENESS
) -> FeatureView:
    return FeatureView(
        name=name,
        entity=Entity(name="user", join_keys=("user_id",)),
        source=source(topic),
        aggregations=aggs,
        tile_size=tile_size,
        allowed_lateness=f"{lateness // MIN}m",
    )


def window_aggregations(windows: dict[str, tuple[str, int, int | None]]) -> tuple[Aggregation, ...]:
    """count of events, then each column function of ``amount``, per window."""
    out: list[Aggregation] = []
    for kind, size, hop in windows.values():
        w = _window(kind, size, hop)
        out.append(Aggregation(function="count", window=w))
        out.extend(Aggregation(function=f, column="amount", window=w) for f in COLUMN_FUNCTIONS)  # type: ignore[arg-type]
    return tuple(out)


def make_view(topic: str, windows: dict[str, tuple[str, int, int | None]] | None = None) -> FeatureView:
    return view_of("multires", topic, window_aggregations(windows or WINDOWS))


def distinct_view(topic: str) -> FeatureView:
    """count_distinct of a text column (an object aggregation) over short and long windows."""
    labels = ("1h", "1d", "30d", "90d", "30d_tumbling")
    aggs = [Aggregation(function="count", window=_window(*WINDOWS["90d"]))]
    aggs += [
        Aggregation(function="count_distinct", column="merchant", window=_window(*WINDOWS[w])) for w in labels
    ]
    return view_of("multires_distinct", topic, tuple(aggs))


def window_of(agg: Aggregation) -> tuple[str, int, int | None]:
    """(kind, size ms, hop ms) of an aggregation's window, from its public fields."""
    w = agg.window
    size = round(w.size.total_seconds() * 1000)
    hop = None if w.hop is None else round(w.hop.total_seconds() * 1000)
    return w.kind, size, hop


# ---------------------------------------------------------------------------------------------
# events


def make_events(
    seed: int,
    entities: int = 30,
    per_entity: tuple[int, int] = (60, 140),
    span_ms: int = SPAN,
    partitions: int = 4,
    idle: tuple[int, ...] = (3, 7, 11),
    stopped: tuple[int, ...] = (5,),
    spread: tuple[int, ...] = (0, 1),
    disorder: int = 4 * MIN,
) -> list[tuple[int, dict[str, Any]]]:
    """``(partition, event)`` pairs in arrival order.

    Per entity: events spread over ``span_ms`` plus bursts straddling hour and day boundaries
    (one event exactly on the boundary, one a millisecond before), distinct times; entities in
    ``idle`` have a gap of two to four weeks, those in ``stopped`` have no event in the last 45
    days; entities in ``spread`` have each event on a random partition, the others one partition
    each. Arrival is shuffled up to ``disorder`` (keep it below the view's lateness).
    """
    rng = np.random.default_rng(seed)
    end = START + span_ms
    out: list[tuple[int, dict[str, Any]]] = []
    for e in range(entities):
        n = int(rng.integers(*per_entity))
        times = START + rng.integers(0, span_ms, n)
        for _ in range(4):  # bursts around hour and day boundaries
            unit = DAY if rng.random() < 0.5 else HOUR
            edge = (int(START + rng.integers(0, span_ms)) // unit) * unit
            times = np.concatenate((times, edge + rng.integers(-20 * MIN, 20 * MIN, 6)))
            times = np.concatenate((times, [edge, edge - 1]))  # on the boundary, 1 ms before it
        times = np.concatenate((times, end - rng.integers(0, 3 * HOUR, 5)))  # recent activity
        if e in idle:
            gap = int(rng.integers(14, 29)) * DAY
            lo = START + int(rng.integers(10 * DAY, span_ms - gap - 10 * DAY))
            times = times[(times < lo) | (times >= lo + gap)]
        if e in stopped:
            times = times[times < end - 45 * DAY]
        times = np.unique(times[(times >= START) & (times < end)])
        home = e % partitions
        for ts in times.tolist():
            p = int(rng.integers(0, partitions)) if e in spread else home
            out.append((p, {"user_id": f"u{e:02d}", "ts": int(ts), **_values(rng)}))
    return _shuffled(rng, out, disorder)


def heavy_events(seed: int, days: int = 400, per_day: int = 6) -> list[tuple[int, dict[str, Any]]]:
    """One busy entity (``h0``: ``per_day`` events a day for ``days`` days), a sparse one
    (``h1``) and one that stops after 100 days (``h2``), over 2 partitions."""
    rng = np.random.default_rng(seed)
    span_ms = days * DAY
    out: list[tuple[int, dict[str, Any]]] = []
    plans = {"h0": days * per_day, "h1": days // 2, "h2": 100}
    for i, (user, n) in enumerate(plans.items()):
        width = 100 * DAY if user == "h2" else span_ms
        times = np.unique(START + rng.integers(0, width, n))
        for ts in times.tolist():
            out.append((i % 2, {"user_id": user, "ts": int(ts), **_values(rng)}))
    return _shuffled(rng, out, 4 * MIN)


def _values(rng: np.random.Generator) -> dict[str, Any]:
    amount = None if rng.random() < 0.08 else float(np.round(rng.lognormal(3.0, 1.0), 2))
    merchant = None if rng.random() < 0.05 else f"m{int(rng.integers(0, 40))}"
    return {"amount": amount, "merchant": merchant}


def _shuffled(rng: np.random.Generator, pairs: list[tuple[int, dict[str, Any]]], disorder: int) -> list:
    ts = np.array([e["ts"] for _, e in pairs], dtype=np.int64)
    order = np.argsort(ts + rng.integers(0, disorder, len(ts)), kind="stable")
    return [pairs[i] for i in order.tolist()]


# ---------------------------------------------------------------------------------------------
# the oracle


class Entities:
    """Accepted events (columns user_id, ts, amount, merchant, partition, offset) per entity, in
    stream order (time, then partition and offset)."""

    def __init__(self, events: pd.DataFrame) -> None:
        ordered = events.sort_values(["user_id", "ts", "partition", "offset"], kind="stable")
        self.ts: dict[str, np.ndarray] = {}
        self.amount: dict[str, np.ndarray] = {}
        self.merchant: dict[str, list[Any]] = {}
        for u, g in ordered.groupby("user_id", sort=True):
            self.ts[str(u)] = g["ts"].to_numpy(np.int64)
            self.amount[str(u)] = pd.to_numeric(g["amount"]).to_numpy(np.float64)
            self.merchant[str(u)] = [None if pd.isna(m) else m for m in g["merchant"].tolist()]

    def users(self) -> list[str]:
        return list(self.ts)

    def newest(self, user: str) -> int:
        return int(self.ts[user][-1])

    def values(self, user: str, window: tuple[str, int, int | None], t: int, tile_ms: int) -> dict[str, Any]:
        """Every function's value over ``user``'s events in ``window`` as of ``t``."""
        kind, size, hop = window
        r = precision(kind, size, hop, tile_ms)
        assert r is not None
        lo, hi = span(kind, size, hop, r, t)
        ts = self.ts[user]
        a = int(np.searchsorted(ts, lo, side="left"))
        b = max(int(np.searchsorted(ts, hi, side="right")), a)
        return aggregate(self.amount[user][a:b], self.merchant[user][a:b])


def aggregate(amount: np.ndarray, merchant: list[Any]) -> dict[str, Any]:
    """Each function over one window's events (None is null): ``events`` counts events, the
    others read ``amount`` but ``count_distinct`` (non-null ``merchant`` values)."""
    vals = [float(v) for v in amount.tolist() if not math.isnan(v)]
    out: dict[str, Any] = {
        "events": len(amount),
        "count": len(vals),
        "sum": math.fsum(vals),
        "count_distinct": len({m for m in merchant if m is not None}),
        "mean": None,
        "min": None,
        "max": None,
        "last": None,
        "stddev": None,
    }
    if vals:
        mean = math.fsum(vals) / len(vals)
        out.update(mean=mean, min=min(vals), max=max(vals), last=vals[-1])
        if len(vals) > 1:
            out["stddev"] = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return out


def key_of(agg: Aggregation) -> str:
    """The oracle's key of an aggregation."""
    return "events" if agg.column is None else agg.function


def close(actual: Any, expected: Any, function: str) -> bool:
    """Exact for counts, min, max and last; relative 1e-9 for sums, means and deviations."""
    actual, expected = (None if isinstance(x, float) and math.isnan(x) else x for x in (actual, expected))
    if expected is None or actual is None:
        return actual is None and expected is None
    if function in EXACT:
        return float(actual) == float(expected)
    return math.isclose(float(actual), float(expected), rel_tol=1e-9, abs_tol=1e-9)


def accepted_frame(messages: list[Any]) -> pd.DataFrame:
    """A topic's messages (confluent_kafka Messages of JSON events) with partition and offset."""
    rows = [{**json.loads(m.value()), "partition": m.partition(), "offset": m.offset()} for m in messages]
    return pd.DataFrame(rows)


def expected(ent: Entities, view: FeatureView, user: str, t: int) -> dict[str, Any]:
    """The oracle's value of every aggregation of ``view`` for ``user`` as of ``t``."""
    tile = round(view.tile_size.total_seconds() * 1000)
    by_window: dict[tuple, dict[str, Any]] = {}
    out = {}
    for a in view.aggregations:
        w = window_of(a)
        if w not in by_window:
            by_window[w] = ent.values(user, w, t, tile)
        out[a.feature_name] = by_window[w][key_of(a)]
    return out


def coarse_edges(view: FeatureView) -> list[tuple[int, int]]:
    """(size, precision) of the view's sliding windows coarser than its tile, by the oracle's rule."""
    tile = round(view.tile_size.total_seconds() * 1000)
    out = []
    for a in view.aggregations:
        kind, size, hop = window_of(a)
        r = precision(kind, size, hop, tile)
        if kind == "sliding" and r is not None and r > tile and (size, r) not in out:
            out.append((size, r))
    return out


def read_times(
    ent: Entities, user: str, rng: np.random.Generator, edges: list[tuple[int, int]], k: int = 6
) -> list[int]:
    """Point-in-time read times for one entity: at sampled events, just before them, on both
    sides of the next hour, day and week boundary, where a sampled event is about to leave a
    long sliding window (the last instant it is in, the first it is out, and a minute and a
    millisecond before it would leave at tile precision), and long after its newest event."""
    ts = ent.ts[user]
    out: set[int] = set()
    for i, t in enumerate(rng.choice(ts, min(k, len(ts)), replace=False).tolist()):
        out |= {t, t - 1}
        for unit in (HOUR, DAY, 7 * DAY):
            edge = (t // unit + 1) * unit
            out |= {edge - 1, edge}
        for size, r in edges if i < 3 else ():
            leaves = (t // r) * r + size  # the window's start passes t here
            out |= {leaves - 1, leaves, t + size - MIN, t + size - 1}
    newest = ent.newest(user)
    out |= {newest + 30 * DAY + HOUR, newest + 45 * DAY}
    return sorted(out)
