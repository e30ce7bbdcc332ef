"""Reading features: fresh values from the online store, point-in-time training sets from Delta."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from connectors.delta_store import DeltaOfflineStore
from connectors.redis_table_store import RedisTableStore
from engine.decode import entity_id
from engine.definitions import Aggregation, FeatureView
from engine.errors import DefinitionError, FeaturestreamError
from engine.online_read import read_view
from engine.reads import online_values
from engine.table_definitions import TableView
from engine.table_reads import online_table_values
from featurestream.server.reads import Plan, ViewReader

if TYPE_CHECKING:
    from featurestream.config import Settings
    from registry.core import Registry
    from registry.versions import ViewVersion

__all__ = ["FeatureStore", "OnlineFeatures", "connect", "training_set_id"]  # TRAINING_SET_ID: lazily


def __getattr__(name: str) -> Any:
    # Training sets compile kernels (numba): imported on first use, so online reads and the CLI
    # start without them.
    if name == "TRAINING_SET_ID":
        from featurestream.training import TRAINING_SET_ID

        return TRAINING_SET_ID
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
        self._plans: dict[tuple[str, ...], tuple[ViewReader, Plan]] = {}
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

    def _plan(self, view: FeatureView, aggs: list[Aggregation]) -> tuple[ViewReader, Plan]:
        """The view's reader and its plan for ``aggs``, made once per view and request shape."""
        key = (view.version, *(a.feature_name for a in aggs))
        found = self._plans.get(key)
        if found is None or found[0].view is not view:
            reader = ViewReader(view)
            found = self._plans[key] = (reader, reader.plan(aggs))  # type: ignore[arg-type]
        return found

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
            reader, plan = self._plan(view, aggs)
            if not plan.general:  # numeric tile features: every window in one pass
                block = reader.read(self.online.read_tiles(ns, self._entity_ids(view, rows)), at_ms, plan)
                results = {a.feature_name: (block.values[i], block.times[i]) for i, a in enumerate(aggs)}
            else:  # tiles, object records, session values and coarse levels, in one round trip
                found = read_view(self.online, view, ns, self._entity_ids(view, rows))
                results = online_values(view, at_ms=at_ms, aggs=aggs, **found)
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
        from featurestream.training import absolute, record, training_table

        table = (
            entity_df
            if isinstance(entity_df, pa.Table)
            else pa.Table.from_pandas(entity_df, preserve_index=False)
        )
        wanted = self._resolve(features)
        applied = [] if registry is None else self._applied_versions(registry, wanted)
        uris = {
            n: absolute(self.offline.table_uri(self.views[n].name, self.views[n].version)) for n in wanted
        }
        if registry is None:
            return training_table(self.offline, self.views, wanted, table, timestamp_column, uris, None)
        # Pin each table at its current version and read exactly that version: later appends
        # can then never change what this training set contains.
        pins = {n: self.offline.version(uri) for n, uri in uris.items()}
        out = training_table(self.offline, self.views, wanted, table, timestamp_column, uris, pins)
        return record(
            registry,
            self.offline,
            out,
            table,
            name=name,
            view_version_ids=[v.id for v in applied],
            delta_versions={uris[n]: pins[n] for n in wanted},
            timestamp_column=timestamp_column,
        )

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
        from featurestream.training import read_snapshot, recorded_uri, training_table, with_id
        from registry.lineage import get_training_set_record, view_versions_by_id

        rec = get_training_set_record(registry, training_set_id)
        views: dict[str, FeatureView] = {}
        for vv in view_versions_by_id(registry, rec.view_version_ids):
            views[vv.name] = views[vv.label] = vv.view()
        table = read_snapshot(rec.entity_uri, rec.entity_sha256)
        wanted = _resolve(views, rec.features)
        uris = {n: recorded_uri(rec.delta_versions, views[n].name, views[n].version) for n in wanted}
        pins = {n: rec.delta_versions[uri] for n, uri in uris.items()}
        out = training_table(self.offline, views, wanted, table, rec.timestamp_column, uris, pins)
        return with_id(out, rec.id)


def training_set_id(table: pa.Table) -> int | None:
    """The id under which ``get_training_set(..., registry=...)`` recorded ``table`` (for
    ``register_model``, ``reproduce_training_set`` and ``featurestream baseline``); None if unrecorded."""
    from featurestream.training import TRAINING_SET_ID

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


def _is_count(agg: Aggregation) -> bool:
    return getattr(agg, "function", None) == "count"  # derived features are floats


def _py_values(vals: np.ndarray, agg: Aggregation) -> list[Any]:
    if vals.dtype == object:  # object aggregations: str, lists, None
        return vals.tolist()
    if _is_count(agg):
        return vals.astype(np.int64).tolist()
    if not np.isnan(vals).any():
        return vals.tolist()
    return [None if v != v else v for v in vals.tolist()]


def _py_times(ts: np.ndarray) -> list[datetime | None]:
    return [None if np.isnan(t) else datetime.fromtimestamp(t / 1000, UTC) for t in ts.tolist()]
