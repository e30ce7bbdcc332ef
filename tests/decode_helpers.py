"""Shared by the decoder tests: a view, events to vary, the known bad messages, and checks that
the whole-batch path agrees with decoding one message at a time."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

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
