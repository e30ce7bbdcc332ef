"""EventDecoder: good events to columns, every bad one to a failure with its reason.

The whole-batch fast path and the per-message fallback must accept exactly the same events and
produce the same columns. Bad events are in ``tests/test_decode_bad.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.decode import EventDecoder, Reason
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from tests.decode_helpers import (
    _DROP,
    T0,
    VIEW,
    assert_consistent,
    assert_same,
    enc,
    event,
    make_view,
    per_message,
)

# ---------------------------------------------------------------------------------------------
# good events


def test_good_batch_decodes_to_columns() -> None:
    evs = [event(i) for i in range(5)]
    evs[3]["amount"] = None
    evs[4]["fraud"] = None
    evs[2]["note"] = None
    d = EventDecoder(VIEW).decode([enc(e) for e in evs])
    assert_consistent(d, 5)
    assert d.failures == []
    assert d.index.tolist() == [0, 1, 2, 3, 4]
    assert d.entity == ["u0", "u1", "u2", "u0", "u1"]
    assert d.ts.tolist() == [T0 + 1000 * i for i in range(5)]
    assert VIEW.columns == ("amount", "qty", "fraud")
    amount, qty, fraud = d.columns
    np.testing.assert_array_equal(amount, [0.0, 1.5, 3.0, np.nan, 6.0])
    np.testing.assert_array_equal(qty, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(fraud, [1.0, 0.0, 1.0, 0.0, np.nan])
    assert all(c.dtype == np.float64 for c in d.columns)


def test_nullable_field_may_be_absent() -> None:
    d = EventDecoder(VIEW).decode([enc(event(1, amount=_DROP, fraud=_DROP))])
    assert d.failures == []
    assert np.isnan(d.columns[0][0])
    assert np.isnan(d.columns[2][0])


def test_empty_batch() -> None:
    d = EventDecoder(VIEW).decode([])
    assert_consistent(d, 0)
    assert d.entity == []
    assert d.failures == []


def test_composite_keys_joined_with_bar() -> None:
    dec = EventDecoder(make_view(keys=("user_id", "shop")))
    d = dec.decode([enc(event(i)) for i in range(3)])
    assert d.entity == ["u0|10", "u1|11", "u2|12"]
    dec2 = EventDecoder(make_view(keys=("shop",)))
    assert dec2.decode([enc(event(7))]).entity == ["17"]


def test_composite_keys_never_collide() -> None:
    view = FeatureView(
        name="visits",
        entity=Entity(name="visitor", join_keys=("user_id", "region")),
        source=EventSource(
            name="visits",
            topic="visits",
            timestamp_field="ts",
            fields=(Field(name="user_id", dtype="str"), Field(name="region", dtype="str")),
        ),
        aggregations=(Aggregation(function="count", window="1h"),),
    )
    pairs = [("a|b", "c"), ("a", "b|c"), ("a\\", "|c"), ("a\\|", "c"), ("a", "b")]
    values = [enc({"user_id": u, "region": r, "ts": T0}) for u, r in pairs]
    d = EventDecoder(view).decode(values)
    assert d.failures == []
    assert len(set(d.entity)) == len(pairs), d.entity
    assert d.entity[-1] == "a|b"
    # the fast path and the per-message path name entities alike
    assert d.entity == per_message(EventDecoder(view), values).entity


@pytest.mark.parametrize(
    "fmt, raw, ms",
    [
        ("epoch_millis", T0, T0),
        ("epoch_millis", 0, 0),
        ("epoch_seconds", 1_700_000_000, T0),
        ("epoch_seconds", 1_700_000_000.123, T0 + 123),
        ("epoch_seconds", 1_700_000_000.0006, T0 + 1),
        ("epoch_seconds", 1_700_000_000.9994, T0 + 999),
        ("iso8601", "2023-11-14T22:13:20Z", T0),
        ("iso8601", "2023-11-14T22:13:20.250+00:00", T0 + 250),
        ("iso8601", "2023-11-15T00:13:20+02:00", T0),
        ("iso8601", "2023-11-14T17:13:20.5-05:00", T0 + 500),
    ],
)
def test_timestamp_formats(fmt: str, raw: Any, ms: int) -> None:
    d = EventDecoder(make_view(fmt)).decode([enc(event(0, ts=raw))])
    assert d.failures == []
    assert d.ts.tolist() == [ms]


def test_fast_path_and_fallback_agree_on_good_events() -> None:
    for fmt, ts in (("epoch_millis", T0), ("epoch_seconds", T0 / 1000), ("iso8601", "2023-11-14T22:13:20Z")):
        dec = EventDecoder(make_view(fmt))
        values = [enc(event(i, ts=ts, amount=None if i % 4 == 0 else 0.25 * i)) for i in range(8)]
        fast = dec.decode(values)
        assert fast.failures == []
        assert_same(fast, per_message(dec, values))
        # a bad message forces the fallback over the whole batch: the good ones come out the same
        mixed = dec.decode([*values, b"not json"])
        assert [(i, r) for i, r, _ in mixed.failures] == [(8, Reason.MALFORMED)]
        np.testing.assert_array_equal(mixed.index, fast.index)
        assert mixed.entity == fast.entity
        np.testing.assert_array_equal(mixed.ts, fast.ts)
        for x, y in zip(mixed.columns, fast.columns, strict=True):
            np.testing.assert_array_equal(x, y)
