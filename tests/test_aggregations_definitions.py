"""Definitions of the object aggregations: parameters checked with the fix named, names, which
columns they take, and versions (a parameter changes the version; views without them keep theirs)."""

from __future__ import annotations

import pytest

from engine.definitions import Aggregation, Window
from engine.object_tiles import object_specs, object_text_columns
from engine.tiles import TileLayout
from tests.definitions_helpers import aggregations, fails, view


def test_parameters_are_required_bounded_and_only_where_they_apply() -> None:
    fails(lambda: Aggregation(function="last_n", column="country", window="1h"), "n from 1 to 1000", "n=5")
    fails(lambda: Aggregation(function="last_n", column="country", n=1001, window="1h"), "n from 1 to 1000")
    fails(lambda: Aggregation(function="top_k", column="country", k=0, window="1h"), "k from 1 to 1000")
    fails(
        lambda: Aggregation(function="percentile", column="amount", window="1h"), "q strictly between 0 and 1"
    )
    fails(lambda: Aggregation(function="percentile", column="amount", q=1.0, window="1h"), "q=0.99")
    fails(lambda: Aggregation(function="sum", column="amount", n=3, window="1h"), "n applies to last_n only")
    fails(lambda: Aggregation(function="last_n", column="country", n=3, q=0.5, window="1h"), "q applies to")
    fails(lambda: Aggregation(function="first", window="1h"), "first needs a column")


def test_feature_names() -> None:
    names = [
        Aggregation(function="last_n", column="country", n=5, window="1h").feature_name,
        Aggregation(function="top_k", column="country", k=3, window=Window.tumbling("1h")).feature_name,
        Aggregation(function="percentile", column="amount", q=0.5, window="1h").feature_name,
        Aggregation(function="percentile", column="amount", q=0.999, window="1h").feature_name,
        Aggregation(function="count_distinct", column="country", window="1h").feature_name,
        Aggregation(function="first", column="amount", window="1h").feature_name,
    ]
    assert names == [
        "country_last_5_1h",
        "country_top_3_1h_tumbling",
        "amount_p50_1h",
        "amount_p99_9_1h",
        "country_count_distinct_1h",
        "amount_first_1h",
    ]


@pytest.mark.parametrize("function", ["first", "last", "count_distinct"])
def test_text_columns_take_the_value_functions(function: str) -> None:
    v = view(aggregations=(Aggregation(function=function, column="country", window="10m"),))
    assert object_text_columns(v) == ("country",)
    assert TileLayout.of(v).objects


def test_percentile_of_text_is_refused_with_the_fix() -> None:
    aggs = (Aggregation(function="percentile", column="country", q=0.5, window="10m"),)
    fails(lambda: view(aggregations=aggs), "aggregations.0", "numeric", "use count, first")


def test_specs_are_shared_and_numeric_views_have_none() -> None:
    plain = view()
    assert object_specs(plain) == () and TileLayout.of(plain).objects == ()
    aggs = (
        *aggregations(),
        Aggregation(function="last_n", column="country", n=2, window="10m"),
        Aggregation(function="last_n", column="country", n=7, window="1h"),
        Aggregation(function="first", column="country", window="1h"),
        Aggregation(function="percentile", column="amount", q=0.5, window="1h"),
        Aggregation(function="percentile", column="amount", q=0.9, window="1h"),
        Aggregation(function="last", column="amount", window="1h"),  # numeric last: the tile row
    )
    specs = object_specs(view(aggregations=aggs))
    assert [(s.kind, s.column, s.n) for s in specs] == [("order", "country", 7), ("quantile", "amount", 1)]


def test_parameters_change_the_version_and_plain_views_keep_theirs() -> None:
    def with_(**kw: object) -> str:
        extra = Aggregation(column="country", window="10m", **kw)  # type: ignore[arg-type]
        return view(aggregations=(*aggregations(), extra)).version

    assert with_(function="last_n", n=3) != with_(function="last_n", n=4)
    assert with_(function="top_k", k=3, name="t") != with_(function="top_k", k=2, name="t")
    assert "n" not in view().canonical()["aggregations"][0]
