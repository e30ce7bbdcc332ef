"""Online reads for the server: every requested feature of a view in one pass, with a status.

:func:`engine.reads.online_values` combines tiles once per window. A request for 50 features over
five windows would pay that fixed cost (tens of numpy calls) five times per request, which is most
of a request's time for a single entity. Here the rows of every window are gathered at once and
combined with one :func:`engine.tiles.combine` call (group = entity x window), then each distinct
(function, column) is finalized once. The rows, their order within each group, ``combine`` and
``finalize`` are the engine's own, so the values equal ``online_values`` (a test checks it).

Status per value (the names Feast uses):

* ``NOT_FOUND``: Redis holds nothing for the entity (never seen, or its keys expired).
* ``OUTSIDE_MAX_AGE``: the entity's newest event is older than the view's TTL as of the read
  (``ttl``, default longest lookback + one tile): its state is stale, every window is empty.
* ``NULL_VALUE``: the entity is live but this feature's window holds no value (a mean of nothing).
* ``PRESENT``: a value (0 is a value for ``count`` and ``sum``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.definitions import Aggregation, FeatureView, duration_ms
from engine.reads import _current_tiles
from engine.tiles import MAXTS, TILE, TileLayout, combine, event_time, finalize, window_tile_range

__all__ = ["STATUSES", "Block", "Plan", "ViewReader"]

PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE, NULL_VALUE = range(4)
STATUSES = np.array(["PRESENT", "NOT_FOUND", "OUTSIDE_MAX_AGE", "NULL_VALUE"], dtype=object)


@dataclass(frozen=True)
class Block:
    """Values of ``F`` features for ``n`` entities: rows are features, columns entities."""

    values: np.ndarray  # (F, n) float64, NaN = null
    times: np.ndarray  # (F, n) float64 epoch ms of the newest event behind each value, NaN = none
    status: np.ndarray  # (F, n) int8 index into STATUSES
    counts: np.ndarray  # (F,) bool: a count (integer values)


class ViewReader:
    """Reads features of one view version from packed tile logs (see module docstring)."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self.layout = TileLayout.of(view)
        self.ttl_ms = duration_ms(view.effective_ttl)
        windows: dict[tuple, int] = {}
        self._window: dict[str, int] = {}  # feature -> window index
        self._first: list[Aggregation] = []  # one aggregation per window, for its tile range
        for a in view.aggregations:
            w = (a.window.kind, a.window.size, a.window.hop)
            if w not in windows:
                windows[w] = len(windows)
                self._first.append(a)
            self._window[a.feature_name] = windows[w]
        self.n_windows = len(windows)

    def plan(self, aggs: list[Aggregation]) -> Plan:
        """Index arrays to read ``aggs`` in one pass (made once per distinct request shape)."""
        finals: dict[tuple[str, str | None], int] = {}
        times: dict[str | None, int] = {}
        first: list[Aggregation] = []
        time_first: list[Aggregation] = []
        for a in aggs:
            if (a.function, a.column) not in finals:
                finals[(a.function, a.column)] = len(finals)
                first.append(a)
            if a.column not in times:
                times[a.column] = len(times)
                time_first.append(a)
        return Plan(
            aggs=list(aggs),
            windows=sorted({self._window[a.feature_name] for a in aggs}),
            final_aggs=first,
            time_aggs=time_first,
            final_idx=np.array([finals[(a.function, a.column)] for a in aggs], np.int64),
            time_idx=np.array([times[a.column] for a in aggs], np.int64),
            window_idx=np.array([self._window[a.feature_name] for a in aggs], np.int64),
            counts=np.array([a.function == "count" for a in aggs], bool),
        )

    def read(self, blobs: list[bytes], at_ms: int, aggs: list[Aggregation] | Plan) -> Block:
        """Values of ``aggs`` (or a :meth:`plan` of them) for the entities whose tile logs are
        ``blobs``, as of ``at_ms``."""
        plan = aggs if isinstance(aggs, Plan) else self.plan(aggs)
        layout, n, g_count = self.layout, len(blobs), self.n_windows
        counts = np.fromiter((len(b) // layout.row_bytes for b in blobs), np.int64, n)
        rows, gid = _current_tiles(layout, blobs, counts)
        t = np.array([at_ms], dtype=np.int64)
        lo = np.empty(len(plan.windows), np.int64)
        hi = np.empty(len(plan.windows), np.int64)
        for j, g in enumerate(plan.windows):
            lo_g, hi_g, _ = window_tile_range(self._first[g], layout.tile_ms, t)
            lo[j], hi[j] = lo_g[0], hi_g[0]
        tile = rows[:, TILE]
        member = (tile[None, :] >= lo[:, None]) & (tile[None, :] <= hi[:, None])
        which, ri = np.nonzero(member)  # window-major; rows keep their order within each window
        windows = np.asarray(plan.windows, np.int64)[which]
        partial = combine(layout, rows[ri], gid[ri] * g_count + windows, n * g_count)
        finals = np.stack([finalize(layout, partial, a) for a in plan.final_aggs]).reshape(-1, n, g_count)
        stamps = np.stack([event_time(layout, partial, a) for a in plan.time_aggs]).reshape(-1, n, g_count)
        values = finals[plan.final_idx, :, plan.window_idx]  # (F, n)
        times = stamps[plan.time_idx, :, plan.window_idx]

        has_data = np.bincount(gid, minlength=n) > 0
        newest = np.full(n, np.nan)
        np.fmax.at(newest, gid, rows[:, MAXTS])
        with np.errstate(invalid="ignore"):
            stale = has_data & (newest < at_ms - self.ttl_ms)
        status = np.where(np.isnan(values), NULL_VALUE, PRESENT).astype(np.int8)
        status[:, stale] = OUTSIDE_MAX_AGE
        status[:, ~has_data] = NOT_FOUND
        return Block(values, times, status, plan.counts)


@dataclass(frozen=True)
class Plan:
    """How to read a list of aggregations of one view in one pass (see :meth:`ViewReader.plan`)."""

    aggs: list[Aggregation]
    windows: list[int]
    final_aggs: list[Aggregation]
    time_aggs: list[Aggregation]
    final_idx: np.ndarray
    time_idx: np.ndarray
    window_idx: np.ndarray
    counts: np.ndarray
