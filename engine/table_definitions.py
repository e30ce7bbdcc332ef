"""Definitions of change-data-capture sources and the table views computed from them.

A :class:`CdcSource` is a Kafka topic of Debezium change events (JSON, with or without the
``schema``/``payload`` wrapper) of one database table. A :class:`TableView` aggregates the rows
that exist *now* in that table, grouped by an entity column: an update retracts the old row and
adds the new one, a delete retracts it. Unlike a :class:`~engine.definitions.FeatureView` there
are no windows: the value is the table's current state (online) or its state as of a time
(offline). Like feature views, a table view's ``version`` hashes only what changes values.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from functools import cached_property
from typing import Any, Literal

from pydantic import field_validator, model_validator

from engine._model import _check_field_names, _check_name, _check_topic, _Definition
from engine.aggregations import DriftThresholds
from engine.definitions import NUMERIC, Entity, Field
from engine.durations import format_duration, parse_duration
from engine.errors import DefinitionError

__all__ = ["CdcSource", "TableFeature", "TableView"]

TABLE_FUNCTIONS = ("count", "sum", "mean", "min", "max", "count_distinct", "latest")


class CdcSource(_Definition):
    """A Kafka topic of Debezium change events of one table.

    ``primary_key`` names the table's key columns: they come from the message key (Debezium's
    key JSON), else from the row image. ``fields`` are the columns used by views (others are
    ignored). Events that fail go to ``dead_letter_topic`` with the reason.
    """

    name: str
    topic: str
    primary_key: tuple[str, ...]
    fields: tuple[Field, ...]
    dead_letter_topic: str | None = None
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        return _check_topic(v)

    @model_validator(mode="after")
    def _schema(self) -> CdcSource:
        names = [f.name for f in self.fields]
        _check_field_names(names, "column of the table", "column")
        if not self.primary_key:
            raise ValueError("primary_key: name the table's key columns, e.g. primary_key=('id',)")
        for key in self.primary_key:
            f = self.field(key)
            if f is None:
                raise ValueError(
                    f"primary_key: {key!r} is not in fields; add Field(name={key!r}, dtype='int') to fields"
                )
            if f.dtype not in ("str", "int") or f.nullable:
                raise ValueError(f"primary_key: {key!r} must be a non-nullable str or int field")
        return self

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


class TableFeature(_Definition):
    """One aggregate of the current rows of an entity.

    ``count`` without a column counts rows; with one, its non-null values. ``count_distinct``
    counts distinct non-null values. ``latest`` is the column of the row whose primary key is the
    entity itself (the view's entity must be the source's primary key).
    """

    function: Literal["count", "sum", "mean", "min", "max", "count_distinct", "latest"]
    column: str | None = None
    name: str | None = None
    drift: DriftThresholds = DriftThresholds()

    @model_validator(mode="after")
    def _check(self) -> TableFeature:
        if self.function != "count" and self.column is None:
            raise ValueError(f"{self.function} needs a column; add column='...'")
        if self.name is not None and not re.match(r"^[a-z][a-z0-9_]{0,62}$", self.name):
            raise ValueError(f"name {self.name!r}: use lower-case letters, digits and '_'")
        return self

    @property
    def feature_name(self) -> str:
        if self.name:
            return self.name
        if self.function == "latest":
            return str(self.column)
        return f"{self.column or 'rows'}_{self.function}"


class TableView(_Definition):
    """Aggregates of a CDC source's current rows, per entity (e.g. open orders per customer).

    The entity's join keys are columns of the table. A row whose entity column is null belongs
    to no entity. An update that changes the entity column moves the row between entities.
    ``ttl`` (default none) expires online values of entities without changes.
    """

    name: str
    entity: Entity
    source: CdcSource
    features: tuple[TableFeature, ...]
    ttl: timedelta | None = None
    owner: str = ""
    description: str = ""
    tags: dict[str, str] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("ttl", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _consistent(self) -> TableView:
        src = self.source
        for key in self.entity.join_keys:
            f = src.field(key)
            if f is None:
                raise ValueError(
                    f"entity.join_keys: {key!r} is not a column of source {src.name!r}; "
                    f"add Field(name={key!r}, dtype='str') to the source"
                )
            if f.dtype not in ("str", "int"):
                raise ValueError(f"entity.join_keys: {key!r} must be a str or int column")
        if not self.features:
            raise ValueError("features: declare at least one TableFeature")
        names = [f.feature_name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"features: feature names {dupes} repeat; give each a distinct name=")
        for i, feat in enumerate(self.features):
            where = f"features.{i} ({feat.feature_name})"
            if feat.column is not None:
                f = src.field(feat.column)
                if f is None:
                    raise ValueError(
                        f"{where}: column {feat.column!r} is not a field of source {src.name!r}; "
                        "declare it in the source or fix the name"
                    )
                if feat.function in ("sum", "mean", "min", "max") and f.dtype not in NUMERIC:
                    raise ValueError(
                        f"{where}: {feat.function} needs a numeric column but {feat.column!r} is "
                        f"{f.dtype}; use count, count_distinct or latest, or a numeric column"
                    )
            if feat.function == "latest" and tuple(self.entity.join_keys) != tuple(src.primary_key):
                raise ValueError(
                    f"{where}: latest reads the row keyed by the entity, so entity.join_keys "
                    f"{list(self.entity.join_keys)} must equal the source's primary_key "
                    f"{list(src.primary_key)}; use another aggregate or key the view by the primary key"
                )
        if self.ttl is not None and self.ttl <= timedelta(0):
            raise ValueError(f"ttl {format_duration(self.ttl)} must be positive, or None for no expiry")
        return self

    # -- what the engine and the registry ask of every view ------------------------------------

    @property
    def aggregations(self) -> tuple[TableFeature, ...]:
        """The features (the registry reads views' features under this name)."""
        return self.features

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.feature_name for f in self.features)

    @cached_property
    def columns(self) -> tuple[str, ...]:
        """Columns the view reads: entity keys, then aggregated columns, each once."""
        seen: dict[str, None] = dict.fromkeys(self.entity.join_keys)
        for f in self.features:
            if f.column is not None:
                seen.setdefault(f.column, None)
        return tuple(seen)

    def aggregation(self, feature: str) -> TableFeature:
        for f in self.features:
            if f.feature_name == feature:
                return f
        raise DefinitionError(
            f"table view {self.name!r} has no feature {feature!r}; it has {list(self.feature_names)}"
        )

    @property
    def effective_ttl(self) -> timedelta:
        return self.ttl or timedelta(0)

    def canonical(self) -> dict[str, Any]:
        """What determines computed values; the version hashes exactly this."""
        return {
            "kind": "table",
            "name": self.name,
            "entity": {"join_keys": list(self.entity.join_keys)},
            "source": {
                "topic": self.source.topic,
                "format": "debezium-json",
                "primary_key": list(self.source.primary_key),
                "fields": sorted(
                    ([f.name, f.dtype, f.nullable] for f in self.source.fields), key=lambda x: x[0]
                ),
            },
            "features": [
                {"name": f.feature_name, "function": f.function, "column": f.column} for f in self.features
            ],
        }

    @cached_property
    def version(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
