"""Debezium change events: every op in both envelope styles, tombstones, keys, and malformed
envelopes dead-lettered with a reason naming the field and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cdc_columns import ColumnDecoder
from engine.cdc_decode import CdcDecoder
from engine.decode import Reason
from engine.errors import DefinitionError
from engine.table_definitions import CdcSource, TableFeature, TableView
from tests.cdc_helpers import FIELDS, envelope, key, order_view, orders_source, orders_view

ROW = {"id": 7, "customer_id": "cust_1", "amount": 12.5, "status": "open"}
NEW = {**ROW, "amount": 20.0, "status": "paid"}

# Debezium's documented PostgreSQL create event (schemas.enable=true), trimmed to our columns.
DOCUMENTED = b"""{"schema": {"type": "struct", "fields": [], "optional": false,
  "name": "PostgreSQL_server.inventory.customers.Envelope"},
 "payload": {"before": null,
  "after": {"id": 1, "customer_id": "annek", "amount": 3.5, "status": "new"},
  "source": {"version": "2.7.4.Final", "connector": "postgresql", "name": "PostgreSQL_server",
   "ts_ms": 1559033904863, "ts_us": 1559033904863123, "ts_ns": 1559033904863123000,
   "snapshot": true, "db": "postgres", "sequence": "[\\"24023119\\",\\"24023128\\"]",
   "schema": "public", "table": "customers", "txId": 555, "lsn": 24023128, "xmin": null},
  "op": "c", "ts_ms": 1559033904863, "ts_us": 1559033904863841, "ts_ns": 1559033904863841257}}"""
DOCUMENTED_KEY = (
    b'{"schema": {"type": "struct", "name": "PostgreSQL_server.public.customers.Key", "optional": false,'
    b' "fields": [{"field": "id", "type": "int32", "optional": false}]}, "payload": {"id": 1}}'
)


def decode(keys: list[bytes | None], values: list[bytes]):  # type: ignore[no-untyped-def]
    return CdcDecoder(orders_source()).decode(keys, values, np.arange(100, 100 + len(values)))


@pytest.mark.parametrize("wrapped", [False, True])
def test_every_op_in_both_envelope_styles(wrapped: bool) -> None:
    msgs = [
        envelope("r", None, ROW, 1_000, lsn=50, wrapped=wrapped),
        envelope("c", None, ROW, 2_000, lsn=60, wrapped=wrapped),
        envelope("u", ROW, NEW, 3_000, lsn=70, wrapped=wrapped),
        envelope("u", None, NEW, 3_500, lsn=75, wrapped=wrapped),  # REPLICA IDENTITY DEFAULT: no before
        envelope("d", {**dict.fromkeys(ROW), "id": 7}, None, 4_000, 80, wrapped),
        b"",  # the tombstone after the delete
    ]
    out = decode([key(7, wrapped)] * len(msgs), msgs)
    assert out.failures == []
    assert out.tombstones == 1
    assert out.op == ["r", "c", "u", "u", "d"]
    assert out.pk == ["7"] * 5
    assert out.position.tolist() == [50, 60, 70, 75, 80]  # source.lsn
    assert out.ts.tolist() == [1_000, 2_000, 3_000, 3_500, 4_000]  # source.ts_ms, not ts_ms
    assert out.after[0] == (7, "cust_1", 12.5, "open")
    assert out.after[2] == (7, "cust_1", 20.0, "paid") and out.before[2] == (7, "cust_1", 12.5, "open")
    assert out.after[4] is None and out.before[4] == (7, None, None, None)
    assert out.index.tolist() == [0, 1, 2, 3, 4]


def test_documented_debezium_event_and_key() -> None:
    out = decode([DOCUMENTED_KEY], [DOCUMENTED])
    assert out.failures == []
    assert (out.op, out.pk) == (["c"], ["1"])
    assert (out.position.tolist(), out.ts.tolist()) == ([24023128], [1559033904863])


def test_fallbacks_offset_when_no_lsn_ts_ms_when_no_source_key_from_image() -> None:
    bare = json.dumps({"op": "c", "after": ROW, "ts_ms": 5_000, "before": None}).encode()
    decimal = json.dumps({"op": "c", "after": {**ROW, "amount": "12.50"}, "ts_ms": 5_000}).encode()
    out = decode([None, key(7)], [bare, decimal])  # no key: the pk comes from the after image
    assert out.failures == []
    assert out.position.tolist() == [100, 101]  # the Kafka offsets
    assert out.ts.tolist() == [5_000, 5_000]
    assert out.pk == ["7", "7"]
    assert out.after[1][2] == 12.5  # decimal.handling.mode=string


def _env(**fields: object) -> bytes:
    base: dict[str, object] = {"before": None, "after": ROW, "source": {"ts_ms": 1000, "lsn": 5}, "op": "c"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


MALFORMED = [
    # (key, value, reason, field named in the detail)
    (key(7), b"{not json", Reason.MALFORMED, "(message)"),
    (key(7), b"[1, 2]", Reason.MALFORMED, "(message)"),
    (None, b"", Reason.MALFORMED, "(message)"),  # empty and no key: not a tombstone
    (key(7), _env(op=...), Reason.MISSING, "op"),
    (key(7), _env(op="x"), Reason.VALUE, "op"),
    (key(7), _env(op="t"), Reason.VALUE, "op"),  # a truncate
    (key(7), _env(after=None), Reason.MISSING, "after"),
    (key(7), _env(after={"customer_id": "c", "amount": 1.0}), Reason.MISSING, "after.id"),
    (key(7), _env(after={**ROW, "amount": "12 EUR"}), Reason.TYPE, "after.amount"),
    (key(7), _env(after={**ROW, "amount": "NaN"}), Reason.VALUE, "after.amount"),
    (key(7), _env(after="oops"), Reason.TYPE, "after"),
    (key(7), _env(source={"lsn": 5}), Reason.TIMESTAMP, "source.ts_ms"),
    (key(7), _env(source={"ts_ms": "yesterday"}), Reason.TIMESTAMP, "source.ts_ms"),
    (key(7), _env(source={"ts_ms": 10**16}), Reason.TIMESTAMP, "source.ts_ms"),
    (key(7), _env(source={"ts_ms": 1000, "lsn": "0/16B3748"}), Reason.TYPE, "source.lsn"),
    (b"not json", _env(), Reason.MALFORMED, "key"),
    (b'{"order": 7}', _env(), Reason.MISSING, "key.id"),
    (b'{"id": "seven"}', _env(), Reason.TYPE, "key.id"),
    (None, _env(op="d", after=None, before=None), Reason.MISSING, "before"),
    (None, _env(after={**ROW, "id": None}), Reason.TYPE, "after.id"),
    (key(7), json.dumps({"schema": {"type": "struct"}}).encode(), Reason.MISSING, "payload"),
    (key(7), b'{"op": "c", "after": {"id": 7, "amount": \xff}}', Reason.MALFORMED, "after"),
    (key(7), '{"op": "c"}'.encode("utf-16"), Reason.ENCODING, "(message)"),
]


def test_malformed_envelopes_are_dead_lettered_with_field_and_fix() -> None:
    keys = [k for k, *_ in MALFORMED] + [key(7)]
    values = [v for _, v, *_ in MALFORMED] + [_env()]
    out = decode(keys, values)
    assert out.index.tolist() == [len(MALFORMED)]  # the good one survives its neighbours
    got = {i: (reason, detail) for i, reason, detail in out.failures}
    assert sorted(got) == list(range(len(MALFORMED)))
    for i, (_, value, reason, field) in enumerate(MALFORMED):
        r, detail = got[i]
        assert r == reason, (value, detail)
        assert detail.startswith(f"{field}:"), (value, detail)
        assert "; " in detail and len(detail) <= 500  # ... and the fix


@pytest.mark.parametrize(
    ("raw_key", "pk"),
    [
        (b'{"id": 7}', "7"),
        (b'{"id":7,"region":"eu"}', "7"),  # other columns are ignored
        (b'{"schema": {"type": "struct"}, "payload": {"id": 7}}', "7"),  # wrapped
        (b'{"schema": {"type": "struct"}, "payload": {"id": 7}, "id": 8}', "7"),  # the payload wins
        (b'{"id": 7, "schema": {"type": "struct"}}', "7"),  # a column named schema: not wrapped
        (b'{"id": 123456789012345678901234567890}', "123456789012345678901234567890"),  # beyond 64 bits
        (b'{"id": true}', None),
        (b'{"id": 7.0}', None),
        (b'{"id": null}', None),
        (b'{"schema": {}, "payload": [7]}', None),
    ],
)
def test_message_keys_fast_and_general_path_agree(raw_key: bytes, pk: str | None) -> None:
    """Keys are read by one typed call when bare, else by the general path that names the
    problem: both give the same primary key or failure."""
    out = decode([raw_key], [_env()])
    if pk is None:
        assert out.pk == [] and len(out.failures) == 1 and out.failures[0][2].startswith("key")
    else:
        assert out.failures == [] and out.pk == [pk]


def test_definitions_fail_naming_field_and_fix() -> None:
    with pytest.raises(DefinitionError, match=r"primary_key: 'oid' is not in fields"):
        CdcSource(name="orders", topic="orders", primary_key=("oid",), fields=FIELDS)
    with pytest.raises(DefinitionError, match=r"sum needs a numeric column but 'status' is str"):
        TableView(
            name="v",
            entity=orders_view().entity,
            source=orders_source(),
            features=(TableFeature(function="sum", column="status"),),
        )
    with pytest.raises(DefinitionError, match=r"must equal the source's primary_key"):
        TableView(
            name="v",
            entity=orders_view().entity,
            source=orders_source(),
            features=(TableFeature(function="latest", column="status"),),
        )
    with pytest.raises(DefinitionError, match=r"window.*is not a field of TableFeature"):
        TableFeature(function="count", window="1h")
    assert order_view().feature_names == ("status", "amount")


def test_version_hashes_what_changes_values_only() -> None:
    view = orders_view()
    assert view.model_copy(update={"description": "open orders", "owner": "x"}).version == view.version
    assert view.model_copy(update={"features": view.features[:2]}).version != view.version
    assert orders_view(topic="other").version != view.version


def test_change_events_as_events_definition_and_decoding() -> None:
    from engine.decode import EventDecoder
    from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field

    with pytest.raises(
        DefinitionError, match=r"ops: selects Debezium change ops; set format='debezium-json'"
    ):
        EventSource(name="s", topic="t", timestamp_field="ts", fields=FIELDS, ops=("c",))
    with pytest.raises(DefinitionError, match=r"'op' holds the change's op letter"):
        EventSource(
            name="s",
            topic="t",
            timestamp_field="ts",
            format="debezium-json",
            fields=(Field(name="op", dtype="int"),),
        )
    source = EventSource(
        name="s",
        topic="t",
        timestamp_field="ts",
        format="debezium-json",
        ops=("c", "d"),
        fields=(Field(name="customer_id", dtype="str"), FIELDS[2], Field(name="op", dtype="str")),
    )
    view = FeatureView(
        name="v",
        entity=Entity(name="c", join_keys=("customer_id",)),
        source=source,
        aggregations=(Aggregation(function="count", window="1h"),),
    )
    dec = EventDecoder(view).decode(
        [
            envelope("c", None, ROW, 1_000, 5),
            envelope("u", ROW, NEW, 2_000, 6),  # not selected: skipped
            envelope("d", ROW, None, 3_000, 7),  # REPLICA IDENTITY FULL: the before image
            envelope("d", {**dict.fromkeys(ROW), "id": 7}, None, 4_000, 8),  # default identity
            b"",  # tombstone
        ]
    )
    assert dec.index.tolist() == [0, 2] and dec.entity == ["cust_1", "cust_1"]
    assert dec.ts.tolist() == [1_000, 3_000]
    assert [(i, r) for i, r, _ in dec.failures] == [(3, Reason.MISSING)]
    assert "REPLICA IDENTITY FULL" in dec.failures[0][2]


_MESSAGES = [
    *[(k, v) for k, v, *_ in MALFORMED],
    (key(7), _env()),
    (key(8, wrapped=True), envelope("u", ROW, NEW, 3_000, lsn=70, wrapped=True)),
    (key(9), envelope("d", ROW, None, 4_000, lsn=80)),
    (key(9), b""),  # a tombstone
    (None, json.dumps({"op": "c", "after": ROW, "ts_ms": 5_000}).encode()),  # no lsn, no key
    (key(7), _env(after={**ROW, "amount": "12.50", "customer_id": None})),
    (key(7), _env(before={**ROW, "amount": "Infinity"}, op="u")),
    (b'{"id": 7, "payload": {"id": 3}}', _env()),
    (key(7), _env(source={"ts_ms": 1000, "lsn": -4})),
    (key(7), _env(source=None, ts_ms=2000)),
    # Fragments that would merge with their neighbours if values were joined into one document.
    (key(7), b'{"op": "c", "after": '),
    (key(7), b'{"op": "c"},{"op": "d"}'),
    (key(7), b'"}'),
    (key(7), b"]"),
    (key(7), b"null"),
    (key(7), b'"a string"'),
    (key(7), b" \n" + _env() + b"\n "),  # whitespace around a valid envelope
    (key(5), envelope("r", None, ROW, 500, lsn=40, wrapped=True)),  # wrapped value, bare key
    (key(6, wrapped=True), envelope("c", None, {**ROW, "id": 6}, 600, lsn=41)),  # bare value, wrapped key
    (key(7), envelope("u", None, NEW, 700, lsn=42)),  # an update without a before image
    (key(7), envelope("d", {**dict.fromkeys(ROW), "id": 7}, None, 800, lsn=43)),  # default identity
    (key(7), _env(after={**ROW, "status": None, "amount": None})),  # null columns
    (key(7), _env(after={**ROW, "id": 2**63})),  # beyond int64
    (key(7), _env(extra={"nested": [1, {"x": None}]}, transaction=None)),  # unknown fields
]


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.integers(0, len(_MESSAGES) - 1), max_size=60))
def test_columns_agree_with_the_per_message_path(picks: list[int]) -> None:
    """Batches of any mix of good, odd and malformed messages: the columnar decode gives exactly
    the per-message decode's changes, failures and tombstones."""
    keys = [_MESSAGES[i][0] for i in picks]
    values = [_MESSAGES[i][1] for i in picks]
    offsets = np.arange(100, 100 + len(values))
    dec = ColumnDecoder(orders_source())
    want, got = dec.decode(keys, values, offsets), dec.decode_columns(keys, values, offsets)
    assert got.failures == want.failures
    assert got.tombstones == want.tombstones
    assert got.index.tolist() == want.index.tolist()
    assert (got.op, got.pk, got.lsn) == (want.op, want.pk, want.lsn)
    assert got.position.tolist() == want.position.tolist() and got.ts.tolist() == want.ts.tolist()
    for images, cols in ((want.after, got.after), (want.before, got.before)):
        rows = [tuple(c[i].as_py() for c in cols) for i in range(len(images))]
        assert rows == [(None,) * len(FIELDS) if r is None else r for r in images]
    assert got.has_after.tolist() == [a is not None for a in want.after]


def test_a_malformed_message_amid_a_large_batch_costs_only_itself() -> None:
    """One bad message in the middle of a batch (of each kind): every neighbour is still decoded,
    in the columnar and the per-message path, and the bad one is dead-lettered at its index."""
    dec = ColumnDecoder(orders_source())
    good = [(key(i), envelope("c", None, {**ROW, "id": i}, 1_000 + i, lsn=10 + i)) for i in range(200)]
    for bad_key, bad_value, reason, _ in MALFORMED:
        msgs = [*good[:100], (bad_key, bad_value), *good[100:]]
        keys, values = [k for k, _ in msgs], [v for _, v in msgs]
        offsets = np.arange(len(msgs))
        for out in (dec.decode(keys, values, offsets), dec.decode_columns(keys, values, offsets)):
            assert [(i, r) for i, r, _ in out.failures] == [(100, reason)], bad_value
            assert out.index.tolist() == [*range(100), *range(101, 201)]
            assert out.pk == [str(i) for i in range(200)]
            assert out.position.tolist() == [10 + i for i in range(200)]
