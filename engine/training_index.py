"""Per-view index structures behind :mod:`engine.training`: compensated prefix sums, running
in-tile values, sparse tables for min/max, "last valid" indices, one column at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.definitions import Aggregation
from engine.tiles import CNT, M2, MAX, MIN, SUM

__all__ = [
    "Column",
    "as_float",
    "between",
    "by_window",
    "counts",
    "expand",
    "gather",
    "prefix",
    "slices",
    "take",
]


def prefix(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums with a leading 0, as (sums, running rounding error): ``hi + lo`` is the exact
    prefix up to O(eps^2), so a range's sum is as accurate as summing it directly."""
    hi = np.zeros(len(x) + 1)
    np.cumsum(x, out=hi[1:])
    a, s = hi[:-1], hi[1:]
    bb = s - a
    err = (a - (s - bb)) + (x - bb)  # TwoSum: what each running addition rounded away
    lo = np.zeros(len(x) + 1)
    np.cumsum(err, out=lo[1:])
    return hi, lo


def counts(x: np.ndarray) -> tuple[np.ndarray, None]:
    """Prefix sums of counts: exact in int64, no error term needed."""
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x.astype(np.int64), out=out[1:])
    return out, None


def between(p: tuple[np.ndarray, np.ndarray | None], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if p[1] is None:
        return (p[0][b] - p[0][a]).astype(np.float64)
    return (p[0][b] - p[0][a]) + (p[1][b] - p[1][a])


def expand(first: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices ``first[i] .. first[i] + lengths[i] - 1`` of every i, concatenated."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total) - np.repeat(starts - first, lengths)


def running_fn(fn: np.ufunc, x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """``fn`` accumulated within segments (``first[i]``: index where i's segment starts), in
    log2(longest segment) vectorised passes."""
    out = x.copy()
    if not len(x):
        return out
    idx = np.arange(len(x))
    longest = int((idx - first).max()) + 1
    k = 1
    while k < longest:
        same = idx[k:] - k >= first[k:]
        out[k:] = np.where(same, fn(out[k:], out[:-k]), out[k:])
        k *= 2
    return out


def as_float(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as the stream sees it: numbers as float64, text as presence (0.0, or NaN if null)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.where(pc.is_valid(column).to_numpy(zero_copy_only=False), 0.0, np.nan)
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def by_window(aggs: list[Aggregation]) -> list[list[Aggregation]]:
    groups: dict[tuple, list[Aggregation]] = {}
    for a in aggs:
        groups.setdefault((a.window.kind, a.window.size, a.window.hop), []).append(a)
    return list(groups.values())


def gather(values: np.ndarray, idx: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``values[idx]`` where ``ok``, else NaN (``idx`` may be out of range where not ok)."""
    if not len(values):
        return np.full(len(idx), np.nan)
    return np.where(ok, values[np.clip(idx, 0, len(values) - 1)], np.nan)


def take(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``values[idx]`` with ``idx`` clipped into range (-1 for every row when ``values`` is empty)."""
    if not len(values):
        return np.full(len(idx), -1, dtype=np.int64)
    return values[np.clip(idx, 0, len(values) - 1)]


class Column:
    """One aggregated column: prefix sums over its tiles, running in-tile values over its events."""

    def __init__(self, x: np.ndarray, tiles: np.ndarray, tile_code: np.ndarray, tile_of_event: np.ndarray):
        self.x = x
        self.tiles = tiles  # this column's partials (CNT .. LAST) per tile
        cnt, s = tiles[:, CNT], tiles[:, SUM]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, s / cnt, 0.0)
            # Tile means are shifted by their entity's mean before squaring, so the between-tile
            # part of m2 cancels only as far as a window's mean strays from the entity's.
            n_ent = int(tile_code.max()) + 1 if len(tile_code) else 0
            ref = np.bincount(tile_code, s, n_ent) / np.bincount(tile_code, cnt, n_ent)
        d = np.where(cnt > 0, mean - np.nan_to_num(ref)[tile_code] if n_ent else 0.0, 0.0)
        self.cnt = counts(cnt)
        self.sum = prefix(s)
        self.m2 = prefix(tiles[:, M2])
        self.cd = prefix(cnt * d)
        self.cd2 = prefix(cnt * d * d)
        tix = np.arange(len(cnt))
        self.last_tile = np.maximum.accumulate(np.where(cnt > 0, tix, -1)) if len(cnt) else tix
        # Events, shifted by their own tile's mean: a tile prefix's m2 cancels only as far as
        # the prefix's mean strays from the whole tile's.
        valid = ~np.isnan(x)
        dev = np.where(valid, x - mean[tile_of_event], 0.0) if len(x) else x
        self.ev_cnt = counts(valid)
        self.ev_sum = prefix(np.where(valid, x, 0.0))
        self.ev_d = prefix(dev)
        self.ev_d2 = prefix(dev * dev)
        eix = np.arange(len(x))
        self.last_event = np.maximum.accumulate(np.where(valid, eix, -1)) if len(x) else eix
        self._tile_of_event = tile_of_event
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def running(self, fn: str, first: np.ndarray) -> np.ndarray:
        """Running min/max of the events from their tile's first event."""
        key = (f"run-{fn}", 0)
        if key not in self._cache:
            self._cache[key] = running_fn(np.fmin if fn == "min" else np.fmax, self.x, first)
        return self._cache[key]

    def sparse_table(self, fn: str, levels: int) -> np.ndarray:
        """``table[k, j]``: min/max over tiles ``j .. j + 2**k - 1`` (NaN past the end)."""
        key = (fn, 0)
        if key not in self._cache or len(self._cache[key]) < levels:  # one per function, grown
            ufunc = np.fmin if fn == "min" else np.fmax
            base = self.tiles[:, MIN if fn == "min" else MAX]
            table = np.full((levels, len(base)), np.nan)
            table[0] = base
            for k in range(1, levels):
                h = 1 << (k - 1)
                if h >= len(base):
                    break
                table[k, : len(base) - h] = ufunc(table[k - 1, :-h], table[k - 1, h:])
            self._cache[key] = table
        return self._cache[key]


def slices(lengths: np.ndarray, budget: int = 4_000_000) -> list[slice]:
    """Consecutive slices whose lengths sum to at most ``budget`` (one item may exceed it)."""
    ends = np.cumsum(lengths)
    out, start, base = [], 0, 0
    while start < len(lengths):
        stop = max(int(np.searchsorted(ends, base + budget, "right")), start + 1)
        out.append(slice(start, stop))
        base = int(ends[stop - 1])
        start = stop
    return out
