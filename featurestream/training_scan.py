"""Reading a view's stored events for a training set: one streaming Delta scan, each event's
entity looked up once among the entities the rows ask for.

A scan filters by time as :meth:`connectors.delta_store.DeltaOfflineStore.read` does (date
partitions, then ``event_ts``), but looks entities up itself, about a million events at a time:
an ``isin`` filter in the scan would hash the whole entity list again for every batch, which at
hundreds of thousands of entities costs more than reading the events.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.delta_store import DeltaOfflineStore
from engine.training import ENTITY_CODE

__all__ = ["COALESCE", "count_events", "read_events", "route_events", "scan"]

COALESCE = 1 << 20
"""Events looked up at once (one hash table of the entities per step)."""


def scan(
    offline: DeltaOfflineStore,
    uri: str,
    version: int | None,
    start: datetime | None,
    end: datetime | None,
    columns: list[str],
    entities: pa.Array,
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """The events of ``entities`` with times in ``[start, end]``, about :data:`COALESCE` at a time,
    with each event's position in ``entities`` (nothing if the table does not exist)."""
    batches = offline.batches(uri, columns, start, end, version)
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        if batch.num_rows:
            pending.append(batch)
            size += batch.num_rows
        if size >= COALESCE:
            yield _looked_up(pending, entities)
            pending, size = [], 0
    if pending:
        yield _looked_up(pending, entities)


def _looked_up(batches: list[pa.RecordBatch], entities: pa.Array) -> tuple[pa.Table, np.ndarray]:
    events = pa.Table.from_batches(batches)
    code = pc.index_in(events.column("entity"), value_set=entities).fill_null(-1)
    code = code.to_numpy(zero_copy_only=False).astype(np.int64)
    keep = code >= 0
    if not keep.all():  # events of entities no row asks for
        events, code = events.filter(pa.array(keep)), code[keep]
    return events, code


def count_events(
    offline: DeltaOfflineStore,
    uri: str,
    version: int | None,
    start: datetime | None,
    end: datetime | None,
    entities: pa.Array,
) -> np.ndarray:
    """Stored events per entity of ``entities`` (the entity column alone is read)."""
    counts = np.zeros(len(entities), dtype=np.int64)
    for _, code in scan(offline, uri, version, start, end, ["entity"], entities):
        counts += np.bincount(code, minlength=len(entities))
    return counts


def read_events(
    offline: DeltaOfflineStore,
    uri: str,
    version: int | None,
    start: datetime | None,
    end: datetime | None,
    columns: list[str],
    entities: pa.Array,
) -> pa.Table | None:
    """:func:`scan`'s events as one table, each event's position in ``entities`` in its
    :data:`engine.training.ENTITY_CODE` column (None: no events)."""
    parts = [
        events.append_column(ENTITY_CODE, pa.array(code.astype(np.int32)))
        for events, code in scan(offline, uri, version, start, end, columns, entities)
    ]
    return pa.concat_tables(parts) if parts else None


def route_events(
    offline: DeltaOfflineStore,
    uri: str,
    version: int | None,
    start: datetime | None,
    end: datetime | None,
    columns: list[str],
    entities: pa.Array,
    bounds: np.ndarray,
    directory: str,
) -> list[str]:
    """:func:`scan`'s events written to one Arrow file per entity range ``[bounds[p],
    bounds[p + 1])`` of ``entities``, each event's position in its range in an
    :data:`engine.training.ENTITY_CODE` column; returns the files' paths (absent: no events)."""
    paths = [os.path.join(directory, f"{p}.arrow") for p in range(len(bounds) - 1)]
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    try:
        for events, code in scan(offline, uri, version, start, end, columns, entities):
            part = np.searchsorted(bounds, code, "right") - 1
            order = np.argsort(part, kind="stable")
            local = pa.array((code - bounds[part])[order].astype(np.int32))
            events = events.take(pa.array(order)).append_column(ENTITY_CODE, local)
            cuts = np.searchsorted(part[order], np.arange(len(bounds)))
            for p in np.flatnonzero(np.diff(cuts)).tolist():
                if p not in writers:
                    writers[p] = pa.ipc.new_file(paths[p], events.schema)
                writers[p].write_table(events.slice(int(cuts[p]), int(cuts[p + 1] - cuts[p])))
    finally:
        for w in writers.values():
            w.close()
    return paths
