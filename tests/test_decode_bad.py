"""EventDecoder: every bad event is a failure with its reason, and the good ones around it decode
as they would alone, on the whole-batch path and one message at a time."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decode import EventDecoder, Reason
from engine.definitions import Aggregation
from tests.decode_helpers import (
    _DROP,
    BAD,
    BAD_ALL,
    BAD_IDS,
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
# bad events


@pytest.mark.parametrize("raw, reason, field", BAD_ALL, ids=BAD_IDS)
def test_bad_event_alone(raw: bytes, reason: str, field: str | None) -> None:
    d = EventDecoder(VIEW).decode([raw])
    assert_consistent(d, 1)
    assert len(d.index) == 0
    assert len(d.failures) == 1
    i, got, msg = d.failures[0]
    assert (i, got) == (0, reason), msg
    assert msg
    if field is not None:
        assert msg.startswith(f"{field}:"), msg


@pytest.mark.parametrize("raw, reason, field", BAD_ALL, ids=BAD_IDS)
def test_bad_event_among_good_ones(raw: bytes, reason: str, field: str | None) -> None:
    dec = EventDecoder(VIEW)
    values = [enc(event(0)), enc(event(1)), raw, enc(event(3))]
    d = dec.decode(values)
    assert_consistent(d, 4)
    assert [(i, r) for i, r, _ in d.failures] == [(2, reason)]
    assert d.index.tolist() == [0, 1, 3]
    assert d.entity == ["u0", "u1", "u0"]
    assert d.ts.tolist() == [T0, T0 + 1000, T0 + 3000]
    np.testing.assert_array_equal(d.columns[1], [0, 1, 3])
    assert_same(d, per_message(dec, values))


@pytest.mark.parametrize(
    "fmt, raw",
    [
        ("epoch_seconds", "1700000000"),
        ("epoch_seconds", -5),
        ("epoch_seconds", 4_102_444_800),
        ("epoch_seconds", 1e300),
        ("epoch_seconds", T0),  # milliseconds sent as seconds: year ~55800
        ("iso8601", "2023-11-14T22:13:20"),  # no time zone
        ("iso8601", "2023-11-14 22:13:20"),
        ("iso8601", "yesterday"),
        ("iso8601", 1_700_000_000),
        ("iso8601", "1969-12-31T23:59:59Z"),
        ("iso8601", "2100-01-01T00:00:00Z"),
        ("epoch_millis", T0 * 1000),  # microseconds sent as milliseconds
    ],
)
def test_bad_timestamps(fmt: str, raw: Any) -> None:
    dec = EventDecoder(make_view(fmt))
    good_ts = {"epoch_millis": T0, "epoch_seconds": T0 / 1000, "iso8601": "2023-11-14T22:13:20Z"}[fmt]
    values = [enc(event(0, ts=good_ts)), enc(event(1, ts=raw)), enc(event(2, ts=good_ts))]
    d = dec.decode(values)
    assert_consistent(d, 3)
    assert [(i, r) for i, r, _ in d.failures] == [(1, Reason.TIMESTAMP)]
    assert d.failures[0][2].startswith("ts:")
    assert d.index.tolist() == [0, 2]
    assert d.entity == ["u0", "u2"]
    assert d.ts.tolist() == [T0, T0]
    assert_same(d, per_message(dec, values))


def test_naive_iso_timestamp_message_asks_for_a_zone() -> None:
    d = EventDecoder(make_view("iso8601")).decode([enc(event(0, ts="2023-11-14T22:13:20"))])
    assert [(i, r) for i, r, _ in d.failures] == [(0, Reason.TIMESTAMP)]
    assert "time zone" in d.failures[0][2]
    assert len(d.index) == 0


def test_messages_name_the_field() -> None:
    d = EventDecoder(VIEW).decode(
        [
            enc(event(0, amount="x")),
            enc(event(1, qty=_DROP)),
            enc(event(2, ts=-3)),
        ]
    )
    by_index = {i: (r, m) for i, r, m in d.failures}
    assert by_index[0][0] == Reason.TYPE and "amount" in by_index[0][1] and "float" in by_index[0][1]
    assert by_index[1][0] == Reason.MISSING and "qty" in by_index[1][1] and "include it" in by_index[1][1]
    assert by_index[2][0] == Reason.TIMESTAMP and "ts" in by_index[2][1] and "epoch_millis" in by_index[2][1]


def test_unknown_extra_fields_are_ignored() -> None:
    d = EventDecoder(VIEW).decode([enc(event(0, extra={"a": [1, 2]}, more="x"))])
    assert d.failures == []
    assert d.entity == ["u0"]


def test_count_of_string_column() -> None:
    """count(column) of a str field is a valid definition: its column must decode, null -> NaN."""
    view = make_view(extra=(Aggregation(function="count", column="note", window="1h"),))
    assert "note" in view.columns
    values = [enc(event(0, note="a")), enc(event(1, note=None)), enc(event(2, note="b"))]
    d = EventDecoder(view).decode(values)
    assert d.failures == []
    assert d.index.tolist() == [0, 1, 2]
    note = d.columns[view.columns.index("note")]
    assert np.isnan(note).tolist() == [False, True, False]


# ---------------------------------------------------------------------------------------------
# whole batch vs one at a time, for messages that are not one JSON object


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        enc(event(5)) + b"," + enc(event(6)),
        enc(event(5)) + b"]",
    ],
    ids=["empty", "whitespace", "two-objects-with-comma", "trailing-bracket"],
)
@pytest.mark.parametrize("alone", [True, False], ids=["alone", "in-batch"])
def test_non_object_messages_are_malformed_on_both_paths(raw: bytes, alone: bool) -> None:
    """A message that is not exactly one JSON object is malformed, whichever path decodes it."""
    dec = EventDecoder(VIEW)
    values = [raw] if alone else [enc(event(0)), raw, enc(event(2))]
    d = dec.decode(values)
    assert_consistent(d, len(values))
    bad = 0 if alone else 1
    assert [(i, r) for i, r, _ in d.failures] == [(bad, Reason.MALFORMED)]
    if not alone:
        assert d.index.tolist() == [0, 2]
        assert d.entity == ["u0", "u2"]
    assert_same(d, per_message(dec, values))


def test_fragments_of_one_event_do_not_fuse_across_messages() -> None:
    """Two broken messages that happen to form valid JSON when joined are still two bad messages."""
    head = b'{"user_id": "a", "shop": 1, "ts": 1700000000000'
    tail = b'"qty": 2}, {"user_id": "b", "shop": 2, "ts": 1700000001000, "qty": 3}'
    dec = EventDecoder(VIEW)
    for values in ([head, tail], [enc(event(0)), head, tail, enc(event(3))]):
        d = dec.decode(values)
        assert_consistent(d, len(values))
        bad = [i for i, v in enumerate(values) if v in (head, tail)]
        assert [(i, r) for i, r, _ in d.failures] == [(i, Reason.MALFORMED) for i in bad]
        assert "a" not in d.entity and "b" not in d.entity
        assert_same(d, per_message(dec, values))


# ---------------------------------------------------------------------------------------------
# property: random mixes of good and bad events


good_events = st.builds(
    lambda i, amount, fraud, note, ts: event(i, amount=amount, fraud=fraud, note=note, ts=ts),
    st.integers(0, 50),
    st.one_of(st.none(), st.just(_DROP), st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False)),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.text(max_size=5)),
    st.integers(0, 4_102_444_799_999),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(
        st.one_of(
            good_events.map(lambda e: ("ok", e)),
            st.sampled_from([(raw, reason) for raw, reason, _ in BAD]).map(lambda p: ("bad", p)),
        ),
        max_size=25,
    )
)
def test_mixed_batches_keep_good_events_in_order(items: list[tuple[str, Any]]) -> None:
    dec = EventDecoder(VIEW)
    values, expect_good, expect_bad = [], [], []
    for i, (kind, item) in enumerate(items):
        if kind == "ok":
            values.append(enc(item))
            expect_good.append((i, item))
        else:
            values.append(item[0])
            expect_bad.append((i, item[1]))
    d = dec.decode(values)
    assert_consistent(d, len(values))
    assert [(i, r) for i, r, _ in d.failures] == expect_bad
    assert d.index.tolist() == [i for i, _ in expect_good]
    assert d.entity == [e["user_id"] for _, e in expect_good]
    assert d.ts.tolist() == [e["ts"] for _, e in expect_good]
    amounts = [math.nan if e.get("amount") is None else e["amount"] for _, e in expect_good]
    np.testing.assert_array_equal(d.columns[0], np.array(amounts, dtype=np.float64))
    fraud = [math.nan if e["fraud"] is None else float(e["fraud"]) for _, e in expect_good]
    np.testing.assert_array_equal(d.columns[2], np.array(fraud, dtype=np.float64))
    assert_same(d, per_message(dec, values))
