"""Reading features: fresh values from the online store, point-in-time training sets from Delta."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from connectors.delta_store import DeltaOfflineStore, event_schema
from connectors.redis_table_store import RedisTableStore
from engine.decode import entity_id
from engine.definitions import Aggregation, FeatureView
from engine.errors import DefinitionError, FeaturestreamError, StoreError
from engine.reads import online_values, point_in_time_values
from engine.table_definitions import TableView
from engine.table_reads import online_table_values, point_in_time_table

if TYPE_CHECKING:
    from featurestream.config import Settings
    from registry.core import Registry
    from registry.versions import ViewVersion

__all__ = ["TRAINING_SET_ID", "FeatureStore", "OnlineFeatures", "connect", "training_set_id"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TRAINING_SET_ID = b"featurestream.training_set_id"  # schema metadata key of recorded training sets


@dataclass(frozen=True)
class OnlineFeatures:
    """Feature values per requested entity, with the event time of the newest event behind each."""

    entities: list[dict[str, Any]]
    values: dict[str, list[Any]]
    _times_ms: dict[str, np.ndarray]

    @property
    def event_times(self) -> dict[str, list[datetime | None]]:
        """Per feature, the event time of the newest event in each value's window (None if empty)."""
        return {f: _py_times(ts) for f, ts in self._times_ms.items()}

    def to_dict(self) -> dict[str, list[Any]]:
        """Columns: join keys, then one per feature (Feast's shape)."""
        out: dict[str, list[Any]] = {}
        for k in self.entities[0] if self.entities else {}:
            out[k] = [e[k] for e in self.entities]
        out.update(self.values)
        return out

    def rows(self) -> list[dict[str, Any]]:
        return [{**ent, **{f: v[i] for f, v in self.values.items()}} for i, ent in enumerate(self.entities)]


class FeatureStore:
    """Reads the features of registered views from Redis (online) and Delta (offline)."""

    def __init__(
        self,
        views: Iterable[FeatureView],
        *,
        redis_url: str,
        delta_uri: str,
        redis_prefix: str = "fs",
        delta_storage_options: dict[str, str] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.views = {v.name: v for v in views}
        self.online = RedisTableStore(redis_url, redis_prefix)  # tiles and table values
        self._resolved: dict[tuple[str, ...], dict[str, list[Aggregation]]] = {}
        self.offline = DeltaOfflineStore(delta_uri, delta_storage_options)
        self.registry = registry

    def _resolve(self, features: Sequence[str]) -> dict[str, list[Aggregation]]:
        """``["view:feature", "view", "view@2:feature"]`` -> aggregations per view reference.

        A bare view means all its features; ``view@N`` reads registered version N (served side by
        side with the current one until it is retired), which needs ``registry=``.
        """
        key = tuple(features)
        if key not in self._resolved:
            for ref in features:
                view_ref = ref.partition(":")[0]
                if "@" in view_ref and view_ref not in self.views:
                    self.views[view_ref] = self._registered(view_ref)
                elif view_ref in self.views and self.registry is not None:
                    self._check_not_retired(self.views[view_ref])
            self._resolved[key] = _resolve(self.views, features)
        return self._resolved[key]

    def _check_not_retired(self, view: FeatureView) -> None:
        """A definition whose registered version was retired is no longer served."""
        from registry.core import RegistryError
        from registry.versions import find_version, versions

        found = find_version(self.registry, view.name, view.version)  # type: ignore[arg-type]
        if found is None or found.status != "retired":
            return
        live = [v.label for v in versions(self.registry, view.name) if v.status != "retired"]  # type: ignore[arg-type]
        hint = f"read {live[-1]} instead" if live else "apply a new definition of it"
        raise RegistryError(f"{view.name} as defined here is {found.label}, which is retired; {hint}")

    def _registered(self, view_ref: str) -> FeatureView:
        from registry.core import RegistryError
        from registry.versions import get_version

        name, _, seq = view_ref.partition("@")
        if self.registry is None:
            raise DefinitionError(
                f"{view_ref!r} names a registered version, but no registry is open: record versions "
                "with `featurestream apply PIPELINE.py`; in Python, build the store with "
                "featurestream.connect(...)"
            )
        if not seq.isdigit():
            raise DefinitionError(f"{view_ref!r}: the version after '@' is a number, e.g. {name}@2")
        found = get_version(self.registry, name, int(seq))
        if found.status == "retired":
            raise RegistryError(f"{found.label} is retired and no longer served; read {name} instead")
        if found.status == "deprecated":
            warnings.warn(
                f"{found.label} is deprecated"
                + (f" and retires after {found.retire_after:%Y-%m-%d}" if found.retire_after else ""),
                DeprecationWarning,
                stacklevel=4,
            )
        return found.view()

    @staticmethod
    def _entity_ids(view: FeatureView, rows: list[dict[str, Any]]) -> list[str]:
        keys = view.entity.join_keys
        try:
            if len(keys) == 1:
                return [str(r[keys[0]]) for r in rows]
            return [entity_id([r[k] for k in keys]) for r in rows]
        except KeyError as exc:
            raise FeaturestreamError(
                f"entity row lacks join key {exc.args[0]!r} of view {view.name!r}; pass {list(keys)}"
            ) from None

    def _entity_rows(self, entity_keys: Sequence[Any], views: list[FeatureView]) -> list[dict[str, Any]]:
        if entity_keys and not isinstance(entity_keys[0], dict):
            keys = {k for v in views for k in v.entity.join_keys}
            if len(keys) != 1:
                raise FeaturestreamError(
                    f"these views are keyed by {sorted(keys)}; pass entity_keys as dicts of join keys"
                )
            (k,) = keys
            return [{k: e} for e in entity_keys]
        return [dict(e) for e in entity_keys]

    def get_online_features(
        self, features: Sequence[str], entity_keys: Sequence[Any], *, as_of: datetime | None = None
    ) -> OnlineFeatures:
        """Values as of ``as_of`` (default: now) for each entity, in one Redis round trip per view.

        Windows are combined at read time, so values expire as time passes even with no new events.
        """
        at = as_of or datetime.now(UTC)
        if at.tzinfo is None:
            raise FeaturestreamError("as_of must be timezone-aware, e.g. datetime.now(timezone.utc)")
        at_ms = (at - _EPOCH) // timedelta(milliseconds=1)  # floor: no event after ``at``
        wanted = self._resolve(features)
        views = [self.views[v] for v in wanted]
        rows = self._entity_rows(entity_keys, views)
        values: dict[str, list[Any]] = {}
        times: dict[str, np.ndarray] = {}
        for ref, view in zip(wanted, views, strict=True):
            aggs = wanted[ref]
            ns = self.online.namespace(view.name, view.version)
            if isinstance(view, TableView):  # current-row aggregates of a CDC source
                found = self.online.read_values(ns, self._entity_ids(view, rows))
                for name, (vals, ts) in online_table_values(view, found, aggs).items():  # type: ignore[arg-type]
                    values[f"{ref}:{name}"] = vals
                    times[f"{ref}:{name}"] = ts
                continue
            blobs = self.online.read_tiles(ns, self._entity_ids(view, rows))
            results = online_values(view, blobs, at_ms, aggs)
            for agg in aggs:
                vals, ts = results[agg.feature_name]
                values[f"{ref}:{agg.feature_name}"] = _py_values(vals, agg)
                times[f"{ref}:{agg.feature_name}"] = ts
        return OnlineFeatures(entities=rows, values=values, _times_ms=times)

    def get_training_set(
        self,
        entity_df: Any,
        features: Sequence[str],
        *,
        timestamp_column: str = "event_timestamp",
        registry: Registry | None = None,
        name: str = "",
    ) -> pa.Table:
        """``entity_df`` plus one column per feature, each as of its row's timestamp.

        ``entity_df`` is a pyarrow Table or pandas DataFrame with the views' join keys and a
        timezone-aware ``timestamp_column``. No value uses an event after its row's timestamp.

        With a ``registry``, the training set is recorded for lineage: the view versions (each
        must have been applied), the Delta table version read per view, and a Parquet snapshot
        of ``entity_df`` under ``<delta root>/_training_sets/``. The returned table's schema
        metadata ``featurestream.training_set_id`` names the record, and
        :meth:`reproduce_training_set` rebuilds the identical table from it.
        """
        table = (
            entity_df
            if isinstance(entity_df, pa.Table)
            else pa.Table.from_pandas(entity_df, preserve_index=False)
        )
        wanted = self._resolve(features)
        applied = [] if registry is None else self._applied_versions(registry, wanted)
        uris = {
            n: _absolute(self.offline.table_uri(self.views[n].name, self.views[n].version)) for n in wanted
        }
        if registry is None:
            return _training_table(self.offline, self.views, wanted, table, timestamp_column, uris, None)
        # Pin each table at its current version and read exactly that version: later appends
        # can then never change what this training set contains.
        pins = {n: self.offline.version(uri) for n, uri in uris.items()}
        out = _training_table(self.offline, self.views, wanted, table, timestamp_column, uris, pins)
        from registry.lineage import record_training_set

        entity_uri, sha = _write_snapshot(self.offline.root, table)
        record = record_training_set(
            registry,
            name=name,
            features=out.column_names[table.num_columns :],
            view_version_ids=[v.id for v in applied],
            delta_versions={uris[n]: pins[n] for n in wanted},
            entity_uri=entity_uri,
            entity_sha256=sha,
            entity_rows=table.num_rows,
            timestamp_column=timestamp_column,
        )
        return _with_id(out, record.id)

    def _applied_versions(
        self, registry: Registry, wanted: dict[str, list[Aggregation]]
    ) -> list[ViewVersion]:
        from registry.core import RegistryError
        from registry.versions import find_version

        out = []
        for view_name in wanted:
            view = self.views[view_name]
            found = find_version(registry, view.name, view.version)
            if found is None:
                raise RegistryError(
                    f"feature view {view.name} (version {view.version}) is not in the registry at "
                    f"{registry.safe_url}; run `featurestream apply <pipeline file>` first"
                )
            out.append(found)
        return out

    def reproduce_training_set(self, registry: Registry, training_set_id: int) -> pa.Table:
        """The training set recorded as ``training_set_id``, rebuilt exactly: the same entities
        (the Parquet snapshot, checked against its sha256), the same view definitions (from the
        registry, not this store's views) and the same Delta table versions, read from the
        recorded table URIs, whatever was appended since."""
        from registry.lineage import get_training_set_record, view_versions_by_id

        record = get_training_set_record(registry, training_set_id)
        views: dict[str, FeatureView] = {}
        for vv in view_versions_by_id(registry, record.view_version_ids):
            views[vv.name] = views[vv.label] = vv.view()
        table = _read_snapshot(record.entity_uri, record.entity_sha256)
        wanted = _resolve(views, record.features)
        uris = {n: _recorded_uri(record.delta_versions, views[n].name, views[n].version) for n in wanted}
        pins = {n: record.delta_versions[uri] for n, uri in uris.items()}
        out = _training_table(self.offline, views, wanted, table, record.timestamp_column, uris, pins)
        return _with_id(out, record.id)


def training_set_id(table: pa.Table) -> int | None:
    """The id under which ``get_training_set(..., registry=...)`` recorded ``table`` (for
    ``register_model``, ``reproduce_training_set`` and ``featurestream baseline``); None if unrecorded."""
    raw = (table.schema.metadata or {}).get(TRAINING_SET_ID)
    return None if raw is None else int(raw)


def connect(*views: FeatureView | str | Path, settings: Settings | None = None) -> FeatureStore:
    """A store bound to the same services and settings as the CLI (environment, else
    ``featurestream.toml``): the configured Redis or the running embedded one, the Delta root and
    key prefix, and the registry (so ``view@N`` reads work). ``views`` are feature views or
    pipeline files. It starts nothing: with no Redis running it raises :class:`ServiceUnavailable`
    naming `featurestream services up`, rather than reading an empty store."""
    from featurestream.config import Settings
    from featurestream.local.services import redis_endpoint
    from featurestream.registered import _registry_if_any
    from featurestream.runtime import load_views

    settings = settings or Settings()
    found: list[FeatureView] = []
    for v in views:
        found.extend([v] if isinstance(v, FeatureView) else load_views(v))
    if not found:
        raise DefinitionError(
            "connect() needs feature views or pipeline files, e.g. connect('pipelines/transactions.py')"
        )
    return FeatureStore(
        found,
        redis_url=redis_endpoint(settings),
        delta_uri=settings.resolved_delta_uri(),
        redis_prefix=settings.redis_prefix,
        delta_storage_options=settings.delta_storage_options,
        registry=_registry_if_any(settings),
    )


def _resolve(views: dict[str, FeatureView], features: Sequence[str]) -> dict[str, list[Aggregation]]:
    out: dict[str, list[Aggregation]] = {}
    for ref in features:
        view_name, _, feat = ref.partition(":")
        view = views.get(view_name)
        if view is None:
            raise DefinitionError(
                f"unknown feature view {view_name!r} in {ref!r}; known views: {sorted(views)}"
            )
        aggs = out.setdefault(view_name, [])
        for agg in view.features if not feat else [view.aggregation(feat)]:
            if all(a is not agg for a in aggs):
                aggs.append(agg)
    return out


def _training_table(
    offline: DeltaOfflineStore,
    views: dict[str, FeatureView],
    wanted: dict[str, list[Aggregation]],
    table: pa.Table,
    timestamp_column: str,
    uris: dict[str, str],
    pins: dict[str, int | None] | None,
) -> pa.Table:
    """Point-in-time features of ``wanted`` for ``table``, reading each view's Delta table at its
    pinned version (None: the table did not exist, so no events), or the latest without ``pins``."""
    if timestamp_column not in table.column_names:
        raise FeaturestreamError(
            f"entity_df has no column {timestamp_column!r}; add it or pass timestamp_column="
        )
    ts_type = table.schema.field(timestamp_column).type
    if not pa.types.is_timestamp(ts_type) or ts_type.tz is None:
        raise FeaturestreamError(
            f"entity_df[{timestamp_column!r}] must be a timezone-aware timestamp (got {ts_type}); "
            "convert it, e.g. pandas: df[col] = df[col].dt.tz_localize('UTC')"
        )
    at_ms = _floor_millis(table.column(timestamp_column))
    out = table
    for view_name, aggs in wanted.items():
        view = views[view_name]
        missing = [k for k in view.entity.join_keys if k not in table.column_names]
        if missing:
            raise FeaturestreamError(f"entity_df lacks join keys {missing} of view {view_name!r}")
        ids = FeatureStore._entity_ids(view, table.select(list(view.entity.join_keys)).to_pylist())
        if isinstance(view, TableView):
            pin = None if pins is None else pins[view_name]
            uri = uris[view_name]
            cols = _table_training_columns(offline, view, aggs, ids, at_ms, uri, pins is None, pin)
            for name, col in cols.items():
                out = out.append_column(f"{view_name}:{name}", col)
            continue
        lookback = view.max_lookback + view.tile_size
        start = datetime.fromtimestamp(int(at_ms.min()) / 1000, UTC) - lookback if len(at_ms) else None
        end = datetime.fromtimestamp(int(at_ms.max()) / 1000, UTC) if len(at_ms) else None
        pin = None if pins is None else pins[view_name]
        events = None
        if pins is None or pin is not None:
            events = offline.read(
                uris[view_name], entities=sorted(set(ids)), start=start, end=end, version=pin
            )
        if events is None:
            events = _empty_events(view)
        for name, (vals, _) in point_in_time_values(view, events, ids, at_ms, aggs).items():
            agg = view.aggregation(name)
            out = out.append_column(f"{view_name}:{name}", _arrow_values(vals, agg))
    return out


def _floor_millis(column: pa.ChunkedArray) -> np.ndarray:
    """Row times in epoch milliseconds, rounded down: an event at millisecond ``m`` is at or
    before a row time ``t`` exactly when ``m <= floor(t)``, so µs/ns timestamps
    (``pd.Timestamp.now(tz="UTC")``) need no rounding by the caller."""
    unit = column.type.unit
    per_ms = {"s": None, "ms": 1, "us": 1_000, "ns": 1_000_000}[unit]
    raw = pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    if per_ms is None:
        return raw * 1000
    return raw // per_ms


def _absolute(uri: str) -> str:
    """Local paths made absolute, so a recorded location does not depend on the working directory."""
    return uri if "://" in uri else str(Path(uri).resolve())


def _write_snapshot(root: str, table: pa.Table) -> tuple[str, str]:
    """Store ``table`` as Parquet named by the sha256 of its bytes; returns (uri, sha256)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    uri = f"{_absolute(root)}/_training_sets/{sha}.parquet"
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:  # content-addressed: same bytes
            with fs.open_output_stream(path) as f:
                f.write(data)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"cannot store the entity snapshot at {uri}: {exc}") from exc
    return uri, sha


def _read_snapshot(uri: str, sha256: str) -> pa.Table:
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"entity snapshot {uri} cannot be read: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(f"entity snapshot {uri} changed since it was recorded (sha256 differs)")
    return pq.read_table(io.BytesIO(data))


def _recorded_uri(delta_versions: dict[str, int | None], view: str, version: str) -> str:
    from registry.core import RegistryError

    for uri in delta_versions:
        if uri.rstrip("/").endswith(f"/{view}__{version}"):
            return uri
    raise RegistryError(f"the training set record has no Delta table for {view} (version {version})")


def _with_id(table: pa.Table, training_set_id: int) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[TRAINING_SET_ID] = str(training_set_id).encode()
    return table.replace_schema_metadata(meta)


def _is_count(agg: Aggregation) -> bool:
    return getattr(agg, "function", None) == "count"  # derived features are floats


def _py_values(vals: np.ndarray, agg: Aggregation) -> list[Any]:
    if _is_count(agg):
        return vals.astype(np.int64).tolist()
    if not np.isnan(vals).any():
        return vals.tolist()
    return [None if v != v else v for v in vals.tolist()]


def _py_times(ts: np.ndarray) -> list[datetime | None]:
    return [None if np.isnan(t) else datetime.fromtimestamp(t / 1000, UTC) for t in ts.tolist()]


def _arrow_values(vals: np.ndarray, agg: Aggregation) -> pa.Array:
    if _is_count(agg):
        return pa.array(vals.astype(np.int64))
    return pa.array(vals, pa.float64(), from_pandas=True)


def _empty_events(view: FeatureView) -> pa.Table:
    return event_schema(view.columns, view.text_columns).empty_table()


def _table_training_columns(
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
