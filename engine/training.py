"""Point-in-time feature values for many rows at once, columnar and bounded per row.

:func:`engine.reads.point_in_time_values` expands every event of every row's window, so its cost
grows with window length x rows. Here a view's stored events are indexed once
(:class:`PreparedEvents`): sorted per entity, cut into the stream's tiles (the same partials
:func:`engine.tiles.partials_from_events` builds), with prefix sums over tiles (count, sum, and
the shifted sums m2 needs), a sparse table per column for min/max, and "last valid" indices.
A row's window is whole tiles (O(1) per row from those structures) plus, for sliding windows,
the head tile's events up to the row's time (O(1) too, from running in-tile sums). So the cost per
row does not depend on window length, and no row ever sees an event after its time.

Exactness: values equal the events path's up to float rounding (relative 1e-9, absolute 1e-9
near zero); counts, min, max and last exactly. Prefix sums are compensated (a running error term,
so differences lose nothing to the prefix's size); stddev/variance rows whose shifted sums could
cancel beyond that bound are recomputed tile by tile with :func:`engine.tiles.combine`, as the
events path combines them.

Memory: the events read plus about 11 floats per event and aggregated column, about 19 per tile
and column, and ``log2(longest run of tiles in a window) + 1`` per tile for each min/max column
(docs/offline.md has the figures). Rows are processed ``chunk_rows`` at a time, each chunk
needing O(chunk x features).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.definitions import Aggregation, Derived, FeatureView
from engine.errors import StoreError
from engine.reads import FeatureValues, point_in_time_values, with_derived
from engine.tiles import (
    CNT,
    LAST,
    LTS,
    M2,
    MAX,
    MAXTS,
    MIN,
    SUM,
    N,
    TileLayout,
    combine,
    event_time,
    finalize,
    partials_from_events,
    window_tile_range,
)
from engine.training_index import (
    Column,
    as_float,
    between,
    by_window,
    counts,
    expand,
    gather,
    slices,
    take,
)

__all__ = ["SUPPORTED", "PreparedEvents", "columnar", "training_values"]

SUPPORTED = frozenset({"count", "sum", "mean", "min", "max", "last", "stddev", "variance"})
"""Aggregation functions computed here (over tile windows); others, and session windows, go to
:func:`engine.reads.point_in_time_values`."""

CHUNK_ROWS = 262_144
_CANCEL = 1e6  # shifted sums larger than this times m2 could lose 1e-10 of it: recompute those rows


class PreparedEvents:
    """A view's stored events, indexed once for point-in-time reads of many rows.

    Events are ordered as the events path orders them (entity, time, partition, offset), so
    ``last`` picks the same event among equal timestamps.
    """

    def __init__(self, view: FeatureView, events: pa.Table) -> None:
        self.view = view
        self.events = events
        self.layout = layout = TileLayout.of(view)
        ent = events.column("entity")
        uniq = pc.unique(ent)
        self.uniq = uniq.take(pc.sort_indices(uniq))
        code = pc.index_in(ent, value_set=self.uniq).to_numpy(zero_copy_only=False).astype(np.int64)
        ts = pc.cast(events.column("event_ts"), pa.timestamp("ms", "UTC")).cast(pa.int64())
        ts = ts.to_numpy(zero_copy_only=False).astype(np.int64)
        keys = [ts, code]
        if "_partition" in events.column_names:
            part = events.column("_partition").to_numpy(zero_copy_only=False)
            keys = [events.column("_offset").to_numpy(zero_copy_only=False), part, *keys]
        order = np.lexsort(keys)
        self.n = n = len(order)
        self.code = code[order]
        self.ts = ts[order]
        self.ts_f = self.ts.astype(np.float64)
        tile = self.ts // layout.tile_ms
        self.tmin = int(self.ts.min()) if n else 0
        self.span = int(self.ts.max()) - self.tmin + 2 if n else 2
        if (len(self.uniq) + 1) * self.span >= 2**62:
            raise StoreError(
                "training set spans too many entities and too long a time at once; split entity_df by time"
            )
        self.key = self.code * self.span + (self.ts - self.tmin)
        cut = np.ones(n, dtype=bool)
        cut[1:] = (self.code[1:] != self.code[:-1]) | (tile[1:] != tile[:-1])
        starts = np.flatnonzero(cut)
        self.tile_of_event = np.cumsum(cut) - 1
        self.first = starts[self.tile_of_event]
        self.cols = [as_float(events.column(c))[order] for c in layout.columns]
        _, rows = partials_from_events(layout, self.tile_of_event, tile, self.ts, self.cols)
        self.tiles = rows
        self.tile_code = self.code[starts]
        tile_no = tile[starts]
        self.tmin_tile = int(tile_no.min()) if n else 0
        if n and int(tile_no.max()) - self.tmin_tile >= 2**31:
            raise StoreError("stored events span more than 2**31 tiles; split entity_df by time")
        self.tile_key = (self.tile_code << 32) | (tile_no - self.tmin_tile)
        self.tile_n = counts(rows[:, N])
        self._columns: dict[str, Column] = {}

    def column(self, name: str) -> Column:
        if name not in self._columns:
            b = self.layout.base(name)
            x = self.cols[self.layout.columns.index(name)]
            self._columns[name] = Column(
                x, self.tiles[:, b : b + LAST + 1], self.tile_code, self.tile_of_event
            )
        return self._columns[name]

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
    ) -> FeatureValues:
        """Values for each (``entity[i]``, ``at_ms[i]``), using only events up to ``at_ms[i]``.
        ``code``: :meth:`codes` of ``entity`` when the caller already has them (one lookup for
        many chunks)."""
        at_ms = np.asarray(at_ms, dtype=np.int64)
        code = self.codes(entity) if code is None else code
        order = _row_order(code, at_ms)  # sorted lookups stay in cache
        s_code, s_at = code[order], at_ms[order]

        def compute(aggs: list[Aggregation]) -> FeatureValues:
            text = set(self.view.text_columns)
            mine = [a for a in aggs if _supported(a, text)]
            other = [a for a in aggs if not _supported(a, text)]
            out: FeatureValues = {}
            memo: dict[object, np.ndarray] = {}
            for group in by_window(mine):
                for name, (vals, times) in self._window_values(s_code, s_at, group, memo).items():
                    back = np.empty_like(vals), np.empty_like(times)
                    back[0][order], back[1][order] = vals, times
                    out[name] = back
            if other:
                out.update(point_in_time_values(self.view, self.events, _strings(entity), at_ms, other))
            return out

        return with_derived(self.view, features, compute)

    def _ranges(
        self, code: np.ndarray, at_ms: np.ndarray, agg: Aggregation, memo: dict[object, np.ndarray]
    ) -> tuple[np.ndarray, ...]:
        """Per row: its window's whole tiles ``[j0, j1)`` and head-tile events ``[ha, hb)``.
        ``memo`` shares what windows of one kind have in common (their ends) across calls."""
        lo, hi, head = window_tile_range(agg, self.layout.tile_ms, at_ms)
        whole_hi = hi - 1 if head else hi
        known = code >= 0
        c = np.where(known, code, 0)
        top = 2**32 - 1
        base = c << 32
        j0 = np.searchsorted(self.tile_key, base | np.clip(lo - self.tmin_tile, 0, top), "left")
        end_key = ("end", head, agg.window.hop_or_size if not head else None)
        if end_key not in memo:
            rel_hi = whole_hi - self.tmin_tile
            j1 = np.searchsorted(self.tile_key, base | np.clip(rel_hi, 0, top), "right")
            memo[end_key] = np.where(known & (rel_hi >= 0), j1, -1)
        j1 = memo[end_key]
        j1 = np.where(j1 >= 0, np.maximum(j1, j0), j0)
        if not head:
            return j0, j1, j0[:0], j0[:0]
        if "head" not in memo:
            ebase = c * self.span
            start = np.clip(hi * self.layout.tile_ms - self.tmin, 0, self.span - 1)
            end = at_ms - self.tmin
            ha = np.searchsorted(self.key, ebase + start, "left")
            hb = np.searchsorted(self.key, ebase + np.clip(end, 0, self.span - 1), "right")
            memo["head"] = ha
            memo["head_end"] = np.where(known & (end >= 0), np.maximum(hb, ha), ha)
        return j0, j1, memo["head"], memo["head_end"]

    def _window_values(
        self, code: np.ndarray, at_ms: np.ndarray, group: list[Aggregation], memo: dict[object, np.ndarray]
    ) -> FeatureValues:
        layout = self.layout
        if self.n and len(code):
            # Only the slots the group's features read are filled (and read), so no identity fill.
            partial = np.empty((len(code), layout.width))
            self._fill(partial, code, at_ms, group, memo)
        else:
            partial = layout.empty(len(code))
        out: FeatureValues = {}
        for agg in group:
            out[agg.feature_name] = (finalize(layout, partial, agg), event_time(layout, partial, agg))
        return out

    def _fill(
        self,
        partial: np.ndarray,
        code: np.ndarray,
        at_ms: np.ndarray,
        group: list[Aggregation],
        memo: dict[object, np.ndarray],
    ) -> None:
        """Combined partials of each row's window into ``partial``."""
        layout = self.layout
        j0, j1, ha, hb = self._ranges(code, at_ms, group[0], memo)
        has_head = len(ha) > 0
        nh = (hb - ha) if has_head else np.zeros(len(code), dtype=np.int64)
        whole = j1 > j0
        partial[:, N] = between(self.tile_n, j0, j1) + nh
        tile_ts = gather(self.tiles[:, MAXTS], j1 - 1, whole)
        if has_head:
            tile_ts = np.where(nh > 0, gather(self.ts_f, hb - 1, nh > 0), tile_ts)
        partial[:, MAXTS] = tile_ts
        functions: dict[str, set[str]] = {}
        for a in group:
            if a.column is not None:
                functions.setdefault(a.column, set()).add(a.function)
        levels = int((j1 - j0).max(initial=1)).bit_length()  # floor(log2) + 1
        for name, funcs in functions.items():
            col = self.column(name)
            o = layout.base(name)
            cw, sw = between(col.cnt, j0, j1), between(col.sum, j0, j1)
            ch = between(col.ev_cnt, ha, hb) if has_head else np.zeros_like(cw)
            sh = between(col.ev_sum, ha, hb) if has_head else np.zeros_like(sw)
            cnt = cw + ch
            partial[:, o + CNT] = cnt
            partial[:, o + SUM] = sw + sh
            if funcs & {"stddev", "variance"}:
                doubt = self._m2(partial[:, o + M2], col, j0, j1, ha, hb, cw, sw, ch, sh)
                if doubt.any():  # the shifted sums may have cancelled: combine those rows' tiles
                    r = np.flatnonzero(doubt)
                    partial[r, o + M2] = self._exact(r, j0, j1, ha, hb)[:, o + M2]
            for fn, slot in (("min", MIN), ("max", MAX)):
                if fn in funcs:
                    partial[:, o + slot] = self._extreme(col, fn, levels, j0, j1, ha, hb, nh)
            self._last(partial, o, col, j0, j1, ha, hb, nh)  # also every column feature's event time

    def _exact(self, rows: np.ndarray, j0, j1, ha, hb) -> np.ndarray:  # type: ignore[no-untyped-def]
        """Partials of ``rows``' windows combined tile by tile as the events path does
        (:func:`engine.tiles.combine`), in slices of bounded size."""
        layout = self.layout
        out = layout.empty(len(rows))
        tiles_n = j1[rows] - j0[rows]
        head_n = (hb[rows] - ha[rows]) if len(ha) else np.zeros_like(tiles_n)
        for part in slices(tiles_n + head_n):
            r = rows[part]
            k = len(r)
            lt = j1[r] - j0[r]
            parts = [self.tiles[expand(j0[r], lt)]]
            groups = [np.repeat(np.arange(k), lt)]
            if len(ha):
                le = hb[r] - ha[r]
                ev = expand(ha[r], le)
                g = np.repeat(np.arange(k), le)
                keys, head = partials_from_events(
                    layout, g, self.ts[ev] // layout.tile_ms, self.ts[ev], [c[ev] for c in self.cols]
                )
                parts.append(head)
                groups.append(keys)
            out[part] = combine(layout, np.concatenate(parts), np.concatenate(groups), k)
        return out

    def _m2(self, out, col, j0, j1, ha, hb, cw, sw, ch, sh) -> np.ndarray:  # type: ignore[no-untyped-def]
        with np.errstate(invalid="ignore", divide="ignore"):
            dw, qw = between(col.cd, j0, j1), between(col.cd2, j0, j1)
            m2w = between(col.m2, j0, j1) + np.where(cw > 0, np.maximum(qw - dw * dw / cw, 0.0), 0.0)
            if len(ha):
                dh, qh = between(col.ev_d, ha, hb), between(col.ev_d2, ha, hb)
                m2h = np.where(ch > 0, np.maximum(qh - dh * dh / ch, 0.0), 0.0)
                delta = sh / ch - sw / cw
                cross = np.where((cw > 0) & (ch > 0), delta * delta * cw * ch / (cw + ch), 0.0)
            else:
                qh = m2h = cross = np.zeros_like(cw)
            m2 = m2w + m2h + cross
            out[:] = m2
            return (cw + ch > 1) & (np.maximum(qw, qh) > _CANCEL * m2)

    def _extreme(self, col, fn, levels, j0, j1, ha, hb, nh) -> np.ndarray:  # type: ignore[no-untyped-def]
        ufunc = np.fmin if fn == "min" else np.fmax
        length = j1 - j0
        some = length > 0
        if some.any():
            table = col.sparse_table(fn, levels)
            k = np.where(some, np.log2(np.maximum(length, 1)).astype(np.int64), 0)
            t = len(col.tiles) - 1
            a = table[k, np.clip(j0, 0, t)]
            b = table[k, np.clip(j1 - (1 << k), 0, t)]
            whole = np.where(some, ufunc(a, b), np.nan)
        else:
            whole = np.full(len(j0), np.nan)
        if not len(ha):
            return whole
        head = gather(col.running(fn, self.first), hb - 1, nh > 0)
        return ufunc(whole, head)

    def _last(self, partial, o, col, j0, j1, ha, hb, nh) -> None:  # type: ignore[no-untyped-def]
        # Integer gathers of the "last valid" indices (-1: none yet), no float copies of them.
        lv = take(col.last_tile, j1 - 1)
        ok = (j1 > j0) & (lv >= j0)
        pick = np.where(ok, lv, 0)
        lts = gather(col.tiles[:, LTS - CNT], pick, ok)
        last = gather(col.tiles[:, LAST - CNT], pick, ok)
        if len(ha):
            le = take(col.last_event, hb - 1)
            okh = (nh > 0) & (le >= ha)
            pe = np.where(okh, le, 0)
            lts = np.where(okh, gather(self.ts_f, pe, okh), lts)
            last = np.where(okh, gather(col.x, pe, okh), last)
        partial[:, o + LTS] = lts
        partial[:, o + LAST] = last


def _supported(agg: Aggregation, text_columns: set[str]) -> bool:
    """Whether ``agg`` is read from tile rows (not a session window; of a text column only its
    count, the rest of text columns lives in object tiles)."""
    if agg.column in text_columns and agg.function != "count":
        return False
    return agg.function in SUPPORTED and agg.window.kind in ("sliding", "hopping", "tumbling")


def _row_order(code: np.ndarray, at_ms: np.ndarray) -> np.ndarray:
    """Rows by (entity code, time): one argsort of a combined key where it fits in int64."""
    if not len(code):
        return np.zeros(0, dtype=np.int64)
    lo = int(at_ms.min())
    span = int(at_ms.max()) - lo + 1
    if (int(code.max()) + 2) * span >= 2**62:
        return np.lexsort((at_ms, code))
    return np.argsort((code + 1) * span + (at_ms - lo))


def columnar(view: FeatureView, aggs: list[Aggregation]) -> bool:
    """Whether all of ``aggs`` are read from tile rows here (none falls back to the events path)."""
    text = set(view.text_columns)
    return all(_supported(a, text) for a in aggs)


def _strings(entity: pa.Array | pa.ChunkedArray | list[str]) -> list[str]:
    return entity if isinstance(entity, list) else entity.to_pylist()


def training_values(
    view: FeatureView,
    events: pa.Table,
    entity: pa.Array | list[str],
    at_ms: np.ndarray,
    features: list[Aggregation | Derived],
    chunk_rows: int = CHUNK_ROWS,
) -> FeatureValues:
    """:func:`engine.reads.point_in_time_values`, columnar: the events are indexed once and rows
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
