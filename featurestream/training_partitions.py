"""A view's training-set values computed one entity range at a time, in bounded memory.

The entities the rows ask for are sorted and cut into ranges of at most ``partition_events``
stored events each (counted from the ``entity`` column alone). Each range's events are read from
Delta with the entity filter pushed into the scan, indexed (:class:`engine.training.PreparedEvents`),
and its rows answered ``chunk_rows`` at a time; the values go to a temporary file per range (rows
in row order, one float64 per feature), and the index is dropped before the next range is read.
Output chunks are then assembled in row order by reading each range's contiguous slice back.

So memory holds one range's events and index plus one chunk, whatever the events' total; the
temporary files take ``rows x features x 8`` bytes of disk per view.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from connectors.delta_store import DeltaOfflineStore, event_schema
from engine.definitions import Aggregation, Derived, FeatureView
from engine.training import PreparedEvents, columnar

__all__ = ["PARTITION_EVENTS", "SpilledView", "partition_bounds", "read_window"]

PARTITION_EVENTS = 1_000_000
"""Stored events indexed at once per view (about 0.6 KB each while indexed, docs/offline.md)."""


COMPUTE_ROWS = 65_536
"""Rows answered per step (each needs ~1 KB of temporaries per row; smaller stays in cache)."""

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
    ) -> None:
        if partition_events < 1:
            raise ValueError(f"partition_events must be at least 1 (got {partition_events})")
        self.names = [f.feature_name for f in features]
        self._dir = tempfile.TemporaryDirectory(prefix="featurestream-training-")
        uniq = pc.unique(ids)
        uniq = uniq.take(pc.sort_indices(uniq))
        code = pc.index_in(ids, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
        readable = (latest or pin is not None) and len(at_ms) > 0
        columns = ["entity", "event_ts", *view.columns, "_partition", "_offset"]
        start, end = read_window(view, at_ms) if len(at_ms) else (None, None)
        counts = np.zeros(len(uniq), dtype=np.int64)
        few = (
            readable
            and (stored_rows(offline, uri, pin, start, end) or partition_events + 1) <= partition_events
        )
        if readable and not few:  # count each entity's events (the entity column alone)
            ent = offline.read(uri, entities=uniq, start=start, end=end, version=pin, columns=["entity"])
            if ent is not None and ent.num_rows:
                found = pc.index_in(ent.column("entity"), value_set=uniq).to_numpy(zero_copy_only=False)
                counts = np.bincount(found.astype(np.int64), minlength=len(uniq))
            del ent
        bounds = np.array([0, len(uniq)]) if few else partition_bounds(counts, partition_events)
        part = np.searchsorted(bounds, code, "right") - 1
        order = np.argsort(part, kind="stable")  # rows of a range stay in row order
        splits = np.searchsorted(part[order], np.arange(len(bounds)))
        self.rows: list[np.ndarray] = []
        self.paths: list[str] = []
        for p in range(len(bounds) - 1):
            rows = order[splits[p] : splits[p + 1]]
            if not len(rows):
                continue
            events = None
            if readable:
                wanted = uniq.slice(int(bounds[p]), int(bounds[p + 1] - bounds[p]))
                events = offline.read(
                    uri, entities=wanted, start=start, end=end, version=pin, columns=columns
                )
            if events is None:
                events = event_schema(view.columns, view.text_columns).empty_table()
            prepared = PreparedEvents(view, events)
            del events
            path = os.path.join(self._dir.name, f"{p}.f64")
            self._answer(prepared, ids.take(pa.array(rows)), at_ms[rows], features, chunk_rows, path)
            del prepared
            self.rows.append(rows)
            self.paths.append(path)

    def _answer(
        self,
        prepared: PreparedEvents,
        ids: pa.Array,
        at_ms: np.ndarray,
        features: Sequence[Aggregation | Derived],
        chunk_rows: int,
        path: str,
    ) -> None:
        """One range's rows (``ids``, ``at_ms``) answered step by step into the file ``path``."""
        codes = prepared.codes(ids)  # once per range, not per step
        step = min(chunk_rows, COMPUTE_ROWS)

        def block(s: int) -> np.ndarray:
            e = s + step
            values = prepared.values(ids.slice(s, step), at_ms[s:e], list(features), codes[s:e])
            return np.column_stack([values[n][0] for n in self.names]).astype(np.float64)

        starts = range(0, len(at_ms), step)
        with open(path, "wb") as f:
            block(0).tofile(f)  # builds the index's lazy parts; after that it is only read
            with ThreadPoolExecutor(WORKERS) as pool:  # numpy releases the GIL in its loops
                pending: deque[Future[np.ndarray]] = deque()
                for s in starts[1:]:
                    pending.append(pool.submit(block, s))
                    if len(pending) >= WORKERS:  # at most WORKERS steps in memory
                        pending.popleft().result().tofile(f)
                while pending:
                    pending.popleft().result().tofile(f)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Values of rows ``[start, stop)``, per feature."""
        width = len(self.names)
        out = np.full((stop - start, width), np.nan)
        for rows, path in zip(self.rows, self.paths, strict=True):
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                with open(path, "rb") as f:
                    f.seek(int(lo) * width * 8)
                    block = np.fromfile(f, np.float64, int(hi - lo) * width).reshape(-1, width)
                out[rows[lo:hi] - start] = block
        return {n: out[:, i] for i, n in enumerate(self.names)}  # strided views: arrow copies once

    def close(self) -> None:
        self._dir.cleanup()


def spillable(view: FeatureView, features: Sequence[Aggregation | Derived]) -> bool:
    """Whether every feature is a float: derived, or read from tile rows (others, such as text
    or list aggregations, may be objects, which stay on the per-chunk path)."""
    return all(isinstance(f, Derived) for f in features if not isinstance(f, Aggregation)) and columnar(
        view, [f for f in features if isinstance(f, Aggregation)]
    )
