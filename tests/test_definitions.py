"""Definitions: invalid ones fail when built with a message naming the field and the fix;
``version`` hashes exactly what changes computed values."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from engine.definitions import (
    Aggregation,
    Entity,
    EventSource,
    FeatureView,
    Field,
    Window,
    parse_duration,
)
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


def test_valid_view_builds() -> None:
    v = view()
    assert v.columns == ("amount", "score")
    assert v.feature_names == (
        "events_count_1h",
        "amount_sum_10m",
        "score_mean_1h_tumbling",
        "amount_max_1h_every_10m",
    )
    # a tumbling/hopping window reaches back size + hop from a read time
    assert v.max_lookback == timedelta(hours=2)
    assert v.effective_ttl == timedelta(hours=2, minutes=1)


# ---------------------------------------------------------------------------------------------
# invalid definitions


def test_unknown_aggregation_column() -> None:
    aggs = (Aggregation(function="sum", column="amout", window="10m"),)
    fails(
        lambda: view(aggregations=aggs),
        "aggregations.0",
        "'amout'",
        "not a field of source 'payments'",
        "fix the name",
    )


def test_non_numeric_column_for_sum() -> None:
    aggs = (Aggregation(function="sum", column="country", window="10m"),)
    fails(lambda: view(aggregations=aggs), "aggregations.0", "country", "numeric", "str", "use count")
    # count of a string column is fine
    assert view(aggregations=(Aggregation(function="count", column="country", window="10m"),)).columns == (
        "country",
    )


@pytest.mark.parametrize("function", ["sum", "mean", "min", "max", "last", "stddev"])
def test_every_numeric_function_rejects_str(function: str) -> None:
    aggs = (Aggregation(function=function, column="user_id", window="10m"),)
    fails(lambda: view(aggregations=aggs), "user_id", "numeric")


def test_window_not_multiple_of_tile_size() -> None:
    aggs = (Aggregation(function="count", window="90s"),)
    fails(
        lambda: view(aggregations=aggs),
        "aggregations.0",
        "window size 90s",
        "not a multiple of tile_size 1m",
        "tile_size that divides it",
    )
    # a finer tile fixes it
    assert view(aggregations=aggs, tile_size="30s").version


def test_hop_not_multiple_of_tile_size() -> None:
    aggs = (Aggregation(function="count", window=Window.hopping("1h", "90s")),)
    fails(lambda: view(aggregations=aggs), "window hop 90s", "tile_size 1m")


def test_too_many_tiles() -> None:
    aggs = (Aggregation(function="count", window="3h"),)
    fails(
        lambda: view(aggregations=aggs, tile_size="1s"), "aggregations.0", "10000 tiles", "coarser tile_size"
    )
    assert view(aggregations=aggs, tile_size="10s")


def test_ttl_shorter_than_longest_window() -> None:
    fails(lambda: view(ttl="1h"), "ttl 1h", "lookback 2h", "raise ttl")
    fails(lambda: view(ttl="119m"), "ttl 119m", "lookback 2h")
    assert view(ttl="2h").effective_ttl == timedelta(hours=2)


def test_missing_join_key_field() -> None:
    fails(
        lambda: view(entity=Entity(name="user", join_keys=("customer_id",))),
        "entity.join_keys",
        "'customer_id'",
        "add Field(name='customer_id'",
    )


@pytest.mark.parametrize(
    "field",
    [
        Field(name="user_id", dtype="str", nullable=True),
        Field(name="user_id", dtype="float"),
        Field(name="user_id", dtype="bool"),
    ],
)
def test_join_key_must_be_non_nullable_str_or_int(field: Field) -> None:
    src = source(
        fields=(field, Field(name="amount", dtype="float", nullable=True), Field(name="score", dtype="float"))
    )
    fails(lambda: view(source=src), "entity.join_keys", "'user_id'", "non-nullable str or int")


def test_int_join_key_ok() -> None:
    assert view(entity=Entity(name="merchant", join_keys=("merchant",))).entity.join_keys == ("merchant",)


def test_entity_join_keys_empty_or_repeated() -> None:
    fails(lambda: Entity(name="user", join_keys=()), "join_keys", "at least one join key")
    fails(lambda: Entity(name="user", join_keys=("a", "a")), "join_keys", "list each once")


def test_duplicate_feature_names() -> None:
    aggs = (
        Aggregation(function="sum", column="amount", window="10m"),
        Aggregation(function="sum", column="amount", window="10m"),
    )
    fails(lambda: view(aggregations=aggs), "aggregations", "amount_sum_10m", "distinct name=")
    named = (
        Aggregation(function="sum", column="amount", window="10m", name="total"),
        Aggregation(function="mean", column="score", window="10m", name="total"),
    )
    fails(lambda: view(aggregations=named), "'total'", "repeat")


def test_duplicate_source_fields() -> None:
    fails(
        lambda: source(fields=(Field(name="a", dtype="int"), Field(name="a", dtype="str"))),
        "fields",
        "'a'",
        "declare each field once",
    )


def test_timestamp_field_also_declared() -> None:
    fails(
        lambda: source(fields=(Field(name="ts", dtype="int"), Field(name="user_id", dtype="str"))),
        "timestamp_field 'ts'",
        "remove it from fields",
    )


def test_hopping_without_hop() -> None:
    fails(lambda: Window(kind="hopping", size="1h"), "Window", "needs hop", "Window.hopping(")
    fails(
        lambda: Aggregation(function="count", window={"kind": "hopping", "size": "1h"}), "window", "needs hop"
    )


def test_hop_on_sliding_or_tumbling() -> None:
    fails(
        lambda: Window(kind="sliding", size="1h", hop="10m"),
        "hop applies to hopping windows only",
        "remove it from the sliding window",
    )
    fails(lambda: Window(kind="tumbling", size="1h", hop="10m"), "remove it from the tumbling window")


def test_hop_larger_than_size_or_nonpositive_size() -> None:
    fails(lambda: Window.hopping("10m", "1h"), "hop must be positive and at most size")
    fails(lambda: Window.sliding(0), "size must be positive")
    fails(lambda: Window.sliding(timedelta(seconds=-5)), "size must be positive")


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: view(tile_sise="1m"), "tile_sise"),
        (lambda: view(aggregation=aggregations()), "aggregation"),
        (lambda: Field(name="a", dtype="int", nulable=True), "nulable"),
        (lambda: Aggregation(function="count", window="1h", colum="x"), "colum"),
        (lambda: Window(kind="sliding", size="1h", step="1m"), "step"),
        (lambda: Entity(name="user", join_keys=("user_id",), key="x"), "key"),
        (lambda: source(timestamp="ts"), "timestamp"),
    ],
)
def test_unknown_field_is_a_typo(build, field: str) -> None:
    msg = fails(build, f"{field}:", "is not a field of", "check its spelling")
    assert msg.startswith("invalid ")


def test_missing_required_field() -> None:
    fails(lambda: Aggregation(function="count"), "window", "is required; add it")
    fails(
        lambda: FeatureView(**{k: v for k, v in view_kwargs().items() if k != "source"}),
        "source",
        "is required",
    )


def test_function_without_column() -> None:
    fails(lambda: Aggregation(function="mean", window="1h"), "mean needs a column", "column='amount'")


def test_unknown_function_and_dtype() -> None:
    fails(lambda: Aggregation(function="median", column="x", window="1h"), "function")
    fails(lambda: Field(name="x", dtype="double"), "dtype")


@pytest.mark.parametrize("name", ["UserPayments", "1view", "user-payments", "", "a" * 64, "has space"])
def test_bad_view_names(name: str) -> None:
    fails(lambda: view(name=name), "name", "is not a valid name", "lower-case letters")


def test_name_errors_on_other_definitions() -> None:
    fails(lambda: Entity(name="User", join_keys=("user_id",)), "name", "not a valid name")
    fails(lambda: source(name="Payments"), "name", "not a valid name")
    fails(lambda: Field(name="1st", dtype="int"), "name", "not a valid field name")
    fails(lambda: Field(name="a-b", dtype="int"), "not a valid field name")
    fails(lambda: Aggregation(function="count", window="1h", name="Total"), "not a valid name")
    fails(lambda: source(topic="bad topic"), "topic", "not a valid Kafka topic name")
    # the view name appears in the message head
    msg = fails(lambda: view(name="user_payments", tile_sise="1m"))
    assert "FeatureView 'user_payments'" in msg


@pytest.mark.parametrize("bad", ["10 minutes", "1.5h", "10", "-5s", "5y", "", "h", True, None, [1]])
def test_bad_duration_strings(bad: Any) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        parse_duration(bad)
    fails(lambda: Window.sliding(bad) if bad is not None else Window(size=None), "size")
    if bad is not None:
        fails(lambda: view(tile_size=bad), "tile_size")
        fails(lambda: view(allowed_lateness=bad), "allowed_lateness")


def test_bad_duration_message_suggests_a_format() -> None:
    msg = fails(
        lambda: view(tile_size="1 minute"), "tile_size", "cannot read '1 minute' as a duration", "'30s'"
    )
    assert "FeatureView" in msg
    fails(lambda: Aggregation(function="count", window="an hour"), "window", "cannot read 'an hour'")


def test_tile_size_whole_seconds() -> None:
    fails(lambda: view(tile_size="500ms"), "tile_size must be a whole number of seconds")
    fails(lambda: view(tile_size=1.5), "tile_size must be a whole number of seconds")


def test_negative_lateness() -> None:
    fails(lambda: view(allowed_lateness=timedelta(seconds=-1)), "allowed_lateness must not be negative")


def test_empty_aggregations_and_fields() -> None:
    fails(lambda: view(aggregations=()), "aggregations", "at least one Aggregation")
    fails(lambda: source(fields=()), "fields", "at least one field")


def test_unknown_feature_lookup() -> None:
    v = view()
    assert v.aggregation("amount_sum_10m").function == "sum"
    fails(lambda: v.aggregation("nope"), "'nope'", "amount_sum_10m")


def test_definitions_are_frozen() -> None:
    v = view()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        v.name = "other"  # type: ignore[misc]
    assert v.name == "user_payments"


# ---------------------------------------------------------------------------------------------
# parse_duration


@pytest.mark.parametrize(
    "value, expected",
    [
        ("30s", timedelta(seconds=30)),
        ("10m", timedelta(minutes=10)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
        ("2w", timedelta(weeks=2)),
        ("250ms", timedelta(milliseconds=250)),
        (" 5 m ", timedelta(minutes=5)),
        (timedelta(minutes=3), timedelta(minutes=3)),
        (90, timedelta(seconds=90)),
        (1.5, timedelta(seconds=1.5)),
        (0, timedelta(0)),
    ],
)
def test_parse_duration_accepts(value: Any, expected: timedelta) -> None:
    assert parse_duration(value) == expected


def test_windows_accept_every_duration_form() -> None:
    forms = ["1h", 3600, 3600.0, timedelta(hours=1), "60m", "3600s"]
    windows = [Window.sliding(f) for f in forms]
    assert all(w == windows[0] for w in windows)
    assert {Aggregation(function="count", window=f).feature_name for f in forms} == {"events_count_1h"}


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
