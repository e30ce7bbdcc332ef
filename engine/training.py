"""Point-in-time feature values for many rows at once, compiled and bounded per row.

:func:`engine.reads.point_in_time_values` expands every event of every row's window, so its cost
grows with window length x rows. Here a view's stored events are sorted and indexed once
(:class:`PreparedEvents`, arrays from :mod:`engine.training_index`), and one compiled pass over
the rows (:func:`engine.training_kernels.window_rows`) computes every feature: a row's window is
the contiguous run of its entity's events between the bounds :func:`engine.tiles.window_tile_range`
gives (whole tiles, plus for sliding windows the head tile's events up to the row's time), found
by binary search; counts, sums, means and ``last`` are prefix differences, min/max come from
block tables, so the cost per row does not depend on window length, and no row ever sees an event
after its time.

Exactness: values equal the events path's up to float rounding (relative 1e-9, absolute 1e-9
near zero); counts, min, max and last exactly. Prefix sums are compensated (a running error term,
so differences lose nothing to the prefix's size); stddev/variance rows whose shifted sums could
cancel beyond that bound (values far from their entity's mean and nearly equal in the window)
are recomputed in two passes over the window, the one case whose cost grows with the window.

Memory: the events read plus 8 bytes per event and 40 per event and column (32 more for a
stddev/variance column, about 20 more for each of its min and max), and about 40 bytes per
feature and row for the rows asked at once. Views whose features are all computed here drop the
events table once indexed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.definitions import Aggregation, Derived, FeatureView
from engine.reads import FeatureValues, point_in_time_values, with_derived
from engine.tiles import TileLayout, window_tile_range
from engine.training_index import EventIndex, as_float, by_window, event_order
from engine.training_kernels import (
    COUNT,
    COUNT_ALL,
    LAST,
    MAX,
    MEAN,
    MIN,
    STDDEV,
    SUM,
    VARIANCE,
    window_rows,
)

__all__ = ["ENTITY_CODE", "SUPPORTED", "PreparedEvents", "columnar", "row_order", "training_values"]

SUPPORTED = frozenset({"count", "sum", "mean", "min", "max", "last", "stddev", "variance"})
"""Aggregation functions computed here (over tile windows); others, and session windows, go to
:func:`engine.reads.point_in_time_values`."""

CHUNK_ROWS = 262_144
_CODES = {
    "count": COUNT,
    "sum": SUM,
    "mean": MEAN,
    "min": MIN,
    "max": MAX,
    "last": LAST,
    "stddev": STDDEV,
    "variance": VARIANCE,
}


ENTITY_CODE = "_entity_code"
"""An optional column of events: each event's entity's position in ``entities``."""


class PreparedEvents:
    """A view's stored events, indexed once for point-in-time reads of many rows.

    ``entities``: the sorted entity ids rows will ask for, when the caller has them (row codes
    are then positions in it, and events of other entities are dropped); by default, the
    events' own entities. With ``entities``, an :data:`ENTITY_CODE` column of ``events`` saves
    looking each event's entity up.
    """

    def __init__(self, view: FeatureView, events: pa.Table, entities: pa.Array | None = None) -> None:
        self.view = view
        self.layout = layout = TileLayout.of(view)
        text = set(view.text_columns)
        mine = [a for a in view.aggregations if _supported(a, text)]
        # The events path answers what the kernel cannot; keep the events only for that.
        self.events = None if len(mine) == len(view.aggregations) else events
        ent = events.column("entity")
        if entities is None:
            uniq = pc.unique(ent)
            entities = uniq.take(pc.sort_indices(uniq))
        self.uniq = entities
        if ENTITY_CODE in events.column_names:  # the reader already looked the entities up
            code = events.column(ENTITY_CODE).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            code = pc.index_in(ent, value_set=entities).fill_null(-1).to_numpy(zero_copy_only=False)
            code = code.astype(np.int64)
        ts = pc.cast(events.column("event_ts"), pa.timestamp("ms", "UTC")).cast(pa.int64())
        ts = ts.to_numpy(zero_copy_only=False).astype(np.int64)
        part = offset = None
        if "_partition" in events.column_names:
            part = events.column("_partition").to_numpy(zero_copy_only=False)
            offset = events.column("_offset").to_numpy(zero_copy_only=False)
        known = np.flatnonzero(code >= 0)
        if len(known) < len(code):
            code, ts = code[known], ts[known]
            part = part[known] if part is not None else None
            offset = offset[known] if offset is not None else None
        else:
            known = None
        order = event_order(code, ts, part, offset)
        rows = order if known is None else known[order]
        xs = np.empty((len(layout.columns), len(order)))
        for i, c in enumerate(layout.columns):
            xs[i] = as_float(events.column(c))[rows]
        col = layout.columns.index
        m2 = sorted({col(a.column) for a in mine if a.function in ("stddev", "variance")})
        ext = sorted({(col(a.column), a.function == "min") for a in mine if a.function in ("min", "max")})
        self.n = len(order)
        self.index = EventIndex(code[order], ts[order], xs, len(entities), m2, ext)

    def codes(self, entity: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
        """Each entity's index in the stored entities, -1 for one with no events."""
        arr = entity if isinstance(entity, pa.Array | pa.ChunkedArray) else pa.array(entity, pa.string())
        found = pc.index_in(arr, value_set=self.uniq).fill_null(-1)
        return found.to_numpy(zero_copy_only=False).astype(np.int64)

    def values(
        self,
        entity: pa.Array | list[str],
        at_ms: np.ndarray,
        features: list[Aggregation | Derived],
        code: np.ndarray | None = None,
        times: bool = True,
    ) -> FeatureValues:
        """Values for each (``entity[i]``, ``at_ms[i]``), using only events up to ``at_ms[i]``.
        ``code``: :meth:`codes` of ``entity`` when the caller already has them (one lookup for
        many chunks). Without ``times``, event times are left out (NaN)."""
        at_ms = np.asarray(at_ms, dtype=np.int64)
        code = self.codes(entity) if code is None else code

        def compute(aggs: list[Aggregation]) -> FeatureValues:
            text = set(self.view.text_columns)
            mine = [a for a in aggs if _supported(a, text)]
            other = [a for a in aggs if not _supported(a, text)]
            vals, when = self.matrix(code, at_ms, mine, times)
            out: FeatureValues = {a.feature_name: (vals[i], when[i]) for i, a in enumerate(mine)}
            if other:
                if self.events is None:
                    raise ValueError(f"{other[0].feature_name} is not a feature of view {self.view.name!r}")
                strings = entity if isinstance(entity, list) else entity.to_pylist()
                out.update(point_in_time_values(self.view, self.events, strings, at_ms, other))
            return out

        return with_derived(self.view, features, compute)

    def matrix(
        self,
        code: np.ndarray,
        at_ms: np.ndarray,
        aggs: list[Aggregation],
        times: bool = True,
        ordered: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(values, times)``, each ``[feature, row]``, of ``aggs`` (all :func:`columnar`) for
        rows of entity codes ``code`` at ``at_ms``; times are NaN without ``times``. ``ordered``:
        the rows are already sorted by (code, time), as the kernel reads them fastest."""
        code = np.asarray(code, dtype=np.int64)
        if ordered or len(at_ms) <= 4096:
            vals, when = self._rows(code, at_ms, aggs, times)
        else:  # by (entity, time): a row's events are then mostly in cache
            order = row_order(code, at_ms)
            vals, when = np.empty((len(at_ms), len(aggs))), np.empty((len(at_ms) if times else 0, len(aggs)))
            vals[order], when[order if times else slice(None)] = self._rows(
                code[order], at_ms[order], aggs, times
            )
        return vals.T, (when.T if times else np.full((len(aggs), len(at_ms)), np.nan))

    def _rows(
        self, code: np.ndarray, at_ms: np.ndarray, aggs: list[Aggregation], times: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`matrix`, each ``[row, feature]`` (``times`` empty without them)."""
        m, tile_ms = len(at_ms), self.layout.tile_ms
        groups = by_window(aggs)
        starts = np.empty((len(groups), m), dtype=np.int64)
        ends = np.empty((len(groups), m), dtype=np.int64)
        f_group = np.empty(len(aggs), dtype=np.int64)
        where = {a.feature_name: i for i, a in enumerate(aggs)}
        for g, group in enumerate(groups):
            lo, hi, head = window_tile_range(group[0], tile_ms, at_ms)
            starts[g] = lo * tile_ms
            ends[g] = at_ms if head else (hi + 1) * tile_ms - 1
            for a in group:
                f_group[where[a.feature_name]] = g
        f_col = np.array([-1 if a.column is None else self.layout.columns.index(a.column) for a in aggs])
        f_fn = np.array([COUNT_ALL if a.column is None else _CODES[a.function] for a in aggs])
        vals = np.empty((m, len(aggs)))
        when = np.empty((m if times else 0, len(aggs)))
        x = self.index
        window_rows(
            code,
            starts,
            ends,
            x.bounds,
            x.ts,
            x.xs,
            x.cnt,
            x.s_hi,
            x.s_lo,
            x.last,
            x.m2_slot,
            x.d_hi,
            x.d_lo,
            x.q_hi,
            x.q_lo,
            x.mm_slot,
            x.pre,
            x.suf,
            x.table,
            f_group,
            f_col.astype(np.int64),
            f_fn.astype(np.int64),
            vals,
            when,
        )
        return vals, when


def _supported(agg: Aggregation, text_columns: set[str]) -> bool:
    """Whether ``agg`` is computed here (not a session window; of a text column only its count,
    the rest of text columns lives in object tiles)."""
    if agg.column in text_columns and agg.function != "count":
        return False
    return agg.function in SUPPORTED and agg.window.kind in ("sliding", "hopping", "tumbling")


def row_order(code: np.ndarray, at_ms: np.ndarray) -> np.ndarray:
    """Rows by (entity code, time): one argsort of a combined key where it fits in int64."""
    if not len(code):
        return np.zeros(0, dtype=np.int64)
    lo = int(at_ms.min())
    span = int(at_ms.max()) - lo + 1
    if (int(code.max()) + 2) * span >= 2**62:
        return np.lexsort((at_ms, code))
    return np.argsort((code + 1) * span + (at_ms - lo))


def columnar(view: FeatureView, aggs: list[Aggregation]) -> bool:
    """Whether all of ``aggs`` are computed here (none falls back to the events path)."""
    text = set(view.text_columns)
    return all(_supported(a, text) for a in aggs)


def training_values(
    view: FeatureView,
    events: pa.Table,
    entity: pa.Array | list[str],
    at_ms: np.ndarray,
    features: list[Aggregation | Derived],
    chunk_rows: int = CHUNK_ROWS,
) -> FeatureValues:
    """:func:`engine.reads.point_in_time_values`, compiled: the events are indexed once and rows
    are read ``chunk_rows`` at a time."""
    prepared = PreparedEvents(view, events)
    parts = list(_chunked(prepared, entity, np.asarray(at_ms, dtype=np.int64), features, chunk_rows))
    if len(parts) == 1:
        return parts[0]
    return {
        k: (np.concatenate([p[k][0] for p in parts]), np.concatenate([p[k][1] for p in parts]))
        for k in parts[0]
    }


def _chunked(
    prepared: PreparedEvents,
    entity: pa.Array | list[str],
    at_ms: np.ndarray,
    features: list[Aggregation | Derived],
    chunk_rows: int,
) -> Iterator[FeatureValues]:
    n = len(at_ms)
    for start in range(0, max(n, 1), chunk_rows):
        yield prepared.values(entity[start : start + chunk_rows], at_ms[start : start + chunk_rows], features)
