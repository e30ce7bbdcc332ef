"""EventDecoder: good events to columns, every bad one to a failure with its reason.

The whole-batch fast path and the per-message fallback must accept exactly the same events and
produce the same columns.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decode import DecodedEvents, EventDecoder, Reason
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field

FIELDS = (
    Field(name="user_id", dtype="str"),
    Field(name="shop", dtype="int"),
    Field(name="amount", dtype="float", nullable=True),
    Field(name="qty", dtype="int"),
    Field(name="fraud", dtype="bool", nullable=True),
    Field(name="note", dtype="str", nullable=True),
)


def make_view(
    timestamp_format: str = "epoch_millis",
    keys: tuple[str, ...] = ("user_id",),
    extra: tuple[Aggregation, ...] = (),
) -> FeatureView:
    return FeatureView(
        name="orders",
        entity=Entity(name="buyer", join_keys=keys),
        source=EventSource(
            name="orders",
            topic="orders",
            timestamp_field="ts",
            timestamp_format=timestamp_format,
            fields=FIELDS,
        ),
        aggregations=(
            Aggregation(function="sum", column="amount", window="1h"),
            Aggregation(function="max", column="qty", window="1h"),
            Aggregation(function="mean", column="fraud", window="1h"),
            *extra,
        ),
    )


VIEW = make_view()
T0 = 1_700_000_000_000


def event(i: int = 0, **over: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "user_id": f"u{i % 3}",
        "shop": 10 + i,
        "ts": T0 + 1000 * i,
        "amount": 1.5 * i,
        "qty": i,
        "fraud": i % 2 == 0,
        "note": "n",
    }
    e.update(over)
    return {k: v for k, v in e.items() if v is not _DROP}


_DROP = object()


def enc(e: Any) -> bytes:
    return json.dumps(e).encode()


def per_message(decoder: EventDecoder, values: list[bytes]) -> DecodedEvents:
    """Decode one message at a time and stitch the results: what the fallback must agree with."""
    index, entity, ts, cols, failures = [], [], [], [[] for _ in decoder.columns], []
    for i, v in enumerate(values):
        d = decoder.decode([v])
        failures += [(i, r, m) for _, r, m in d.failures]
        if len(d.index):
            assert d.index.tolist() == [0]
            index.append(i)
            entity += d.entity
            ts += d.ts.tolist()
            for c, col in zip(cols, d.columns, strict=True):
                c += col.tolist()
        else:
            assert len(d.failures) == 1, f"message {i} neither decoded nor failed: {v!r}"
    return DecodedEvents(
        np.array(index, dtype=np.int64),
        entity,
        np.array(ts, dtype=np.int64),
        [np.array(c, dtype=np.float64) for c in cols],
        failures,
    )


def assert_consistent(d: DecodedEvents, n_values: int) -> None:
    n = len(d.index)
    assert len(d.entity) == n
    assert len(d.ts) == n
    assert all(len(c) == n for c in d.columns)
    assert d.ts.dtype == np.int64
    got = set(d.index.tolist()) | {i for i, _, _ in d.failures}
    assert got == set(range(n_values)), "every input is either decoded or a failure"
    assert not set(d.index.tolist()) & {i for i, _, _ in d.failures}
    assert d.index.tolist() == sorted(d.index.tolist())


def assert_same(a: DecodedEvents, b: DecodedEvents) -> None:
    np.testing.assert_array_equal(a.index, b.index)
    assert a.entity == b.entity
    np.testing.assert_array_equal(a.ts, b.ts)
    for x, y in zip(a.columns, b.columns, strict=True):
        np.testing.assert_array_equal(x, y)
    assert [(i, r) for i, r, _ in a.failures] == [(i, r) for i, r, _ in b.failures]


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


# ---------------------------------------------------------------------------------------------
# bad events


BAD = [
    # (message, reason, field named in the message or None)
    (b"not json", Reason.MALFORMED, None),
    (b"{", Reason.MALFORMED, None),
    (b'{"user_id": "u1", ', Reason.MALFORMED, None),
    (b"[]", Reason.MALFORMED, None),
    (enc([event(1)]), Reason.MALFORMED, None),
    (b"42", Reason.MALFORMED, None),
    (b"null", Reason.MALFORMED, None),
    (b'"text"', Reason.MALFORMED, None),
    (b"\xff\xfe", Reason.MALFORMED, None),
    (enc(event(1, user_id=_DROP)), Reason.MISSING, "user_id"),
    (enc(event(1, qty=_DROP)), Reason.MISSING, "qty"),
    (enc(event(1, ts=_DROP)), Reason.MISSING, "ts"),
    (enc(event(1, amount="12.5")), Reason.TYPE, "amount"),
    (enc(event(1, qty=None)), Reason.TYPE, "qty"),
    (enc(event(1, qty=1.5)), Reason.TYPE, "qty"),
    (enc(event(1, user_id=None)), Reason.TYPE, "user_id"),
    (enc(event(1, user_id=7)), Reason.TYPE, "user_id"),
    (enc(event(1, fraud="yes")), Reason.TYPE, "fraud"),
    (enc(event(1, note=3)), Reason.TYPE, "note"),
    (enc(event(1, ts="2023-11-14T22:13:20Z")), Reason.TIMESTAMP, "ts"),
    (enc(event(1, ts=None)), Reason.TIMESTAMP, "ts"),
    (enc(event(1, ts=1.7e12)), Reason.TIMESTAMP, "ts"),
    (enc(event(1, ts=True)), Reason.TIMESTAMP, "ts"),
    (enc(event(1, ts=-1)), Reason.TIMESTAMP, "ts"),
    (enc(event(1, ts=4_102_444_800_000)), Reason.TIMESTAMP, "ts"),
]
# an integer beyond int64: a bad timestamp like any other out-of-range one
HUGE_TS = (enc(event(1, ts=1)).replace(b'"ts": 1,', b'"ts": 1' + b"0" * 30 + b","), Reason.TIMESTAMP, "ts")
BAD_ALL = [*BAD, HUGE_TS]
BAD_IDS = [*(f"{r}-{i}" for i, (_, r, _) in enumerate(BAD)), "bad_timestamp-beyond-int64"]


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
