"""Point-in-time training sets from the offline store, and their lineage records.

Each view's stored events (its Delta table, at a pinned version when the set is recorded) are read
once and indexed (:class:`engine.training.PreparedEvents`); entity rows are then computed
``chunk_rows`` at a time, so memory is the events read plus one chunk, and a caller can stream the
chunks (``featurestream training-set`` writes them to Parquet as they come).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from connectors.delta_store import DeltaOfflineStore, event_schema
from engine.decode import entity_id
from engine.definitions import Aggregation, FeatureView
from engine.errors import FeaturestreamError, StoreError
from engine.table_definitions import TableView
from engine.table_reads import point_in_time_table
from engine.training import CHUNK_ROWS, PreparedEvents
from featurestream.training_partitions import (
    PARTITION_EVENTS,
    RowEntities,
    SpilledView,
    read_window,
    row_entities,
    spillable,
)

if TYPE_CHECKING:
    from registry.core import Registry

__all__ = [
    "TRAINING_SET_ID",
    "entity_ids",
    "iter_training_set",
    "read_entities",
    "training_table",
    "write_training_set",
]

TRAINING_SET_ID = b"featurestream.training_set_id"  # schema metadata key of recorded training sets


def entity_ids(view: FeatureView | TableView, table: pa.Table) -> pa.Array:
    """Each row's entity id for ``view`` (the join key as text; several keys joined as the stream
    joins them), columnar for a single str or int key."""
    keys = view.entity.join_keys
    missing = [k for k in keys if k not in table.column_names]
    if missing:
        raise FeaturestreamError(f"entity_df lacks join keys {missing} of view {view.name!r}")
    if len(keys) == 1:
        col = table.column(keys[0])
        if pa.types.is_string(col.type) or pa.types.is_integer(col.type):
            if col.null_count:
                raise FeaturestreamError(f"entity_df[{keys[0]!r}] has nulls; drop or fill those rows")
            return pc.cast(col, pa.string()).combine_chunks()
        return pa.array([str(v) for v in col.to_pylist()], pa.string())
    rows = table.select(list(keys)).to_pylist()
    return pa.array([entity_id([r[k] for k in keys]) for r in rows], pa.string())


def row_times(table: pa.Table, timestamp_column: str) -> np.ndarray:
    """Row times in epoch ms, rounded down (an event at ms ``m`` is at or before a row time ``t``
    exactly when ``m <= floor(t)``, so µs/ns times need no rounding by the caller)."""
    if timestamp_column not in table.column_names:
        raise FeaturestreamError(
            f"entity_df has no column {timestamp_column!r}; add it or pass timestamp_column="
        )
    column = table.column(timestamp_column)
    if not pa.types.is_timestamp(column.type) or column.type.tz is None:
        raise FeaturestreamError(
            f"entity_df[{timestamp_column!r}] must be a timezone-aware timestamp (got {column.type}); "
            "convert it, e.g. pandas: df[col] = df[col].dt.tz_localize('UTC')"
        )
    if column.null_count:
        raise FeaturestreamError(f"entity_df[{timestamp_column!r}] has nulls; drop or fill those rows")
    per_ms = {"s": None, "ms": 1, "us": 1_000, "ns": 1_000_000}[column.type.unit]
    raw = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    return raw * 1000 if per_ms is None else raw // per_ms


def _prepare(
    offline: DeltaOfflineStore,
    view: FeatureView,
    ids: pa.Array,
    at_ms: np.ndarray,
    uri: str,
    pin: int | None,
    latest: bool,
) -> PreparedEvents:
    """The view's events that rows can see (their entities, back to the longest lookback)."""
    events = None
    if (latest or pin is not None) and len(at_ms):
        start, end = read_window(view, at_ms)
        columns = ["entity", "event_ts", *view.columns, "_partition", "_offset"]
        events = offline.read(
            uri, entities=pc.unique(ids), start=start, end=end, version=pin, columns=columns
        )
    if events is None:
        events = event_schema(view.columns, view.text_columns).empty_table()
    return PreparedEvents(view, events)


def iter_training_set(
    offline: DeltaOfflineStore,
    views: dict[str, FeatureView],
    wanted: dict[str, list[Aggregation]],
    table: pa.Table,
    timestamp_column: str,
    uris: dict[str, str],
    pins: dict[str, int | None] | None,
    chunk_rows: int = CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
    partition_events: int = PARTITION_EVENTS,
) -> Iterator[pa.Table]:
    """The training set of ``table`` in chunks of ``chunk_rows`` rows: each chunk's rows plus one
    column per feature (``view:feature``), as of each row's time. Each view's Delta table is read
    at its pinned version (None: the table did not exist, so no events), or the latest without
    ``pins``. ``progress(rows)`` is called after each chunk.

    Views whose features are all floats are computed first, ``partition_events`` stored events at
    a time (:class:`featurestream.training_partitions.SpilledView`), so memory stays bounded."""
    at_ms = row_times(table, timestamp_column)
    by_keys: dict[tuple[str, ...], pa.Array] = {}  # views sharing join keys share their ids
    for name in wanted:
        keys = tuple(views[name].entity.join_keys)
        if keys not in by_keys:
            by_keys[keys] = entity_ids(views[name], table)
    ids = {name: by_keys[tuple(views[name].entity.join_keys)] for name in wanted}
    rows_of: dict[tuple[str, ...], RowEntities] = {}  # views sharing join keys share them
    prepared: dict[str, PreparedEvents] = {}
    spilled: dict[str, SpilledView] = {}
    try:
        for name, aggs in wanted.items():
            view = views[name]
            if isinstance(view, TableView):
                continue
            pin = None if pins is None else pins[name]
            if spillable(view, aggs):  # bounded memory: one entity range indexed at a time
                keys = tuple(view.entity.join_keys)
                if keys not in rows_of:
                    rows_of[keys] = row_entities(ids[name], at_ms)
                spilled[name] = SpilledView(
                    offline,
                    view,
                    aggs,
                    ids[name],
                    at_ms,
                    uris[name],
                    pin,
                    pins is None,
                    chunk_rows,
                    partition_events,
                    rows_of[keys],
                )
            else:
                prepared[name] = _prepare(offline, view, ids[name], at_ms, uris[name], pin, pins is None)
        for start in range(0, max(table.num_rows, 1), chunk_rows):
            stop = min(start + chunk_rows, table.num_rows)
            out = table.slice(start, stop - start)
            t = at_ms[start:stop]
            for name, aggs in wanted.items():
                view = views[name]
                chunk_ids = ids[name].slice(start, stop - start)
                if isinstance(view, TableView):
                    pin = None if pins is None else pins[name]
                    cols = _table_columns(
                        offline, view, aggs, chunk_ids.to_pylist(), t, uris[name], pins is None, pin
                    )
                    for feature, col in cols.items():
                        out = out.append_column(f"{name}:{feature}", col)
                    continue
                if name in spilled:
                    vals_of = spilled[name].read(start, stop)
                else:
                    values = prepared[name].values(chunk_ids, t, aggs)  # type: ignore[arg-type]
                    vals_of = {k: v[0] for k, v in values.items()}
                for agg in aggs:
                    vals = vals_of[agg.feature_name]
                    out = out.append_column(f"{name}:{agg.feature_name}", arrow_values(vals, agg))
            if progress is not None:
                progress(stop - start)
            yield out
    finally:
        for s in spilled.values():
            s.close()


def training_table(*args: Any, **kwargs: Any) -> pa.Table:
    """:func:`iter_training_set`, as one table."""
    parts = list(iter_training_set(*args, **kwargs))
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts)


def arrow_values(vals: np.ndarray, agg: Aggregation) -> pa.Array:
    if vals.dtype == object:  # object aggregations: text, lists of values, [{value, count}]
        return pa.array(vals.tolist())
    if getattr(agg, "function", None) == "count":  # derived features are floats
        return pa.array(vals.astype(np.int64))
    return pa.array(vals, pa.float64(), from_pandas=True)


def _table_columns(
    offline: DeltaOfflineStore,
    view: TableView,
    features: list[Any],
    ids: list[str],
    at_ms: np.ndarray,
    uri: str,
    latest: bool,
    pin: int | None,
) -> dict[str, pa.Array]:
    """A table view's columns: each row's entity's aggregates over the table as of its time
    (the Delta table at version ``pin``, or the latest one; a None pin: no changes stored)."""
    from engine.table_flow import change_log_schema

    log = None
    if (latest or pin is not None) and len(at_ms):
        end = datetime.fromtimestamp(int(at_ms.max()) / 1000, UTC)
        log = offline.read(uri, end=end, version=pin)
    if log is None:
        log = change_log_schema(view.source.fields).empty_table()
    else:  # only the keys that ever belonged to an asked-for entity
        wanted = pc.is_in(log.column("entity"), value_set=pa.array(sorted(set(ids)), pa.string()))
        keys = pc.unique(log.column("pk").filter(wanted.fill_null(False)))
        log = log.filter(pc.is_in(log.column("pk"), value_set=keys))
    return point_in_time_table(view, log, ids, at_ms, features)


# --------------------------------------------------------------------------------------------
# lineage: entity snapshots and recorded training sets


def absolute(uri: str) -> str:
    """Local paths made absolute, so a recorded location does not depend on the working directory."""
    return uri if "://" in uri else str(Path(uri).resolve())


def write_snapshot(root: str, table: pa.Table) -> tuple[str, str]:
    """Store ``table`` as Parquet named by the sha256 of its bytes; returns (uri, sha256)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    uri = f"{absolute(root)}/_training_sets/{sha}.parquet"
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:  # content-addressed: same bytes
            with fs.open_output_stream(path) as f:
                f.write(data)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"cannot store the entity snapshot at {uri}: {exc}") from exc
    return uri, sha


def read_snapshot(uri: str, sha256: str) -> pa.Table:
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"entity snapshot {uri} cannot be read: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(f"entity snapshot {uri} changed since it was recorded (sha256 differs)")
    return pq.read_table(io.BytesIO(data))


def recorded_uri(delta_versions: dict[str, int | None], view: str, version: str) -> str:
    from registry.core import RegistryError

    for uri in delta_versions:
        if uri.rstrip("/").endswith(f"/{view}__{version}"):
            return uri
    raise RegistryError(f"the training set record has no Delta table for {view} (version {version})")


def with_id(table: pa.Table, training_set_id: int) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[TRAINING_SET_ID] = str(training_set_id).encode()
    return table.replace_schema_metadata(meta)


def record(
    registry: Registry,
    offline: DeltaOfflineStore,
    out: pa.Table,
    table: pa.Table,
    *,
    name: str,
    view_version_ids: Sequence[int],
    delta_versions: dict[str, int | None],
    timestamp_column: str,
) -> pa.Table:
    """Record ``out`` (the training set of ``table``) for lineage; returns it carrying its id."""
    from registry.lineage import record_training_set

    entity_uri, sha = write_snapshot(offline.root, table)
    rec = record_training_set(
        registry,
        name=name,
        features=out.column_names[table.num_columns :],
        view_version_ids=list(view_version_ids),
        delta_versions=delta_versions,
        entity_uri=entity_uri,
        entity_sha256=sha,
        entity_rows=table.num_rows,
        timestamp_column=timestamp_column,
    )
    return with_id(out, rec.id)


def read_entities(path: Path, views: Sequence[FeatureView | TableView], timestamp_column: str) -> pa.Table:
    """An entity file (.parquet or .csv). CSV join keys are read with their source types (so
    ``007`` stays a string key); CSV times must carry their zone (``Z`` or ``+02:00``)."""
    import pyarrow.csv as pcsv

    suffix = path.suffix.lower()
    if not path.is_file():
        raise FeaturestreamError(f"--entities: {path} does not exist")
    if suffix == ".parquet":
        return pq.read_table(path)
    if suffix != ".csv":
        raise FeaturestreamError(f"--entities: {path} must end in .parquet or .csv")
    types: dict[str, pa.DataType] = {}
    for view in views:
        for key in view.entity.join_keys:
            field = view.source.field(key)
            types[key] = pa.int64() if field is not None and field.dtype == "int" else pa.string()
    types[timestamp_column] = pa.timestamp("ns", "UTC")  # any fraction; rows are floored to ms
    try:
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
    except pa.ArrowInvalid as exc:
        raise FeaturestreamError(
            f"--entities: {path} does not parse ({exc}); {timestamp_column!r} must hold ISO times "
            "with a zone, such as 2024-05-01T12:00:00Z, and the join keys must be present"
        ) from None
    return table


def write_training_set(
    offline: DeltaOfflineStore,
    views: dict[str, FeatureView],
    wanted: dict[str, list[Aggregation]],
    table: pa.Table,
    timestamp_column: str,
    out: Path,
    chunk_rows: int = CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
    partition_events: int = PARTITION_EVENTS,
) -> int:
    """Stream the training set of ``table`` (latest table versions) to a Parquet file, chunk by
    chunk; returns the rows written."""
    uris = {n: absolute(offline.table_uri(views[n].name, views[n].version)) for n in wanted}
    chunks = iter_training_set(
        offline, views, wanted, table, timestamp_column, uris, None, chunk_rows, progress, partition_events
    )
    written = 0
    writer: pq.ParquetWriter | None = None
    # Parquet encoding releases the GIL: one chunk is written while the next is assembled.
    pool = ThreadPoolExecutor(1)
    pending: Future[None] | None = None
    try:
        for chunk in chunks:
            if writer is None:
                writer = pq.ParquetWriter(out, chunk.schema)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_table, chunk)
            written += chunk.num_rows
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)
        if writer is not None:
            writer.close()
    return written
