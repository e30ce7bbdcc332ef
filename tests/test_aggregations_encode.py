"""The feature server's encoders carry object values (text, lists, [{value, count}]) beside
floats and counts: JSON as lists/strings/null, Arrow as strings, lists and structs."""

from __future__ import annotations

import msgspec
import numpy as np

from engine.definitions import Aggregation
from featurestream.server.encode import Answer, arrow_table, json_online
from featurestream.server.reads import Block


def test_object_values_are_encoded_as_lists_strings_and_nulls() -> None:
    aggs = [
        Aggregation(function="last", column="m", window="1h"),
        Aggregation(function="last_n", column="m", n=2, window="1h"),
        Aggregation(function="top_k", column="m", k=2, window="1h"),
        Aggregation(function="count", window="1h"),
        Aggregation(function="percentile", column="x", q=0.5, window="1h"),
    ]
    values = np.empty((5, 2), dtype=object)
    values[0] = ["日本語", None]
    values[1, 0], values[1, 1] = ["b", ""], []
    values[2, 0], values[2, 1] = [{"value": "b", "count": 2}], []
    values[3] = [3.0, 0.0]
    values[4] = [1.5, float("nan")]
    block = Block(
        values=values,
        times=np.full((5, 2), 1_700_000_000_000.0),
        status=np.zeros((5, 2), dtype=np.int8),
        counts=np.array([False, False, False, True, False]),
    )
    answer = Answer(names=[a.feature_name for a in aggs], aggs=aggs, block=block)  # type: ignore[arg-type]
    doc = msgspec.json.decode(json_online({"user_id": ["a", "b"]}, answer))
    got = [r["values"] for r in doc["results"][1:]]
    assert got == [
        ["日本語", None],
        [["b", ""], []],
        [[{"value": "b", "count": 2}], []],
        [3, 0],
        [1.5, None],
    ]
    table = arrow_table({"user_id": ["a", "b"]}, answer)
    assert table.column("m_last_1h").to_pylist() == ["日本語", None]
    assert table.column("m_last_2_1h").to_pylist() == [["b", ""], []]
    assert table.column("m_top_2_1h").to_pylist() == [[{"value": "b", "count": 2}], []]
    assert table.column("events_count_1h").to_pylist() == [3, 0]
    assert table.column("x_p50_1h").to_pylist() == [1.5, None]
