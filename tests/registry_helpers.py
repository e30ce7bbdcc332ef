"""Shared by the registry version tests: a feature view to vary, and the change log as recorded."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from registry.core import Registry
from registry.schema import view_changes

AMOUNT = Field(name="amount", dtype="float")
USER = Field(name="user_id", dtype="str")
SUM_1H = Aggregation(function="sum", column="amount", window="1h", name="amount_sum_1h")
COUNT_1H = Aggregation(function="count", window="1h")


def make_view(
    name: str = "spend",
    aggs: tuple[Aggregation, ...] = (SUM_1H, COUNT_1H),
    fields: tuple[Field, ...] = (USER, AMOUNT),
    topic: str = "payments",
    **over: Any,
) -> FeatureView:
    source = EventSource(name="payments", topic=topic, timestamp_field="ts", fields=fields)
    values: dict[str, Any] = {
        "owner": "risk",
        "description": "Spend per user.",
        "tags": {"domain": "payments"},
        "tile_size": "1m",
        "allowed_lateness": "2m",
        **over,
    }
    entity = Entity(name="user", join_keys=("user_id",))
    return FeatureView(name=name, entity=entity, source=source, aggregations=aggs, **values)


def _change_kinds(registry: Registry) -> list[str]:
    with registry.read() as conn:
        return list(conn.execute(select(view_changes.c.kind).order_by(view_changes.c.id)).scalars())
