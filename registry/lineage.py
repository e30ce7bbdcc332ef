"""Lineage: source topic -> feature view version -> training set -> model.

A training set row pins everything its values came from: the view versions (immutable
definitions), the Delta table version read for each, and a content-addressed Parquet snapshot of
the entity set. A model points at one training set, so a model version names exactly the feature
definitions, offline data and entities that trained it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from registry.core import Registry, RegistryError, now
from registry.lineage_graph import KINDS, LineageGraph, LineageNode  # noqa: F401 (KINDS: re-exported)
from registry.lineage_render import render_lineage
from registry.schema import models as models_table
from registry.schema import training_sets, view_versions
from registry.versions import ViewVersion, versions

__all__ = [
    "LineageGraph",
    "LineageNode",
    "ModelLineage",
    "ModelRecord",
    "TrainingSetRecord",
    "get_training_set_record",
    "lineage_graph",
    "model_lineage",
    "models",
    "record_training_set",
    "register_model",
    "render_lineage",
    "view_versions_by_id",
]


@dataclass(frozen=True)
class TrainingSetRecord:
    id: int
    name: str
    features: list[str]  # output columns, "view:feature", in order
    view_version_ids: list[int]
    delta_versions: dict[str, int | None]  # table uri -> Delta version read (None: no table yet)
    entity_uri: str
    entity_sha256: str
    entity_rows: int
    timestamp_column: str
    created_at: datetime

    @property
    def label(self) -> str:
        return f"training set #{self.id}" + (f" {self.name}" if self.name else "")


@dataclass(frozen=True)
class ModelRecord:
    id: int
    name: str
    version: str
    training_set_id: int
    parameters: dict[str, Any]
    metrics: dict[str, Any]
    created_at: datetime

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ModelLineage:
    """Everything needed to rebuild a model's training data."""

    model: ModelRecord
    training_set: TrainingSetRecord
    view_versions: list[ViewVersion]
    source_topics: list[str]


def _json(value: Any, what: str) -> Any:
    """A JSON-safe, canonical copy (so stored and given values compare equal)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} must be JSON-serialisable with finite numbers: {exc}") from None


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)  # SQLite drops the zone


def _ts_record(row: Any) -> TrainingSetRecord:
    m = dict(row._mapping)
    m.update(created_at=_utc(m["created_at"]), view_version_ids=[int(i) for i in m["view_version_ids"]])
    return TrainingSetRecord(**m)


def _model_record(row: Any) -> ModelRecord:
    return ModelRecord(**{**row._mapping, "created_at": _utc(row.created_at)})


def view_versions_by_id(registry: Registry, ids: Sequence[int]) -> list[ViewVersion]:
    """View versions by id, in the order given."""
    by_id = {v.id: v for v in versions(registry)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RegistryError(f"view versions {missing} are not in the registry")
    return [by_id[i] for i in ids]


def record_training_set(
    registry: Registry,
    *,
    features: Sequence[str],
    view_version_ids: Sequence[int],
    delta_versions: dict[str, int | None],
    entity_uri: str,
    entity_sha256: str,
    entity_rows: int,
    timestamp_column: str,
    name: str = "",
) -> TrainingSetRecord:
    """Store a built training set's inputs; returns the new record (with its id)."""
    ids = [int(i) for i in view_version_ids]
    if not ids:
        raise RegistryError("a training set needs at least one feature view version")
    with registry.write_lock("lineage") as conn:
        known = set(conn.execute(select(view_versions.c.id).where(view_versions.c.id.in_(ids))).scalars())
        missing = [i for i in ids if i not in known]
        if missing:
            raise RegistryError(f"view versions {missing} are not in the registry; run `featurestream apply`")
        row_id = conn.execute(
            training_sets.insert().values(
                name=name,
                features=list(features),
                view_version_ids=ids,
                delta_versions=_json(delta_versions, "delta_versions"),
                entity_uri=entity_uri,
                entity_sha256=entity_sha256,
                entity_rows=int(entity_rows),
                timestamp_column=timestamp_column,
                created_at=now(),
            )
        ).inserted_primary_key[0]
        row = conn.execute(select(training_sets).where(training_sets.c.id == row_id)).one()
    return _ts_record(row)


def get_training_set_record(registry: Registry, training_set_id: int) -> TrainingSetRecord:
    with registry.read() as conn:
        row = conn.execute(select(training_sets).where(training_sets.c.id == int(training_set_id))).first()
    if row is None:
        raise RegistryError(f"training set #{training_set_id} is not in the registry")
    return _ts_record(row)


def _model_row(conn: Connection, name: str, version: str) -> Any:
    return conn.execute(
        select(models_table).where(models_table.c.name == name, models_table.c.version == version)
    ).first()


def register_model(
    registry: Registry,
    name: str,
    version: str | int,
    training_set_id: int,
    parameters: dict[str, Any],
    metrics: dict[str, Any],
) -> ModelRecord:
    """Record a model version trained on a training set. Re-registering the same content returns
    the existing record; the same (name, version) with different content is refused."""
    version = str(version)
    if not name or not version:
        raise RegistryError("a model needs a non-empty name and version")
    params = _json(parameters, "parameters")
    mets = _json(metrics, "metrics")
    with registry.write_lock("lineage") as conn:
        existing = _model_row(conn, name, version)
        if existing is not None:
            stored = (existing.training_set_id, _json(existing.parameters, ""), _json(existing.metrics, ""))
            if stored != (int(training_set_id), params, mets):
                raise RegistryError(
                    f"model {name}@{version} is already registered with a different training set, "
                    "parameters or metrics; register a new version instead"
                )
            return _model_record(existing)
        found = conn.execute(
            select(training_sets.c.id).where(training_sets.c.id == int(training_set_id))
        ).first()
        if found is None:
            raise RegistryError(f"training set #{training_set_id} is not in the registry")
        conn.execute(
            models_table.insert().values(
                name=name,
                version=version,
                training_set_id=int(training_set_id),
                parameters=params,
                metrics=mets,
                created_at=now(),
            )
        )
        return _model_record(_model_row(conn, name, version))


def models(registry: Registry, name: str | None = None) -> list[ModelRecord]:
    """Registered models (all, or the versions of one), oldest first per name."""
    query = select(models_table).order_by(models_table.c.name, models_table.c.id)
    if name is not None:
        query = query.where(models_table.c.name == name)
    with registry.read() as conn:
        return [_model_record(r) for r in conn.execute(query)]


def model_lineage(registry: Registry, name: str, version: str | int) -> ModelLineage:
    """The training set, view versions (with definitions) and topics behind one model version."""
    with registry.read() as conn:
        row = _model_row(conn, name, str(version))
    if row is None:
        known = [m.version for m in models(registry, name)]
        hint = f"; its versions: {known}" if known else "; no model has that name"
        raise RegistryError(f"model {name}@{version} is not registered{hint}")
    model = _model_record(row)
    ts = get_training_set_record(registry, model.training_set_id)
    vvs = view_versions_by_id(registry, ts.view_version_ids)
    return ModelLineage(model, ts, vvs, sorted({v.source_topic for v in vvs}))


def _ts_node(ts: TrainingSetRecord) -> LineageNode:
    detail = {"rows": ts.entity_rows, "entity_sha256": ts.entity_sha256, "delta_versions": ts.delta_versions}
    return LineageNode(f"training_set:{ts.id}", "training_set", ts.label, detail)


def _add_views(graph: LineageGraph, vvs: Sequence[ViewVersion]) -> None:
    for vv in vvs:
        topic = graph.add(LineageNode(f"topic:{vv.source_topic}", "topic", vv.source_topic))
        detail = {"version_hash": vv.version_hash, "status": vv.status}
        node = graph.add(LineageNode(f"view_version:{vv.id}", "view_version", vv.label, detail))
        graph.edges.add((topic, node))


def lineage_graph(registry: Registry, name: str) -> LineageGraph:
    """The lineage of a model (all its versions) or of a feature view (all its versions, the
    training sets that read them and the models trained on those)."""
    graph = LineageGraph(name)
    by_id = {v.id: v for v in versions(registry)}
    with registry.read() as conn:
        model_rows = [
            _model_record(r) for r in conn.execute(select(models_table).order_by(models_table.c.id))
        ]
        ts_rows = {r.id: _ts_record(r) for r in conn.execute(select(training_sets))}
    view_ids = [v.id for v in by_id.values() if v.name == name]
    named = [m for m in model_rows if m.name == name]
    if not named and not view_ids:
        raise RegistryError(
            f"no model or feature view named {name!r} is in the registry; record views with "
            "`featurestream apply PIPELINE.py`, models with registry.register_model(...)"
        )
    chosen_sets = {m.training_set_id for m in named}
    chosen_sets |= {t.id for t in ts_rows.values() if set(t.view_version_ids) & set(view_ids)}
    chosen_models = {m.id: m for m in named}
    chosen_models.update({m.id: m for m in model_rows if m.training_set_id in chosen_sets})
    _add_views(graph, [by_id[i] for i in view_ids])
    for ts_id in sorted(chosen_sets):
        ts = ts_rows[ts_id]
        node = graph.add(_ts_node(ts))
        # For a model, every input of its training sets; for a view, only that view's versions.
        ids = ts.view_version_ids if named else [i for i in ts.view_version_ids if i in view_ids]
        _add_views(graph, [by_id[i] for i in ids])
        graph.edges.update((f"view_version:{i}", node) for i in ids)
    for m in chosen_models.values():
        detail = {"parameters": m.parameters, "metrics": m.metrics}
        node = graph.add(LineageNode(f"model:{m.id}", "model", m.label, detail))
        graph.edges.add((f"training_set:{m.training_set_id}", node))
    return graph
