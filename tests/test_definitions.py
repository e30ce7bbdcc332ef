"""Definitions: invalid ones fail when built with a message naming the field and the fix;
durations parse in every documented form. ``version`` is in ``tests/test_definitions_version.py``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from engine.definitions import Aggregation, Entity, FeatureView, Field, Window, parse_duration
from tests.definitions_helpers import aggregations, fails, source, view, view_kwargs


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


@pytest.mark.parametrize("function", ["sum", "mean", "min", "max", "stddev"])  # last: text too
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
    # 10,800 tiles of 1s: the window reads 1-hour tiles for its tail (engine.levels) ...
    aggs = (Aggregation(function="count", window="3h"),)
    assert view(aggregations=aggs, tile_size="1s").tile_levels_ms == (1000, 3_600_000)
    assert view(aggregations=aggs, tile_size="10s").tile_levels_ms == (10_000,)
    # ... but no coarse tile divides a tumbling 3h30m window: refused, naming the fix.
    odd = (Aggregation(function="count", window=Window.tumbling("210m")),)
    fails(
        lambda: view(aggregations=odd, tile_size="1s"),
        "aggregations.0",
        "10000 tiles",
        "whole hours or days",
        "coarser tile_size",
    )
    assert view(aggregations=odd, tile_size="10s")


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
