"""Reading features: fresh values from the online store, point-in-time training sets from Delta."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.delta_store import DeltaOfflineStore, event_schema
from connectors.redis_store import RedisOnlineStore
from engine.decode import entity_id
from engine.definitions import Aggregation, FeatureView
from engine.errors import DefinitionError, FeaturestreamError
from engine.reads import online_values, point_in_time_values

__all__ = ["FeatureStore", "OnlineFeatures"]


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
    ) -> None:
        self.views = {v.name: v for v in views}
        self.online = RedisOnlineStore(redis_url, redis_prefix)
        self._resolved: dict[tuple[str, ...], dict[str, list[Aggregation]]] = {}
        self.offline = DeltaOfflineStore(delta_uri, delta_storage_options)

    def _resolve(self, features: Sequence[str]) -> dict[str, list[Aggregation]]:
        """``["view:feature", "view"]`` -> aggregations per view (a bare view means all its features)."""
        key = tuple(features)
        if key not in self._resolved:
            self._resolved[key] = self._resolve_uncached(features)
        return self._resolved[key]

    def _resolve_uncached(self, features: Sequence[str]) -> dict[str, list[Aggregation]]:
        out: dict[str, list[Aggregation]] = {}
        for ref in features:
            view_name, _, feat = ref.partition(":")
            view = self.views.get(view_name)
            if view is None:
                raise DefinitionError(
                    f"unknown feature view {view_name!r} in {ref!r}; known views: {sorted(self.views)}"
                )
            aggs = out.setdefault(view_name, [])
            for agg in view.aggregations if not feat else [view.aggregation(feat)]:
                if all(a is not agg for a in aggs):
                    aggs.append(agg)
        return out

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
        at_ms = round(at.timestamp() * 1000)
        wanted = self._resolve(features)
        views = [self.views[v] for v in wanted]
        rows = self._entity_rows(entity_keys, views)
        values: dict[str, list[Any]] = {}
        times: dict[str, np.ndarray] = {}
        for view in views:
            aggs = wanted[view.name]
            ns = self.online.namespace(view.name, view.version)
            blobs = self.online.read_tiles(ns, self._entity_ids(view, rows))
            results = online_values(view, blobs, at_ms, aggs)
            for agg in aggs:
                vals, ts = results[agg.feature_name]
                values[f"{view.name}:{agg.feature_name}"] = _py_values(vals, agg)
                times[f"{view.name}:{agg.feature_name}"] = ts
        return OnlineFeatures(entities=rows, values=values, _times_ms=times)

    def get_training_set(
        self,
        entity_df: Any,
        features: Sequence[str],
        *,
        timestamp_column: str = "event_timestamp",
    ) -> pa.Table:
        """``entity_df`` plus one column per feature, each as of its row's timestamp.

        ``entity_df`` is a pyarrow Table or pandas DataFrame with the views' join keys and a
        timezone-aware ``timestamp_column``. No value uses an event after its row's timestamp.
        """
        table = (
            entity_df
            if isinstance(entity_df, pa.Table)
            else pa.Table.from_pandas(entity_df, preserve_index=False)
        )
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
        at_ms = pc.cast(table.column(timestamp_column), pa.timestamp("ms", "UTC")).cast(pa.int64()).to_numpy()
        wanted = self._resolve(features)
        out = table
        for view_name, aggs in wanted.items():
            view = self.views[view_name]
            missing = [k for k in view.entity.join_keys if k not in table.column_names]
            if missing:
                raise FeaturestreamError(f"entity_df lacks join keys {missing} of view {view_name!r}")
            ids = self._entity_ids(view, table.select(list(view.entity.join_keys)).to_pylist())
            lookback = view.max_lookback + view.tile_size
            start = datetime.fromtimestamp(int(at_ms.min()) / 1000, UTC) - lookback if len(at_ms) else None
            end = datetime.fromtimestamp(int(at_ms.max()) / 1000, UTC) if len(at_ms) else None
            uri = self.offline.table_uri(view.name, view.version)
            events = self.offline.read(uri, entities=sorted(set(ids)), start=start, end=end)
            if events is None:
                events = _empty_events(view)
            for name, (vals, _) in point_in_time_values(view, events, ids, at_ms, aggs).items():
                agg = view.aggregation(name)
                out = out.append_column(f"{view_name}:{name}", _arrow_values(vals, agg))
        return out


def _is_count(agg: Aggregation) -> bool:
    return agg.function == "count"


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
    text = tuple(c for c in view.columns if view.source.field(c).dtype == "str")  # type: ignore[union-attr]
    return event_schema(view.columns, text).empty_table()
