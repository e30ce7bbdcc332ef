"""A view's training-set values computed one entity range at a time, in bounded memory.

The entities the rows ask for are sorted and cut into ranges of at most ``partition_events``
stored events each (counted from the ``entity`` column alone). The events are read in one scan
(:mod:`featurestream.training_scan`) and written to one temporary Arrow file per range; each
range is then indexed (:class:`engine.training.PreparedEvents`) and its rows answered in
(entity, time) order, ``COMPUTE_ROWS`` at a time, the index dropped before the next range. Each
row's values (one float64 per feature, and the row's number) are appended to the temporary file
of the output chunk it falls in, so output chunks are assembled in row order by reading one file.

So memory holds one range's events and index plus one step and one chunk, whatever the events'
total; the temporary files take about ``events x 50`` bytes and ``rows x (features + 1) x 8``
bytes of disk per view.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from connectors.delta_store import DeltaOfflineStore, event_schema
from engine.definitions import Aggregation, Derived, FeatureView
from engine.training import PreparedEvents, columnar, row_order
from engine.training_kernels import scatter_rows
from featurestream.training_scan import count_events, read_events, route_events

__all__ = [
    "PARTITION_EVENTS",
    "RowEntities",
    "SpilledView",
    "entity_codes",
    "partition_bounds",
    "read_window",
    "row_entities",
]

PARTITION_EVENTS = 1_000_000
"""Stored events indexed at once per view (about 0.6 KB each while indexed, docs/offline.md)."""


COMPUTE_ROWS = 262_144
"""Rows answered per step (each needs ~20 bytes per feature while it is answered)."""

WORKERS = max(1, int(os.environ.get("FEATURESTREAM_TRAINING_THREADS", "1")))
"""Steps answered at once (threads over one read-only index). 1 by default: on a shared 2-core
machine 2 threads cut wall time ~8% for ~18% more CPU."""


def read_window(view: FeatureView, at_ms: np.ndarray) -> tuple[datetime | None, datetime]:
    """The event times rows at ``at_ms`` can see: back to the longest lookback (from the start of
    time for session windows, which may have opened long before)."""
    end = datetime.fromtimestamp(int(at_ms.max()) / 1000, UTC)
    if any(a.window.kind == "session" for a in view.aggregations):
        return None, end
    lookback: timedelta = view.max_lookback + view.tile_size
    return datetime.fromtimestamp(int(at_ms.min()) / 1000, UTC) - lookback, end


def stored_rows(
    offline: DeltaOfflineStore, uri: str, version: int | None, start: datetime | None, end: datetime | None
) -> int | None:
    """Rows in the Delta files of the dates ``[start, end]``, from the log's file statistics (no
    data read): an upper bound of the events a read returns. None when the log has no counts."""
    try:
        table = DeltaTable(uri, version=version, storage_options=offline.storage_options)
        files = pa.table(table.get_add_actions(flatten=True))
    except Exception:  # only a shortcut: without it, events are counted by reading them
        return None
    if "num_records" not in files.column_names or files.column("num_records").null_count:
        return None
    if "partition.date" in files.column_names:
        day = files.column("partition.date")
        keep = pa.scalar(True)
        if start is not None:
            keep = pc.and_(keep, pc.greater_equal(day, pa.scalar(start.date(), pa.date32())))
        if end is not None:
            keep = pc.and_(keep, pc.less_equal(day, pa.scalar(end.date(), pa.date32())))
        keep = pc.fill_null(keep, True)  # a file without a date may hold any time
        files = files.filter(keep)
    return int(pc.sum(files.column("num_records")).as_py() or 0)


def partition_bounds(counts: np.ndarray, budget: int) -> np.ndarray:
    """Cut points ``b`` over sorted entities: range ``[b[i], b[i+1])`` holds at most ``budget``
    events, or a single entity with more."""
    ends = np.cumsum(counts)
    bounds, base = [0], 0
    while bounds[-1] < len(counts):
        start = bounds[-1]
        stop = max(int(np.searchsorted(ends, base + budget, "right")), start + 1)
        bounds.append(stop)
        base = int(ends[stop - 1])
    return np.asarray(bounds, dtype=np.int64)


class SpilledView:
    """One view's feature values for every row, computed range by range and spilled to disk."""

    def __init__(
        self,
        offline: DeltaOfflineStore,
        view: FeatureView,
        features: Sequence[Aggregation | Derived],
        ids: pa.Array,
        at_ms: np.ndarray,
        uri: str,
        pin: int | None,
        latest: bool,
        chunk_rows: int,
        partition_events: int,
        entities: RowEntities | None = None,
    ) -> None:
        """``entities``: :func:`row_entities` of ``ids`` and ``at_ms``, when the caller has
        them (views sharing join keys share them)."""
        if partition_events < 1:
            raise ValueError(f"partition_events must be at least 1 (got {partition_events})")
        self.names = [f.feature_name for f in features]
        self._dir = tempfile.TemporaryDirectory(prefix="featurestream-training-")
        uniq, code, order = row_entities(ids, at_ms) if entities is None else entities
        readable = (latest or pin is not None) and len(at_ms) > 0
        columns = ["entity", "event_ts", *view.columns, "_partition", "_offset"]
        start, end = read_window(view, at_ms) if len(at_ms) else (None, None)
        counts = np.zeros(len(uniq), dtype=np.int64)
        few = (
            readable
            and (stored_rows(offline, uri, pin, start, end) or partition_events + 1) <= partition_events
        )
        if readable and not few:  # count each entity's events (the entity column alone)
            counts = count_events(offline, uri, pin, start, end, uniq)
        bounds = np.array([0, len(uniq)]) if few else partition_bounds(counts, partition_events)
        # ``order`` is by (entity, time): each range's rows are one run of it.
        splits = np.searchsorted(code[order], bounds)
        self.bucket_rows = max(chunk_rows, 1)
        self.ranges = 0
        routed = None
        if readable and len(bounds) > 2:  # one scan for all ranges, not one per range
            routed = route_events(offline, uri, pin, start, end, columns, uniq, bounds, self._dir.name)
        files: dict[int, BinaryIO] = {}
        try:
            for p in range(len(bounds) - 1):
                rows = order[splits[p] : splits[p + 1]]
                if not len(rows):
                    continue
                events = None
                if routed is not None:
                    if os.path.exists(routed[p]):
                        with pa.OSFile(routed[p]) as source:
                            events = pa.ipc.open_file(source).read_all()
                        os.unlink(routed[p])
                elif readable:  # the one range: all of uniq
                    events = read_events(offline, uri, pin, start, end, columns, uniq)
                if events is None:
                    events = event_schema(view.columns, view.text_columns).empty_table()
                prepared = PreparedEvents(
                    view, events, uniq.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p]))
                )
                del events
                self._answer(prepared, rows, code[rows] - bounds[p], at_ms[rows], features, files)
                del prepared
                self.ranges += 1
        finally:
            for f in files.values():
                f.close()

    def _path(self, bucket: int) -> str:
        return os.path.join(self._dir.name, f"rows-{bucket}.f64")

    def _answer(
        self,
        prepared: PreparedEvents,
        rows: np.ndarray,
        codes: np.ndarray,
        at_ms: np.ndarray,
        features: Sequence[Aggregation | Derived],
        files: dict[int, BinaryIO],
    ) -> None:
        """One range's ``rows`` (sorted by entity ``codes`` in the range, then ``at_ms``)
        answered step by step; each step's values, with their row numbers, are appended to the
        file of the output chunk (``bucket_rows`` rows) each row belongs to."""
        aggs = [f for f in features if isinstance(f, Aggregation)]
        plain = len(aggs) == len(features)
        width = len(self.names)

        def block(s: int) -> tuple[np.ndarray, np.ndarray]:
            e = s + COMPUTE_ROWS
            out = np.empty((len(at_ms[s:e]), width + 1))
            if plain:  # the kernel's [row, feature] matrix as it is
                out[:, :width] = prepared.matrix(codes[s:e], at_ms[s:e], aggs, times=False, ordered=True)[0].T
            else:
                values = prepared.values([], at_ms[s:e], list(features), codes[s:e], times=False)
                for i, n in enumerate(self.names):
                    out[:, i] = values[n][0]
            out[:, width] = rows[s:e]  # exact: row numbers are far below 2**53
            bucket = rows[s:e] // self.bucket_rows
            by = np.argsort(bucket, kind="stable")
            return out[by], bucket[by]

        def write(done: tuple[np.ndarray, np.ndarray]) -> None:
            out, bucket = done
            cuts = np.flatnonzero(np.diff(bucket)) + 1
            for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(bucket)], strict=True):
                b = int(bucket[lo])
                if b not in files:
                    files[b] = open(self._path(b), "ab")  # closed by the caller
                out[lo:hi].tofile(files[b])

        starts = range(0, len(at_ms), COMPUTE_ROWS)
        with ThreadPoolExecutor(WORKERS) as pool:  # the kernel releases the GIL
            pending: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque()
            for s in starts:
                pending.append(pool.submit(block, s))
                if len(pending) >= WORKERS:  # at most WORKERS steps in memory
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Values of rows ``[start, stop)``, per feature (NaN for rows no range answered)."""
        width = len(self.names)
        cols = np.full((width, stop - start), np.nan)  # by feature: arrow takes each as it is
        for b in range(start // self.bucket_rows, -(-stop // self.bucket_rows)):
            path = self._path(b)
            if os.path.exists(path):
                scatter_rows(np.fromfile(path, np.float64).reshape(-1, width + 1), start, cols)
        return {n: cols[i] for i, n in enumerate(self.names)}

    def close(self) -> None:
        self._dir.cleanup()


class RowEntities(NamedTuple):
    """Rows' entities: the distinct ids sorted (``uniq``), each row's position in them
    (``code``), and the rows ordered by (code, time) (``order``)."""

    uniq: pa.Array
    code: np.ndarray
    order: np.ndarray


def row_entities(ids: pa.Array, at_ms: np.ndarray) -> RowEntities:
    """:class:`RowEntities` of rows ``ids`` at ``at_ms`` (one hash pass, one sort)."""
    uniq, code = entity_codes(ids)
    return RowEntities(uniq, code, row_order(code, at_ms))


def entity_codes(ids: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The distinct ``ids`` sorted, and each row's position in them (one hash pass)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    enc = pc.dictionary_encode(ids)
    order = pc.sort_indices(enc.dictionary).to_numpy().astype(np.int64)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    code = rank[enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
    return enc.dictionary.take(pa.array(order, pa.int64())), code


def spillable(view: FeatureView, features: Sequence[Aggregation | Derived]) -> bool:
    """Whether every feature is a float: derived, or read from tile rows (others, such as text
    or list aggregations, may be objects, which stay on the per-chunk path)."""
    return all(isinstance(f, Derived) for f in features if not isinstance(f, Aggregation)) and columnar(
        view, [f for f in features if isinstance(f, Aggregation)]
    )
