"""Delta Lake tile table: the stream's tile partials per view version, readable by any engine.

One row is the *full* partial aggregate of one (entity, tile) as the stream held it after a batch
(see :mod:`engine.tiles`), never a delta. So a replay after a restart, a retried commit or an
online resync only re-appends rows the table already holds (or rows with fewer events of the same
tile), and readers need no transaction bookkeeping: per ``(entity, tile_no)`` take the row with the
largest ``n_events``, ties broken by the latest ``_written_at``. Layout and reading rule are
documented for other engines in docs/offline.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, write_deltalake

from connectors.delta_store import DeltaOfflineStore
from engine.errors import StoreError
from engine.tiles import CNT, LAST, LTS, M2, MAX, MAXTS, MIN, SUM, TILE, N, TileLayout

__all__ = ["PARTIALS", "append_tiles", "read_tiles", "tile_schema", "tile_table", "tiles_uri"]

PARTIALS = ("count", "sum", "min", "max", "m2", "last_ts", "last")
"""Per aggregated column, in the order of :mod:`engine.tiles`' row layout (``<col>__<partial>``)."""

_MS = pa.timestamp("ms", tz="UTC")


def tiles_uri(store: DeltaOfflineStore, view: str, version: str) -> str:
    """The tile table beside the view version's event table."""
    return f"{store.table_uri(view, version)}__tiles"


def tile_schema(columns: Sequence[str]) -> pa.Schema:
    fields = [
        ("entity", pa.string()),
        ("tile_start", _MS),
        ("tile_no", pa.int64()),
        ("n_events", pa.int64()),
        ("max_event_ts", _MS),
    ]
    for c in columns:
        fields += [
            (f"{c}__count", pa.int64()),
            (f"{c}__sum", pa.float64()),
            (f"{c}__min", pa.float64()),
            (f"{c}__max", pa.float64()),
            (f"{c}__m2", pa.float64()),
            (f"{c}__last_ts", _MS),
            (f"{c}__last", pa.float64()),
        ]
    return pa.schema([*fields, ("_written_at", pa.timestamp("us", tz="UTC")), ("date", pa.date32())])


def tile_table(layout: TileLayout, entities: pa.Array, rows: np.ndarray) -> pa.Table:
    """Tile rows (the float64 layout of :mod:`engine.tiles`) of ``entities[i]`` as a table;
    NaN partials become nulls."""
    n = len(rows)

    def ms(values: np.ndarray) -> pa.Array:
        nan = np.isnan(values)
        return pa.array(np.where(nan, 0, values).astype(np.int64), _MS, mask=nan)

    def num(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.float64(), mask=np.isnan(values))

    tile_no = rows[:, TILE].astype(np.int64)
    start = pa.array(tile_no * layout.tile_ms, _MS)
    data: dict[str, pa.Array] = {
        "entity": entities,
        "tile_start": start,
        "tile_no": pa.array(tile_no),
        "n_events": pa.array(rows[:, N].astype(np.int64)),
        "max_event_ts": ms(rows[:, MAXTS]),
    }
    for c in layout.columns:
        b = layout.base(c)
        data[f"{c}__count"] = pa.array(rows[:, b + CNT].astype(np.int64))
        data[f"{c}__sum"] = pa.array(rows[:, b + SUM])
        data[f"{c}__min"] = num(rows[:, b + MIN])
        data[f"{c}__max"] = num(rows[:, b + MAX])
        data[f"{c}__m2"] = pa.array(rows[:, b + M2])
        data[f"{c}__last_ts"] = ms(rows[:, b + LTS])
        data[f"{c}__last"] = num(rows[:, b + LAST])
    data["_written_at"] = pa.array(np.full(n, time.time_ns() // 1000), pa.timestamp("us", tz="UTC"))
    data["date"] = pc.cast(start, pa.date32())
    return pa.table(data, schema=tile_schema(layout.columns))


def append_tiles(store: DeltaOfflineStore, uri: str, table: pa.Table) -> int:
    """Append tile rows in one commit (retried against concurrent writers of other processes)."""
    if table.num_rows == 0:
        return 0
    try:
        write_deltalake(
            uri,
            table,
            mode="append",
            partition_by=["date"],
            storage_options=store.storage_options,
            commit_properties=CommitProperties(max_commit_retries=50),
        )
    except Exception as exc:
        raise StoreError(f"tile table append to {uri} failed: {exc}") from exc
    return table.num_rows


def read_tiles(store: DeltaOfflineStore, uri: str, version: int | None = None) -> pa.Table | None:
    """The tile table with the reading rule applied: one row per (entity, tile_no), the one with
    the most events (the latest written among equals), sorted by entity and tile."""
    table = store._open(uri, version)
    if table is None:
        return None
    data = table.to_pyarrow_table()
    if data.num_rows == 0:
        return data
    order = pc.sort_indices(
        data,
        [
            ("entity", "ascending"),
            ("tile_no", "ascending"),
            ("n_events", "descending"),
            ("_written_at", "descending"),
        ],
    )
    data = data.take(order)
    ent = data.column("entity").combine_chunks()
    tile = data.column("tile_no").to_numpy()
    first = np.ones(data.num_rows, dtype=bool)
    same_entity = pc.equal(ent.slice(1), ent.slice(0, len(ent) - 1)).to_numpy(zero_copy_only=False)
    first[1:] = ~(same_entity & (tile[1:] == tile[:-1]))
    return data.filter(pa.array(first))
