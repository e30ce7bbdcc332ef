"""Definitions: ``version`` hashes exactly what changes computed values."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from engine.definitions import Aggregation, Entity, Field, Window
from tests.definitions_helpers import aggregations, source, view

# ---------------------------------------------------------------------------------------------
# version


def test_version_stable_across_equal_definitions() -> None:
    a, b = view(), view()
    assert a is not b
    assert a.version == b.version
    assert len(a.version) == 12
    int(a.version, 16)
    # durations written differently are equal definitions
    c = view(tile_size=60, allowed_lateness="300s")
    assert c.version == a.version
    # field declaration order does not change computed values
    fields = source().fields
    assert view(source=source(fields=tuple(reversed(fields)))).version == a.version


@pytest.mark.parametrize(
    "edit",
    [
        {"description": "payments per user, for fraud"},
        {"owner": "risk-team"},
        {"tags": {"team": "risk", "tier": "1"}},
        {"ttl": "1d"},
        {"ttl": timedelta(hours=2)},
        {"entity": Entity(name="user", join_keys=("user_id",), description="a customer")},
        {"source": source(description="raw payments", dead_letter_topic="payments.bad")},
        {"source": source(name="payments_renamed")},
        {"entity": Entity(name="customer", join_keys=("user_id",))},
    ],
)
def test_version_unchanged_by_metadata(edit: dict[str, Any]) -> None:
    assert view(**edit).version == view().version


def _replace_agg(i: int, agg: Aggregation) -> tuple[Aggregation, ...]:
    aggs = list(aggregations())
    aggs[i] = agg
    return tuple(aggs)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(
            {
                "aggregations": _replace_agg(
                    1, Aggregation(function="sum", column="amount", window="20m", name="amount_sum_10m")
                )
            },
            id="window-size",
        ),
        pytest.param(
            {
                "aggregations": _replace_agg(
                    3,
                    Aggregation(
                        function="max",
                        column="amount",
                        window=Window.hopping("1h", "20m"),
                        name="amount_max_1h_every_10m",
                    ),
                )
            },
            id="window-hop",
        ),
        pytest.param(
            {
                "aggregations": _replace_agg(
                    1,
                    Aggregation(
                        function="sum", column="amount", window=Window.tumbling("10m"), name="amount_sum_10m"
                    ),
                )
            },
            id="window-kind",
        ),
        pytest.param(
            {
                "aggregations": _replace_agg(
                    1, Aggregation(function="mean", column="amount", window="10m", name="amount_sum_10m")
                )
            },
            id="function",
        ),
        pytest.param(
            {
                "aggregations": _replace_agg(
                    1, Aggregation(function="sum", column="score", window="10m", name="amount_sum_10m")
                )
            },
            id="column",
        ),
        pytest.param({"aggregations": aggregations()[:3]}, id="fewer-aggregations"),
        pytest.param({"tile_size": "30s"}, id="tile-size"),
        pytest.param({"allowed_lateness": "10m"}, id="lateness"),
        pytest.param({"name": "user_payments_v2"}, id="name"),
        pytest.param({"source": source(topic="payments.v2")}, id="topic"),
        pytest.param({"source": source(timestamp_format="epoch_seconds")}, id="timestamp-format"),
        pytest.param({"source": source(timestamp_field="event_time")}, id="timestamp-field"),
        pytest.param(
            {
                "source": source(
                    fields=(*source().fields[:4], Field(name="score", dtype="int"), source().fields[5])
                )
            },
            id="field-type",
        ),
        pytest.param(
            {
                "source": source(
                    fields=(*source().fields[:2], Field(name="amount", dtype="float"), *source().fields[3:])
                )
            },
            id="field-nullability",
        ),
        pytest.param(
            {"source": source(fields=(*source().fields, Field(name="extra", dtype="str")))},
            id="new-field",
        ),
        pytest.param(
            {
                "entity": Entity(name="user", join_keys=("user_id", "country")),
            },
            id="join-keys",
        ),
    ],
)
def test_version_changes_with_computed_values(edit: dict[str, Any]) -> None:
    base = view()
    changed = view(**edit)
    assert changed.version != base.version
    # and is itself stable
    assert view(**edit).version == changed.version


def test_version_of_a_copy_with_changes_is_recomputed() -> None:
    """``model_copy(update=...)`` (used by the demo to retarget a view) must not keep the version,
    lookback or columns cached from the original."""
    base = view()
    assert base.version and base.columns and base.max_lookback  # computed (and maybe cached) first
    new_source = source(topic="payments.other")
    copy = base.model_copy(update={"source": new_source})
    assert copy.version == view(source=new_source).version
    assert copy.version != base.version
    fewer = aggregations()[:2]
    copy2 = base.model_copy(update={"aggregations": fewer})
    fresh = view(aggregations=fewer)
    assert copy2.columns == fresh.columns == ("amount",)
    assert copy2.max_lookback == fresh.max_lookback == timedelta(hours=1)
    assert copy2.version == fresh.version
