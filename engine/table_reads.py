"""Table-view values: current ones from the online store, and as of any time from the change log.

Offline, the table as it was at ``t`` is rebuilt from the stored change log with pyarrow (already
the offline store's format, so no copy and no extra dependency; its hash join and grouped
aggregates are vectorised C++): per primary key, changes are put in position order (duplicates of
one position dropped), each takes effect at its event time (no earlier than the change before
it), and holds until the next one. A training row at ``t`` sees the row versions in effect at
``t`` of its entity, so no row sees a later change. Memory is the change log of the entities
asked about, joined with their query times.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import StoreError
from engine.table_definitions import TableFeature, TableView

__all__ = ["online_table_values", "point_in_time_table"]

_NEVER = np.iinfo(np.int64).max


def online_table_values(
    view: TableView, found: list[tuple[int | None, list[Any] | None]], features: list[TableFeature]
) -> dict[str, tuple[list[Any], np.ndarray]]:
    """Per feature: the values of each entity (an unknown entity counts 0 and is null otherwise),
    and the time of the newest change behind them (ms, NaN if none)."""
    where = {f.feature_name: i for i, f in enumerate(view.features)}
    times = np.array([np.nan if ts is None else ts for ts, _ in found], dtype=np.float64)
    out = {}
    for f in features:
        i = where[f.feature_name]
        empty = 0 if f.function in ("count", "count_distinct") else (0.0 if f.function == "sum" else None)
        out[f.feature_name] = ([empty if v is None else v[i] for _, v in found], times)
    return out


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    enc = arr.dictionary_encode()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _versions(view: TableView, log: pa.Table) -> pa.Table:
    """Row versions with the interval ``[start, end)`` (ms) in which each was in effect, live rows
    (not deletes, with an entity) only."""
    log = log.sort_by([("pk", "ascending"), ("position", "ascending"), ("_partition", "ascending"),
                       ("_offset", "ascending")])  # fmt: skip
    if log.num_rows == 0:
        return pa.table(
            {"entity": pa.array([], pa.string()), "start": pa.array([], pa.int64()),
             "end": pa.array([], pa.int64()),
             **{f"c_{c}": log.column(c) for c in view.columns}}
        )  # fmt: skip
    code = _codes(log.column("pk"))
    position = log.column("position").to_numpy()
    first = np.concatenate(([True], (code[1:] != code[:-1]) | (position[1:] != position[:-1])))
    log = log.filter(pa.array(first))
    code = code[first]
    # Delta hands timestamps back in microseconds: compare in milliseconds, as the stream does.
    ts = pc.cast(log.column("event_ts"), pa.timestamp("ms", "UTC")).cast(pa.int64()).to_numpy()
    base = int(ts.min())
    span = int(ts.max()) - base + 1
    if (int(code.max()) + 1) * span >= 2**62:
        raise StoreError("the change log spans too many keys over too long a time; read fewer entities")
    # Running max of event time per key: a change takes effect no earlier than the one before it.
    start = np.maximum.accumulate((ts - base) + code * span) - code * span + base
    same_next = np.concatenate((code[1:] == code[:-1], [False]))
    end = np.where(same_next, np.concatenate((start[1:], [0])), _NEVER)
    live = (
        pc.not_equal(log.column("op"), "d").to_numpy(zero_copy_only=False)
        & pc.is_valid(log.column("entity")).to_numpy(zero_copy_only=False)
        & (end > start)
    )
    mask = pa.array(live)
    cols = {c: log.column(c).filter(mask) for c in view.columns}
    return pa.table(
        {
            "entity": log.column("entity").filter(mask),
            "start": pa.array(start[live], pa.int64()),
            "end": pa.array(end[live], pa.int64()),
            **{f"c_{c}": v for c, v in cols.items()},
        }
    )


def point_in_time_table(
    view: TableView, log: pa.Table, entity: list[str], at_ms: np.ndarray, features: list[TableFeature]
) -> dict[str, pa.Array]:
    """Per feature, the value for each (``entity[i]``, ``at_ms[i]``) over the rows in effect then."""
    q = len(entity)
    versions = _versions(view, log)
    queries = pa.table(
        {"qid": pa.array(np.arange(q, dtype=np.int64)), "entity": pa.array(entity, pa.string()),
         "t": pa.array(np.asarray(at_ms, np.int64))}
    )  # fmt: skip
    joined = queries.join(versions, keys="entity", join_type="inner")
    inside = pc.and_(
        pc.less_equal(joined.column("start"), joined.column("t")),
        pc.less(joined.column("t"), joined.column("end")),
    )
    joined = joined.filter(inside)
    aggs: list[tuple[Any, ...]] = []
    names: list[str] = []
    for f in features:
        src = f"c_{f.column}" if f.column else "start"
        if f.function in ("sum", "mean", "min", "max"):
            col = f"f_{f.column}"
            if col not in joined.column_names:
                joined = joined.append_column(col, pc.cast(joined.column(src), pa.float64()))
            src = col
        if f.column is None:
            aggs.append((src, "count", pc.CountOptions(mode="all")))
        elif f.function == "sum":
            aggs.append((src, "sum", pc.ScalarAggregateOptions(min_count=0)))
        elif f.function == "latest":
            aggs.append((src, "max"))
        else:
            aggs.append((src, f.function))
        names.append(f.feature_name)
    grouped = joined.group_by("qid").aggregate(aggs)
    where = np.full(q, -1, dtype=np.int64)
    where[grouped.column("qid").to_numpy()] = np.arange(grouped.num_rows)
    take = pa.array(where, mask=where < 0)
    out: dict[str, pa.Array] = {}
    for j, (f, name) in enumerate(zip(features, names, strict=True)):
        col = grouped.column(grouped.num_columns - len(features) + j)  # the key first, then aggregates
        col = pc.take(col, take)
        if f.function in ("count", "count_distinct"):
            col = pc.cast(col.fill_null(0), pa.int64())
        elif f.function == "sum":
            col = col.fill_null(0.0)
        out[name] = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return out
