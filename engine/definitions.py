"""Declarative feature definitions.

Definitions are frozen pydantic models. An invalid one fails when it is built, with a
:class:`~engine.errors.DefinitionError` that names the field and the fix. A feature view's
``version`` hashes only what changes computed values, so editing a description, owner or tags
keeps the version (and its online keys, offline table and state) unchanged.
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
from engine.aggregations import FUNCTIONS, Aggregation, Derived, DriftThresholds, Window  # noqa: F401 (re-exported)
from engine.durations import duration_ms, format_duration, parse_duration
from engine.errors import DefinitionError
from engine.levels import levels_of, window_precision_ms

__all__ = [
    "Aggregation",
    "Derived",
    "DriftThresholds",
    "Entity",
    "EventSource",
    "FeatureView",
    "Field",
    "Window",
    "parse_duration",
]

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
NUMERIC = frozenset({"int", "float", "bool"})
TEXT_FUNCTIONS = ("count", "first", "last", "last_n", "count_distinct", "top_k")  # text columns too


class Field(_Definition):
    """A typed field of an event."""

    name: str
    dtype: Literal["int", "float", "str", "bool"]
    nullable: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FIELD.match(v):
            raise ValueError(f"{v!r} is not a valid field name; use letters, digits and '_'")
        return v


class Entity(_Definition):
    """What features describe (a user, a card); its join keys identify one instance."""

    name: str
    join_keys: tuple[str, ...]
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("join_keys")
    @classmethod
    def _keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("needs at least one join key, e.g. join_keys=('user_id',)")
        if len(set(v)) != len(v):
            raise ValueError("join keys repeat; list each once")
        return v


class EventSource(_Definition):
    """A Kafka topic of JSON events with a declared schema.

    Events that fail the schema go to ``dead_letter_topic`` with the reason. With
    ``format="debezium-json"`` the topic holds Debezium change events and each change whose op is
    in ``ops`` is one event: its fields come from the row image (``after``; ``before`` for a
    delete), its time from ``source.ts_ms``, and a field named ``op`` (if declared, a str) holds
    the op letter. This feeds windowed features of changes, e.g. orders created in the last day.
    """

    name: str
    topic: str
    timestamp_field: str
    timestamp_format: Literal["epoch_millis", "epoch_seconds", "iso8601"] = "epoch_millis"
    fields: tuple[Field, ...]
    format: Literal["json", "debezium-json"] = "json"
    ops: tuple[Literal["c", "u", "d", "r"], ...] = ("c", "u", "d", "r")
    dead_letter_topic: str | None = None
    dedup_key: str | None = None
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
    def _schema(self) -> EventSource:
        names = [f.name for f in self.fields]
        _check_field_names(names, "field")
        if self.timestamp_field in names:
            raise ValueError(
                f"timestamp_field {self.timestamp_field!r} is also in fields; remove it from fields "
                "(its type comes from timestamp_format)"
            )
        if self.format == "debezium-json":
            if self.timestamp_format != "epoch_millis":
                raise ValueError("timestamp_format: Debezium's source.ts_ms is in epoch_millis; use that")
            if not self.ops:
                raise ValueError("ops: select at least one change op, e.g. ops=('c',) for inserts")
            op = self.field("op")
            if op is not None and op.dtype != "str":
                raise ValueError("fields: 'op' holds the change's op letter; declare it with dtype='str'")
        elif self.ops != ("c", "u", "d", "r"):
            raise ValueError("ops: selects Debezium change ops; set format='debezium-json' or remove ops")
        if self.dedup_key is not None:
            key = self.field(self.dedup_key)
            if key is None or key.dtype not in ("str", "int") or key.nullable:
                raise ValueError(
                    f"dedup_key: {self.dedup_key!r} must name a non-nullable str or int field of the "
                    f"source; declare Field(name={self.dedup_key!r}, dtype='str') or fix the name"
                )
            if self.format == "debezium-json":
                raise ValueError(
                    "dedup_key: Debezium change events have no event id to deduplicate on; remove "
                    "dedup_key (use a TableView over a CdcSource, which orders changes per key)"
                )
        return self

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


class FeatureView(_Definition):
    """Windowed aggregations of one event source, per entity.

    ``tile_size`` is the precision of every window boundary: the stream keeps one partial
    aggregate per entity and tile, and reads combine the tiles a window covers.
    """

    name: str
    entity: Entity
    source: EventSource
    aggregations: tuple[Aggregation, ...]
    derived: tuple[Derived, ...] = ()
    tile_size: timedelta = timedelta(minutes=1)
    allowed_lateness: timedelta = timedelta(minutes=5)
    ttl: timedelta | None = None
    owner: str = ""
    description: str = ""
    tags: dict[str, str] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("tile_size", "allowed_lateness", "ttl", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureView:
        src = self.source
        for key in self.entity.join_keys:
            f = src.field(key)
            if f is None:
                raise ValueError(
                    f"entity.join_keys: {key!r} is not a field of source {src.name!r}; "
                    f"add Field(name={key!r}, dtype='str') to the source"
                )
            if f.dtype not in ("str", "int") or f.nullable:
                raise ValueError(f"entity.join_keys: {key!r} must be a non-nullable str or int field")
        tile = duration_ms(self.tile_size)
        if tile < 1000 or tile % 1000:
            raise ValueError("tile_size must be a whole number of seconds, at least 1s")
        if self.allowed_lateness < timedelta(0):
            raise ValueError("allowed_lateness must not be negative")
        if not self.aggregations:
            raise ValueError("aggregations: declare at least one Aggregation")
        names = [a.feature_name for a in self.aggregations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"aggregations: feature names {dupes} repeat; give each a distinct name=")
        for i, agg in enumerate(self.aggregations):
            where = f"aggregations.{i} ({agg.feature_name})"
            if agg.column is not None:
                f = src.field(agg.column)
                if f is None:
                    raise ValueError(
                        f"{where}: column {agg.column!r} is not a field of source {src.name!r}; "
                        f"declare it in the source or fix the name"
                    )
                if agg.function not in TEXT_FUNCTIONS and f.dtype not in NUMERIC:
                    raise ValueError(
                        f"{where}: {agg.function} needs a numeric column but {agg.column!r} is "
                        f"{f.dtype}; use {', '.join(TEXT_FUNCTIONS[:-1])} or {TEXT_FUNCTIONS[-1]}, "
                        "or aggregate a numeric field"
                    )
            w = agg.window
            if w.kind == "session":  # the gap splits events, not tiles: any positive duration
                continue
            for label, td in (("size", w.size), ("hop", w.hop)):
                if td is not None and duration_ms(td) % tile:
                    raise ValueError(
                        f"{where}: window {label} {format_duration(td)} is not a multiple of "
                        f"tile_size {format_duration(self.tile_size)}; change the window or use a "
                        f"tile_size that divides it"
                    )
            try:  # a long window reads coarse tiles (engine.levels); one no level bounds is refused
                window_precision_ms(agg, tile)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        _check_derived(names, self.derived)
        if self.ttl is not None and self.ttl < self.max_lookback:
            raise ValueError(
                f"ttl {format_duration(self.ttl)} is shorter than the longest window lookback "
                f"{format_duration(self.max_lookback)}; raise ttl or leave it unset"
            )
        return self

    @cached_property
    def max_lookback(self) -> timedelta:
        return max(a.window.lookback for a in self.aggregations)

    @cached_property
    def tile_levels_ms(self) -> tuple[int, ...]:
        """Tile sizes (ms) the view keeps, ``tile_size`` first, then the coarse levels its long
        windows read (engine.levels); just ``(tile_size,)`` for most views."""
        return levels_of(duration_ms(self.tile_size), self.aggregations)

    def window_precision(self, feature: str) -> timedelta:
        """The step a window's start moves in: ``tile_size``, or a coarse level for a long window."""
        agg = self.aggregation(feature)
        if not isinstance(agg, Aggregation):
            raise DefinitionError(f"{feature!r} is a derived feature; ask for the aggregations it reads")
        return timedelta(milliseconds=window_precision_ms(agg, duration_ms(self.tile_size)))

    @property
    def effective_ttl(self) -> timedelta:
        """How long an idle entity's online state lives: ttl, else lookback plus one tile."""
        return self.ttl or (self.max_lookback + self.tile_size)

    @cached_property
    def text_columns(self) -> tuple[str, ...]:
        """Aggregated text columns, stored offline as text; the stream sees their presence, and
        their values where an object aggregation reads them (engine.object_tiles)."""
        return tuple(c for c in self.columns if self.source.field(c).dtype == "str")  # type: ignore[union-attr]

    @cached_property
    def columns(self) -> tuple[str, ...]:
        """Aggregated columns, each once, in declaration order (the tile layout)."""
        seen: dict[str, None] = {}
        for a in self.aggregations:
            if a.column is not None:
                seen.setdefault(a.column, None)
        return tuple(seen)

    @property
    def features(self) -> tuple[Aggregation | Derived, ...]:
        """Every feature: the aggregations, then the derived features."""
        return (*self.aggregations, *self.derived)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(a.feature_name for a in self.features)

    def aggregation(self, feature: str) -> Aggregation | Derived:
        for a in self.features:
            if a.feature_name == feature:
                return a
        raise DefinitionError(
            f"feature view {self.name!r} has no feature {feature!r}; it has {list(self.feature_names)}"
        )

    def canonical(self) -> dict[str, Any]:
        """What determines computed values; the version hashes exactly this."""
        return {
            "name": self.name,
            "entity": {"join_keys": list(self.entity.join_keys)},
            "source": {
                "topic": self.source.topic,
                "format": self.source.format,
                **({"ops": sorted(self.source.ops)} if self.source.format == "debezium-json" else {}),
                "timestamp_field": self.source.timestamp_field,
                "timestamp_format": self.source.timestamp_format,
                "fields": sorted(
                    ([f.name, f.dtype, f.nullable] for f in self.source.fields), key=lambda x: x[0]
                ),
            },
            "aggregations": [
                {
                    "name": a.feature_name,
                    "function": a.function,
                    "column": a.column,
                    # Only when set, so the versions of views without them stay as they were.
                    **{p: getattr(a, p) for p in ("n", "k", "q") if getattr(a, p) is not None},
                    "window": [
                        a.window.kind,
                        duration_ms(a.window.size),
                        duration_ms(a.window.hop) if a.window.hop else None,
                        *([a.window.which or "current"] if a.window.kind == "session" else []),
                    ],
                }
                for a in self.aggregations
            ],
            "tile_ms": duration_ms(self.tile_size),
            "allowed_lateness_ms": duration_ms(self.allowed_lateness),
            # Only when set, so the versions of views without them stay as they were.
            **({"dedup_key": self.source.dedup_key} if self.source.dedup_key else {}),
            **({"derived": [[d.name, d.expression] for d in self.derived]} if self.derived else {}),
            # Only with coarse levels (windows longer than 10,000 tiles, refused before them).
            **({"tile_levels_ms": list(self.tile_levels_ms)} if len(self.tile_levels_ms) > 1 else {}),
        }

    @cached_property
    def version(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _check_derived(aggregated: list[str], derived: tuple[Derived, ...]) -> None:
    """Derived names are new, their inputs exist, and no derived feature depends on itself."""
    known = set(aggregated)
    by_name = {d.name: d for d in derived}
    for i, d in enumerate(derived):
        where = f"derived.{i} ({d.name})"
        if d.name in known:
            raise ValueError(f"{where}: the name {d.name!r} is already a feature of the view; rename it")
        known.add(d.name)
    for i, d in enumerate(derived):
        unknown = [n for n in d.inputs if n not in known]
        if unknown:
            raise ValueError(
                f"derived.{i} ({d.name}): expression names {unknown}, which are not features of the "
                f"view; use one of {sorted(known)} or add the aggregation"
            )
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2 or name not in by_name:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            i = list(by_name).index(name)
            raise ValueError(
                f"derived.{i} ({name}): expressions form a cycle {' -> '.join(cycle)}; "
                "make one of them use aggregations only"
            )
        state[name] = 1
        for n in by_name[name].inputs:
            visit(n, [*path, name])
        state[name] = 2

    for d in derived:
        visit(d.name, [])
