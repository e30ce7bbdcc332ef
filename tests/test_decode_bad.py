"""EventDecoder: every bad event is a failure with its reason, and the good ones around it decode
as they would alone, on the whole-batch path and one message at a time."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decode import EventDecoder, Reason, entity_id
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
from tests.poison_helpers import Odd, Poison, odd_corpus, poison_corpus, poison_view

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
    # not 946_684_800..4_102_444_799: epoch seconds of 2000..2100, refused as a unit mistake
    st.one_of(st.integers(0, 946_684_799), st.integers(4_102_444_800, 4_102_444_799_999)),
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


# ---------------------------------------------------------------------------------------------
# poison corpus: no message raises past the decoder


POISON_VIEW = poison_view("orders")
POISON = poison_corpus(T0, bound=64 * 1024)
ODD = odd_corpus(T0)


def _good(i: int) -> bytes:
    return enc({"user_id": f"g{i}", "shop": i, "amount": 1.0 + i, "ts": T0 + i})


@pytest.mark.parametrize("p", POISON, ids=[p.kind for p in POISON])
def test_poison_message_alone_and_among_good_ones(p: Poison) -> None:
    dec = EventDecoder(POISON_VIEW)
    value = p.value or b""
    alone = dec.decode([value])
    assert_consistent(alone, 1)
    assert [(i, r) for i, r, _ in alone.failures] == [(0, p.reason)], alone.failures
    detail = alone.failures[0][2]
    assert detail.startswith(f"{p.field}: "), detail
    assert len(detail) < 600
    values = [_good(0), value, _good(2)]
    d = dec.decode(values)
    assert_consistent(d, 3)
    assert [(i, r) for i, r, _ in d.failures] == [(1, p.reason)]
    assert d.entity == [entity_id(["g0", 0]), entity_id(["g2", 2])]
    np.testing.assert_array_equal(d.columns[0], [1.0, 3.0])


@pytest.mark.parametrize("o", ODD, ids=[o.kind for o in ODD])
def test_odd_but_valid_message_is_accepted(o: Odd) -> None:
    d = EventDecoder(POISON_VIEW).decode([_good(0), o.value, _good(2)])
    assert d.failures == []
    assert d.entity[1] == entity_id([o.user_id, o.shop])
    assert d.ts.tolist() == [T0, T0, T0 + 2]
    assert d.columns[0][1] == o.amount


def test_whole_corpus_in_one_batch() -> None:
    values = [p.value or b"" for p in POISON] + [o.value for o in ODD]
    order = np.random.default_rng(1).permutation(len(values)).tolist()
    mixed = [values[i] for i in order]
    d = EventDecoder(POISON_VIEW).decode(mixed)
    assert_consistent(d, len(mixed))
    reasons = {i: r for i, r, _ in d.failures}
    for pos, i in enumerate(order):
        assert reasons.get(pos) == (POISON[i].reason if i < len(POISON) else None)


@pytest.mark.parametrize(
    "fmt, raw, reason",
    [
        ("epoch_seconds", b"NaN", Reason.TIMESTAMP),
        ("epoch_seconds", b"-Infinity", Reason.TIMESTAMP),
        ("epoch_seconds", b"1e400", Reason.TIMESTAMP),
        ("epoch_seconds", b"1e308", Reason.TIMESTAMP),
        ("epoch_seconds", b"9" * 5000, Reason.TIMESTAMP),
        ("epoch_seconds", b"[" * 5000 + b"]" * 5000, Reason.TIMESTAMP),
        ("iso8601", b'"0001-01-01T00:00:00+01:00"', Reason.TIMESTAMP),
        ("iso8601", b'"9999-12-31T23:59:59-23:59"', Reason.TIMESTAMP),
        ("iso8601", b'"2024-02-30T00:00:00Z"', Reason.TIMESTAMP),
        ("iso8601", b'"2024-03-10T23:00:00+24:00"', Reason.TIMESTAMP),
        ("iso8601", b'"\\ud800"', Reason.ENCODING),
        ("iso8601", b"NaN", Reason.TIMESTAMP),
        ("iso8601", b"1e400", Reason.TIMESTAMP),
        ("epoch_millis", b"-Infinity", Reason.TIMESTAMP),
        ("epoch_millis", b"1" + b"0" * 4000, Reason.TIMESTAMP),
    ],
)
def test_odd_timestamps_of_every_format(fmt: str, raw: bytes, reason: str) -> None:
    dec = EventDecoder(make_view(fmt))
    good_ts = {
        "epoch_millis": b"1700000000000",
        "epoch_seconds": b"1700000000",
        "iso8601": b'"2023-11-14T22:13:20Z"',
    }
    body = b'{"user_id": "u", "shop": 1, "qty": 2, "ts": '
    values = [body + good_ts[fmt] + b"}", body + raw + b"}", body + good_ts[fmt] + b"}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        d = dec.decode(values)
    assert_consistent(d, 3)
    assert [(i, r) for i, r, _ in d.failures] == [(1, reason)]
    assert d.failures[0][2].startswith("ts: ")
    assert d.ts.tolist() == [T0, T0]


@pytest.mark.parametrize("raw", [b"1" + b"0" * 400, str(2**63).encode(), b"-" + b"9" * 30])
def test_int_columns_beyond_int64_are_invalid_values(raw: bytes) -> None:
    """An aggregated int field (qty) outside int64 is dead-lettered, never a crash or a float."""
    d = EventDecoder(VIEW).decode([enc(event(0)), enc(event(1)).replace(b'"qty": 1', b'"qty": ' + raw)])
    assert [(i, r) for i, r, _ in d.failures] == [(1, Reason.VALUE)]
    assert d.failures[0][2].startswith("qty: ")


class _Flaky(EventDecoder):
    """Fails while building columns for one event: stands in for any unforeseen error."""

    def _timestamps(self, raw: list[Any]) -> Any:
        if T0 + 13 in raw:
            raise ValueError("unforeseen")
        return super()._timestamps(raw)


def test_a_batch_that_raises_is_decoded_one_message_at_a_time() -> None:
    values = [enc(event(i, ts=T0 + 10 + i)) for i in range(6)]
    d = _Flaky(VIEW).decode(values)
    assert_consistent(d, 6)
    assert [(i, r) for i, r, _ in d.failures] == [(3, Reason.UNDECODABLE)]
    assert d.failures[0][2].startswith("(message): ")
    assert d.index.tolist() == [0, 1, 2, 4, 5]
    assert d.ts.tolist() == [T0 + 10 + i for i in (0, 1, 2, 4, 5)]
    np.testing.assert_array_equal(d.columns[1], [0, 1, 2, 4, 5])
    assert d.text == {}


_good_bytes = [enc(event(i)) for i in range(3)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.tuples(
                st.sampled_from(_good_bytes), st.integers(0, 200), st.binary(min_size=0, max_size=8)
            ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]),
            st.tuples(st.sampled_from(_good_bytes), st.integers(0, 200)).map(lambda t: t[0][: t[1]]),
        ),
        max_size=12,
    )
)
def test_arbitrary_bytes_never_raise(values: list[bytes]) -> None:
    d = EventDecoder(VIEW).decode(values)
    assert_consistent(d, len(values))
    assert all(r and m for _, r, m in d.failures)
