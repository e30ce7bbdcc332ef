"""Tiles: partial aggregates per (entity, time tile), and the one combine function reads use.

A tile row is a float64 vector with this layout (``C`` = aggregated columns of the view)::

    [tile_no, n_events, max_ts,  then for each column c:  count, sum, min, max, m2, last_ts, last]

``m2`` is the sum of squared deviations from the tile mean (Welford/Chan), so tiles merge
exactly for mean and standard deviation. Nulls (NaN) are skipped per column. Timestamps are
epoch milliseconds (exact in float64). The stream builds tiles with :func:`partials_from_events`
and :func:`merge`; online and offline reads both use :func:`combine` and :func:`finalize`, so the
two stores agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.definitions import Aggregation, FeatureView, duration_ms
from engine.levels import window_precision_ms
from engine.object_tiles import ObjectSpec, object_specs

__all__ = [
    "TileLayout",
    "combine",
    "finalize",
    "merge",
    "partials_from_events",
    "window_tile_range",
]

TILE, N, MAXTS = 0, 1, 2
CNT, SUM, MIN, MAX, M2, LTS, LAST = range(7)
PER_COLUMN = 7
HEAD = 3


@dataclass(frozen=True)
class TileLayout:
    """Where each partial lives in a tile row, for one feature view; ``objects`` are the view's
    object-tile states (engine.object_tiles), empty when it has no object aggregation."""

    columns: tuple[str, ...]
    tile_ms: int
    objects: tuple[ObjectSpec, ...] = ()

    @classmethod
    def of(cls, view: FeatureView) -> TileLayout:
        return cls(columns=view.columns, tile_ms=duration_ms(view.tile_size), objects=object_specs(view))

    @property
    def width(self) -> int:
        return HEAD + PER_COLUMN * len(self.columns)

    @property
    def row_bytes(self) -> int:
        return 8 * self.width

    def base(self, column: str) -> int:
        return HEAD + PER_COLUMN * self.columns.index(column)

    def empty(self, n: int) -> np.ndarray:
        """Identity rows: merging with them changes nothing."""
        rows = np.zeros((n, self.width), dtype=np.float64)
        rows[:, MAXTS] = np.nan
        for c in range(len(self.columns)):
            b = HEAD + PER_COLUMN * c
            rows[:, b + MIN] = np.nan
            rows[:, b + MAX] = np.nan
            rows[:, b + LTS] = np.nan
            rows[:, b + LAST] = np.nan
        return rows


def partials_from_events(
    layout: TileLayout,
    group: np.ndarray,
    tile_no: np.ndarray,
    ts: np.ndarray,
    columns: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate events into one partial row per distinct ``group`` key.

    Events with equal timestamps keep their input order, so ``last`` takes the later one.
    Returns the sorted distinct group keys and their rows.
    """
    n = len(group)
    if n == 0:
        return group[:0], layout.empty(0)
    order = np.lexsort((ts, group))
    g = group[order]
    t = ts[order].astype(np.float64)
    starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
    ends = np.concatenate((starts[1:], [n])) - 1
    seg = np.repeat(np.arange(len(starts)), np.diff(np.concatenate((starts, [n]))))
    rows = np.empty((len(starts), layout.width), dtype=np.float64)
    rows[:, TILE] = tile_no[order][starts]
    rows[:, N] = np.diff(np.concatenate((starts, [n])))
    rows[:, MAXTS] = t[ends]
    idx = np.arange(n)
    for c, col in enumerate(columns):
        x = np.asarray(col, dtype=np.float64)[order]
        b = HEAD + PER_COLUMN * c
        valid = ~np.isnan(x)
        x0 = np.where(valid, x, 0.0)
        cnt = np.add.reduceat(valid.astype(np.float64), starts)
        s = np.add.reduceat(x0, starts)
        rows[:, b + CNT] = cnt
        rows[:, b + SUM] = s
        rows[:, b + MIN] = np.fmin.reduceat(x, starts)
        rows[:, b + MAX] = np.fmax.reduceat(x, starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / cnt
        dev = np.where(valid, x - mean[seg], 0.0)
        rows[:, b + M2] = np.add.reduceat(dev * dev, starts)
        last_i = np.maximum.reduceat(np.where(valid, idx, -1), starts)
        has = last_i >= 0
        pick = np.where(has, last_i, 0)
        rows[:, b + LTS] = np.where(has, t[pick], np.nan)
        rows[:, b + LAST] = np.where(has, x[pick], np.nan)
    return g[starts], rows


def merge(layout: TileLayout, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge partial rows ``b`` into ``a`` row by row (``b`` is the later data)."""
    out = a.copy()
    out[:, TILE] = b[:, TILE]
    out[:, N] = a[:, N] + b[:, N]
    out[:, MAXTS] = np.fmax(a[:, MAXTS], b[:, MAXTS])
    for c in range(len(layout.columns)):
        o = HEAD + PER_COLUMN * c
        ca, cb = a[:, o + CNT], b[:, o + CNT]
        sa, sb = a[:, o + SUM], b[:, o + SUM]
        tot = ca + cb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = sb / cb - sa / ca
            cross = np.where((ca > 0) & (cb > 0), delta * delta * ca * cb / tot, 0.0)
        out[:, o + CNT] = tot
        out[:, o + SUM] = sa + sb
        out[:, o + MIN] = np.fmin(a[:, o + MIN], b[:, o + MIN])
        out[:, o + MAX] = np.fmax(a[:, o + MAX], b[:, o + MAX])
        out[:, o + M2] = a[:, o + M2] + b[:, o + M2] + cross
        take_b = ~np.isnan(b[:, o + LTS]) & ~(b[:, o + LTS] < a[:, o + LTS])
        out[:, o + LTS] = np.where(take_b, b[:, o + LTS], a[:, o + LTS])
        out[:, o + LAST] = np.where(take_b, b[:, o + LAST], a[:, o + LAST])
    return out


def combine(layout: TileLayout, rows: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Combine tile rows into one partial per group id in ``[0, n_groups)``.

    Rows of one group must cover disjoint time ranges (distinct tiles), as any window's do.
    """
    out = layout.empty(n_groups)
    if len(rows) == 0:
        return out
    out[:, TILE] = np.nan
    out[:, N] = np.bincount(group, rows[:, N], minlength=n_groups)
    np.fmax.at(out[:, MAXTS], group, rows[:, MAXTS])
    for c in range(len(layout.columns)):
        o = HEAD + PER_COLUMN * c
        cnt_i, sum_i = rows[:, o + CNT], rows[:, o + SUM]
        cnt = np.bincount(group, cnt_i, minlength=n_groups)
        s = np.bincount(group, sum_i, minlength=n_groups)
        out[:, o + CNT] = cnt
        out[:, o + SUM] = s
        mn = out[:, o + MIN]
        mx = out[:, o + MAX]
        np.fmin.at(mn, group, rows[:, o + MIN])
        np.fmax.at(mx, group, rows[:, o + MAX])
        out[:, o + MIN] = mn
        out[:, o + MAX] = mx
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_i = sum_i / cnt_i
            mean = s / cnt
            d = np.where(cnt_i > 0, mean_i - mean[group], 0.0)
        out[:, o + M2] = np.bincount(group, rows[:, o + M2] + cnt_i * d * d, minlength=n_groups)
        lts = rows[:, o + LTS]
        best = out[:, o + LTS]
        np.fmax.at(best, group, lts)
        out[:, o + LTS] = best
        win = ~np.isnan(lts) & (lts == best[group])
        out[group[win], o + LAST] = rows[win, o + LAST]
    return out


def finalize(layout: TileLayout, partial: np.ndarray, agg: Aggregation) -> np.ndarray:
    """Feature values from combined partials; NaN means null (no data in the window).

    ``count`` and ``sum`` of an empty window are 0; the others are null. ``stddev`` and
    ``variance`` are the sample ones (divided by n - 1), null for fewer than two values.
    """
    if agg.function == "count" and agg.column is None:
        return partial[:, N].copy()
    o = layout.base(agg.column)  # type: ignore[arg-type]
    cnt = partial[:, o + CNT]
    with np.errstate(invalid="ignore", divide="ignore"):
        match agg.function:
            case "count":
                return cnt.copy()
            case "sum":
                return partial[:, o + SUM].copy()
            case "mean":
                return np.where(cnt > 0, partial[:, o + SUM] / cnt, np.nan)
            case "min":
                return partial[:, o + MIN].copy()
            case "max":
                return partial[:, o + MAX].copy()
            case "last":
                return partial[:, o + LAST].copy()
            case "stddev" | "variance":
                # Sample statistics (n - 1): undefined, so null, for fewer than two values.
                var = np.maximum(partial[:, o + M2], 0.0) / (cnt - 1)
                var = np.where(cnt > 1, var, np.nan)
                return np.sqrt(var) if agg.function == "stddev" else var
    raise ValueError(f"{agg.feature_name}: {agg.function} is read from object tiles (engine.object_tiles)")


def event_time(layout: TileLayout, partial: np.ndarray, agg: Aggregation) -> np.ndarray:
    """Event time (ms) of the newest event behind each value; NaN when the window is empty."""
    if agg.column is None:
        return partial[:, MAXTS].copy()
    return partial[:, layout.base(agg.column) + LTS].copy()


def window_tile_range(agg: Aggregation, tile_ms: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Inclusive tile-number range each read time ``t`` (ms) covers for ``agg``'s window.

    Returns ``(lo, hi, head_is_partial)``: for sliding windows the last tile is the one holding
    ``t`` and only events up to ``t`` count, and the first starts on a boundary of the window's
    precision (:func:`engine.levels.window_precision_ms`: the tile size, or a coarse level for a
    long window); hopping and tumbling windows end on a hop boundary at or before ``t`` and
    cover whole tiles only.
    """
    w = agg.window
    size = duration_ms(w.size)
    t = np.asarray(t, dtype=np.int64)
    if w.kind == "sliding":
        r = window_precision_ms(agg, tile_ms)  # a long window's start moves in coarse steps
        return ((t - size) // r + 1) * (r // tile_ms), t // tile_ms, True
    hop = duration_ms(w.hop_or_size)
    end = (t // hop) * hop
    return (end - size) // tile_ms, end // tile_ms - 1, False
