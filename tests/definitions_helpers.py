"""Shared by the definition tests: a valid view to vary, and ``fails`` to check error messages."""

from __future__ import annotations

from typing import Any

import pytest

from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from engine.errors import DefinitionError, FeaturestreamError


def source(**over: Any) -> EventSource:
    kw: dict[str, Any] = {
        "name": "payments",
        "topic": "payments.v1",
        "timestamp_field": "ts",
        "fields": (
            Field(name="user_id", dtype="str"),
            Field(name="merchant", dtype="int"),
            Field(name="amount", dtype="float", nullable=True),
            Field(name="country", dtype="str"),
            Field(name="score", dtype="float"),
            Field(name="flag", dtype="bool"),
        ),
    }
    kw.update(over)
    return EventSource(**kw)


def aggregations() -> tuple[Aggregation, ...]:
    return (
        Aggregation(function="count", window="1h"),
        Aggregation(function="sum", column="amount", window=Window.sliding("10m")),
        Aggregation(function="mean", column="score", window=Window.tumbling("1h")),
        Aggregation(function="max", column="amount", window=Window.hopping("1h", "10m")),
    )


def view_kwargs(**over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "name": "user_payments",
        "entity": Entity(name="user", join_keys=("user_id",)),
        "source": source(),
        "aggregations": aggregations(),
    }
    kw.update(over)
    return kw


def view(**over: Any) -> FeatureView:
    return FeatureView(**view_kwargs(**over))


def fails(build, *needles: str) -> str:
    """``build()`` raises DefinitionError whose message contains every needle."""
    with pytest.raises(DefinitionError) as info:
        build()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message:\n{msg}"
    assert isinstance(info.value, FeaturestreamError)
    assert isinstance(info.value, ValueError)
    return msg
