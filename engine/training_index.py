"""Per-view index arrays behind :mod:`engine.training`: events in read order, and per column the
prefix counts and compensated sums, "last valid" indices, shifted sums for m2 and block tables
for min/max (built by :mod:`engine.training_kernels`, each in one pass over the events)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.definitions import Aggregation
from engine.errors import StoreError
from engine.training_kernels import BLOCK, block_extremes, column_index, levels, tie_order

__all__ = ["EventIndex", "as_float", "by_window", "event_order"]


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


def event_order(
    code: np.ndarray, ts: np.ndarray, part: np.ndarray | None, offset: np.ndarray | None
) -> np.ndarray:
    """Events by (entity code, time, partition, offset), the order the events path reads them in,
    so ``last`` picks the same event among equal timestamps."""
    n = len(code)
    if not n:
        return np.zeros(0, dtype=np.int64)
    tmin = int(ts.min())
    span = int(ts.max()) - tmin + 1
    if (int(code.max()) + 1) * span >= 2**62:
        raise StoreError(
            "training set spans too many entities and too long a time at once; split entity_df by time"
        )
    key = code * span + (ts - tmin)
    order = np.argsort(key).astype(np.int64, copy=False)
    if part is not None and offset is not None:
        tie_order(key, part.astype(np.int64), offset.astype(np.int64), order)
    return order


class EventIndex:
    """Sorted events (``code``, ``ts``, ``xs[column]``) and their per-column index arrays.

    ``m2_columns`` and ``extreme_columns`` name the columns that need shifted sums (stddev,
    variance) and min/max tables; the others get counts, sums and last-valid indices only.
    """

    def __init__(
        self,
        code: np.ndarray,
        ts: np.ndarray,
        xs: np.ndarray,
        n_entities: int,
        m2_columns: list[int],
        extreme_columns: list[tuple[int, bool]],
    ) -> None:
        n, width = len(ts), len(xs)
        self.ts = ts
        self.xs = xs
        self.bounds = np.searchsorted(code, np.arange(n_entities + 1)).astype(np.int64)
        self.cnt = np.empty((width, n + 1), dtype=np.int64)
        self.s_hi, self.s_lo = np.empty((width, n + 1)), np.empty((width, n + 1))
        self.last = np.empty((width, n), dtype=np.int64)
        self.m2_slot = np.full(width, -1, dtype=np.int64)
        self.m2_slot[m2_columns] = np.arange(len(m2_columns))
        k = len(m2_columns)
        self.d_hi, self.d_lo = np.empty((k, n + 1)), np.empty((k, n + 1))
        self.q_hi, self.q_lo = np.empty((k, n + 1)), np.empty((k, n + 1))
        none = np.empty(0)
        for c in range(width):
            slot = self.m2_slot[c]
            m2 = (
                (self.d_hi[slot], self.d_lo[slot], self.q_hi[slot], self.q_lo[slot])
                if slot >= 0
                else (none,) * 4
            )
            column_index(xs[c], self.bounds, self.cnt[c], self.s_hi[c], self.s_lo[c], self.last[c], *m2)
        self.mm_slot = np.full((width, 2), -1, dtype=np.int64)
        e = len(extreme_columns)
        self.pre, self.suf = np.empty((e, n)), np.empty((e, n))
        self.table = np.empty((e, levels(n), max((n + BLOCK - 1) // BLOCK, 1)))
        for slot, (c, want_min) in enumerate(extreme_columns):
            self.mm_slot[c, 0 if want_min else 1] = slot
            block_extremes(xs[c], want_min, self.pre[slot], self.suf[slot], self.table[slot])
