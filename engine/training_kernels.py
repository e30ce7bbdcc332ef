"""Compiled kernels behind :mod:`engine.training`: per-event index arrays built in one pass, and
one pass over rows that computes every feature of a view.

Events are sorted by (entity, time, partition, offset); a row's window is a contiguous event range
``[a, b)`` of its entity, found by binary search between bounds from
:func:`engine.tiles.window_tile_range`. Per row and feature the work is O(1) in the window's
length: counts and compensated sums are prefix differences, ``last`` a "last valid" index, min/max
two within-block running values plus a sparse table over blocks of :data:`BLOCK` events.

Compiled with numba (``cache=True``: compiled once per machine, then loaded from
``__pycache__``); :func:`warm` compiles or loads them all and says how long it took.
"""

from __future__ import annotations

import time

import numba as nb
import numpy as np

__all__ = [
    "BLOCK",
    "COUNT",
    "COUNT_ALL",
    "LAST",
    "MAX",
    "MEAN",
    "MIN",
    "STDDEV",
    "SUM",
    "VARIANCE",
    "block_extremes",
    "column_index",
    "levels",
    "scatter_rows",
    "tie_order",
    "warm",
    "window_rows",
]

COUNT_ALL, COUNT, SUM, MEAN, MIN, MAX, LAST, STDDEV, VARIANCE = range(9)
BLOCK = 32  # events per min/max block: ranges up to 2 blocks are scanned, longer ones use the table
_CANCEL = 1e6  # shifted sums larger than this times m2 could lose 1e-10 of it: recompute the row
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@nb.njit(**_JIT)
def tie_order(key: np.ndarray, part: np.ndarray, offset: np.ndarray, order: np.ndarray) -> None:
    """Within runs of equal ``key[order]`` (entity and time), order by (partition, offset), in
    place: runs are short, so an insertion sort."""
    n = len(order)
    i = 0
    while i < n:
        j = i + 1
        while j < n and key[order[j]] == key[order[i]]:
            j += 1
        for p in range(i + 1, j):
            v = order[p]
            q = p - 1
            while q >= i and (part[order[q]], offset[order[q]]) > (part[v], offset[v]):
                order[q + 1] = order[q]
                q -= 1
            order[q + 1] = v
        i = j


@nb.njit(inline="always")
def _two_sum(hi: float, lo: float, v: float) -> tuple[float, float]:
    """``hi + v`` and the running error ``lo`` plus what that addition rounded away (TwoSum)."""
    t = hi + v
    bb = t - hi
    return t, lo + ((hi - (t - bb)) + (v - bb))


@nb.njit(**_JIT)
def column_index(
    x: np.ndarray,
    bounds: np.ndarray,
    cnt: np.ndarray,
    s_hi: np.ndarray,
    s_lo: np.ndarray,
    last: np.ndarray,
    d_hi: np.ndarray,
    d_lo: np.ndarray,
    q_hi: np.ndarray,
    q_lo: np.ndarray,
) -> None:
    """One column's index arrays, in place and in one pass per entity (``bounds``: each
    entity's first event): prefix counts of valid values, prefix sums as (sums, running rounding
    error) so ``hi + lo`` is exact up to O(eps^2) and a range's sum is as accurate as summing it
    directly, and the last valid index up to each event (-1: none). With ``d_hi`` non-empty, also
    prefix sums of values minus their entity's mean and of their squares: the sums behind m2
    then cancel only as far as a window's mean strays from the entity's."""
    m2 = len(d_hi) > 0
    c, sh, sl, dh, dl, qh, ql = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    cnt[0] = 0
    s_hi[0] = s_lo[0] = 0.0
    if m2:
        d_hi[0] = d_lo[0] = q_hi[0] = q_lo[0] = 0.0
    lv = -1
    for k in range(len(bounds) - 1):
        ref = 0.0
        if m2:
            s, n = 0.0, 0
            for i in range(bounds[k], bounds[k + 1]):
                if not np.isnan(x[i]):
                    s += x[i]
                    n += 1
            ref = s / n if n else 0.0
        for i in range(bounds[k], bounds[k + 1]):
            v = x[i]
            if not np.isnan(v):
                c += 1
                sh, sl = _two_sum(sh, sl, v)
                lv = i
                if m2:
                    d = v - ref
                    dh, dl = _two_sum(dh, dl, d)
                    qh, ql = _two_sum(qh, ql, d * d)
            cnt[i + 1] = c
            s_hi[i + 1] = sh
            s_lo[i + 1] = sl
            last[i] = lv
            if m2:
                d_hi[i + 1] = dh
                d_lo[i + 1] = dl
                q_hi[i + 1] = qh
                q_lo[i + 1] = ql


@nb.njit(inline="always")
def _ext(a: float, b: float, want_min: bool) -> float:
    """min or max ignoring NaN (as numpy's fmin/fmax)."""
    if np.isnan(a):
        return b
    if np.isnan(b):
        return a
    if want_min:
        return a if a <= b else b
    return a if a >= b else b


def levels(n: int) -> int:
    """Rows of :func:`block_extremes`' table for ``n`` events."""
    blocks = (n + BLOCK - 1) // BLOCK
    return max(blocks, 1).bit_length()


@nb.njit(**_JIT)
def block_extremes(
    x: np.ndarray, want_min: bool, pre: np.ndarray, suf: np.ndarray, table: np.ndarray
) -> None:
    """Running min/max from each block's start (``pre``) and to its end (``suf``), and a sparse
    table over blocks: ``table[k, j]`` is the min/max of blocks ``j .. j + 2**k - 1``; in place."""
    n = len(x)
    blocks = (n + BLOCK - 1) // BLOCK
    for s in range(0, n, BLOCK):
        e = min(s + BLOCK, n)
        acc = np.nan
        for i in range(s, e):
            acc = _ext(acc, x[i], want_min)
            pre[i] = acc
        acc = np.nan
        for i in range(e - 1, s - 1, -1):
            acc = _ext(acc, x[i], want_min)
            suf[i] = acc
    table[:] = np.nan
    for j in range(blocks):
        table[0, j] = suf[j * BLOCK]
    for k in range(1, table.shape[0]):
        h = 1 << (k - 1)
        for j in range(blocks - h):
            table[k, j] = _ext(table[k - 1, j], table[k - 1, j + h], want_min)


@nb.njit(inline="always")
def _range_ext(x, pre, suf, table, a, b, want_min):  # type: ignore[no-untyped-def]
    """min/max of ``x[a:b]`` (NaN if none valid)."""
    if b - a <= 2 * BLOCK:
        acc = np.nan
        for i in range(a, b):
            acc = _ext(acc, x[i], want_min)
        return acc
    acc = _ext(suf[a], pre[b - 1], want_min)
    j0 = a // BLOCK + 1
    j1 = (b - 1) // BLOCK  # whole blocks j0 .. j1 - 1
    if j1 > j0:
        k = 0
        while (2 << k) <= j1 - j0:
            k += 1
        acc = _ext(acc, _ext(table[k, j0], table[k, j1 - (1 << k)], want_min), want_min)
    return acc


@nb.njit(inline="always")
def _lower(ts, lo, hi, v):  # type: ignore[no-untyped-def]
    """First index in ``[lo, hi)`` with ``ts >= v`` (``hi`` if none)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if ts[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(**_JIT)
def window_rows(
    row_code: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    bounds: np.ndarray,
    ts: np.ndarray,
    xs: np.ndarray,
    cnt: np.ndarray,
    s_hi: np.ndarray,
    s_lo: np.ndarray,
    last: np.ndarray,
    m2_slot: np.ndarray,
    d_hi: np.ndarray,
    d_lo: np.ndarray,
    q_hi: np.ndarray,
    q_lo: np.ndarray,
    mm_slot: np.ndarray,
    pre: np.ndarray,
    suf: np.ndarray,
    table: np.ndarray,
    f_group: np.ndarray,
    f_col: np.ndarray,
    f_fn: np.ndarray,
    vals: np.ndarray,
    times: np.ndarray,
) -> None:
    """Every feature of every row, into ``vals[row, feature]`` (and ``times``, the newest event
    behind each value, unless it has no rows).

    Row r of entity ``row_code[r]`` (-1: no events) sees, for window group g, the events with
    times in ``[starts[g, r], ends[g, r]]``. Per column: ``cnt``/``s_hi``/``s_lo`` prefix counts
    and sums, ``last`` last-valid indices; columns with a ``m2_slot`` have shifted values ``d``
    prefix sums of shifted values and their squares; (column, min/max) with a ``mm_slot`` have block tables.
    """
    n_groups = starts.shape[0]
    n_feat = len(f_fn)
    with_times = times.shape[0] > 0
    ga = np.empty(n_groups, dtype=np.int64)
    gb = np.empty(n_groups, dtype=np.int64)
    for r in range(len(row_code)):
        c = row_code[r]
        e0 = bounds[c] if c >= 0 else 0
        e1 = bounds[c + 1] if c >= 0 else 0
        for g in range(n_groups):
            a = _lower(ts, e0, e1, starts[g, r])
            b = _lower(ts, a, e1, ends[g, r] + 1)
            ga[g] = a
            gb[g] = b
        for f in range(n_feat):
            a = ga[f_group[f]]
            b = gb[f_group[f]]
            col = f_col[f]
            fn = f_fn[f]
            if col < 0:  # count of events
                vals[r, f] = b - a
                if with_times:
                    times[r, f] = ts[b - 1] if b > a else np.nan
                continue
            n = cnt[col, b] - cnt[col, a]
            li = last[col, b - 1] if b > a else -1
            if with_times:
                times[r, f] = ts[li] if li >= a else np.nan
            if fn == COUNT:
                vals[r, f] = n
            elif fn == SUM or fn == MEAN:
                s = (s_hi[col, b] - s_hi[col, a]) + (s_lo[col, b] - s_lo[col, a])
                if fn == SUM:
                    vals[r, f] = s
                else:
                    vals[r, f] = s / n if n > 0 else np.nan
            elif fn == LAST:
                vals[r, f] = xs[col, li] if li >= a else np.nan
            elif fn == MIN or fn == MAX:
                k = mm_slot[col, 0 if fn == MIN else 1]
                vals[r, f] = _range_ext(xs[col], pre[k], suf[k], table[k], a, b, fn == MIN)
            else:  # STDDEV, VARIANCE
                if n < 2:
                    vals[r, f] = np.nan
                    continue
                k = m2_slot[col]
                dw = (d_hi[k, b] - d_hi[k, a]) + (d_lo[k, b] - d_lo[k, a])
                qw = (q_hi[k, b] - q_hi[k, a]) + (q_lo[k, b] - q_lo[k, a])
                m2 = max(qw - dw * dw / n, 0.0)
                if qw > _CANCEL * m2:  # the shifted sums cancelled: two passes over the window
                    mean = ((s_hi[col, b] - s_hi[col, a]) + (s_lo[col, b] - s_lo[col, a])) / n
                    s1, s2 = 0.0, 0.0
                    x = xs[col]
                    for i in range(a, b):
                        if not np.isnan(x[i]):
                            e = x[i] - mean
                            s1 += e
                            s2 += e * e
                    m2 = max(s2 - s1 * s1 / n, 0.0)
                var = m2 / (n - 1)
                vals[r, f] = np.sqrt(var) if fn == STDDEV else var


@nb.njit(**_JIT)
def scatter_rows(data: np.ndarray, start: int, cols: np.ndarray) -> None:
    """``cols[f, row - start] = data[i, f]`` for each ``data`` row i whose last column is a row
    number in ``[start, start + cols.shape[1])``: spilled values back in row order, by feature."""
    width, n = cols.shape
    for i in range(data.shape[0]):
        r = np.int64(data[i, width]) - start
        if 0 <= r < n:
            for f in range(width):
                cols[f, r] = data[i, f]


def warm() -> float:
    """Compile (or load from the on-disk cache) every kernel; returns the seconds it took."""
    t = time.perf_counter()
    x = np.array([1.0, np.nan, 3.0])
    key = np.zeros(3, dtype=np.int64)
    tie_order(key, key, key, np.arange(3, dtype=np.int64))
    bounds = np.array([0, 3], dtype=np.int64)
    i1, i2, f1, f2 = (
        np.zeros(4, dtype=np.int64),
        np.zeros((1, 4), dtype=np.int64),
        np.zeros(4),
        np.zeros((1, 4)),
    )
    column_index(x, bounds, i1, f1, f1, key, f1, f1, f1, f1)
    block_extremes(x, True, f1, f1, f2)
    scatter_rows(f2, 0, np.zeros((3, 1)))
    one = np.zeros(1, dtype=np.int64)
    window_rows(
        one, one[:, None], one[:, None], bounds, key, x[None, :], i2, f2, f2, i2[:, :3], one,
        f2, f2, f2, f2, np.zeros((1, 2), dtype=np.int64), x[None, :], x[None, :], np.zeros((1, 1, 1)),
        one, one, one, np.zeros((1, 1)), np.zeros((1, 1)),
    )  # fmt: skip
    return time.perf_counter() - t
