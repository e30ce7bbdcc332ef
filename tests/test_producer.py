"""The producer SDK against a real broker: it validates with the stream's own decoder, so what it
sends is never dead-lettered for its shape and what it refuses is refused for the decoder's reason.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.delta_store import DeltaOfflineStore
from connectors.kafka import KafkaConfigError, PartitionReader, partition_count
from engine.dataflow import RuntimeConfig
from engine.decode import EventDecoder, entity_id
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field
from engine.errors import DefinitionError, FeaturestreamError, ServiceUnavailable
from featurestream import InvalidEvent, Producer
from featurestream.client import FeatureStore
from featurestream.config import Settings
from featurestream.local.ephemeral import EphemeralServices
from featurestream.producer import Delivery, DeliveryError
from tests.conftest import Services
from tests.support import run_views, unique

T0 = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)
FIELDS = (
    Field(name="user_id", dtype="str"),
    Field(name="shop", dtype="int"),
    Field(name="amount", dtype="float"),
    Field(name="paid", dtype="bool"),
    Field(name="note", dtype="str", nullable=True),
    Field(name="qty", dtype="int", nullable=True),
    Field(name="discount", dtype="float", nullable=True),
    Field(name="gift", dtype="bool", nullable=True),
)
FIX = re.compile(r"; [a-z]+ ")  # a clause after the problem: what to do


def _source(topic: str, fmt: str = "epoch_millis") -> EventSource:
    return EventSource(name="orders", topic=topic, timestamp_field="ts", timestamp_format=fmt, fields=FIELDS)


def _view(source: EventSource, keys: tuple[str, ...] = ("user_id",)) -> FeatureView:
    return FeatureView(
        name="orders",
        entity=Entity(name="buyer", join_keys=keys),
        source=source,
        aggregations=(
            Aggregation(function="count", window="1d"),
            Aggregation(function="sum", column="amount", window="1d"),
            Aggregation(function="sum", column="qty", window="1d"),
            Aggregation(function="last", column="discount", window="1d"),
            Aggregation(function="sum", column="paid", window="1d"),
            Aggregation(function="count", column="note", window="1d"),
        ),
        tile_size="1m",
        allowed_lateness="1d",
    )


def _event(i: int = 0, **over: Any) -> dict[str, Any]:
    ev = {
        "user_id": f"u{i % 5}",
        "shop": 7 + i % 3,
        "amount": 10.5 + i,
        "paid": i % 2 == 0,
        "note": None,
        "qty": None,
        "discount": None,
        "gift": None,
        "ts": T0_MS + i * 1000,
    }
    ev.update(over)
    return ev


def read_messages(bootstrap: str, topic: str) -> list[tuple[int, bytes | None, bytes]]:
    """Every message of ``topic`` as (partition, key, value), in offset order per partition."""
    out = []
    for p in range(partition_count(bootstrap, topic)):
        reader = PartitionReader(bootstrap, topic, p, None, stop_at_end=True)
        deadline = time.monotonic() + 30
        try:
            while not reader.at_end and time.monotonic() < deadline:
                batch = reader.read(10_000, 0.2)
                if batch is not None:
                    out += [(p, k, v) for k, v in zip(batch.keys, batch.values, strict=True)]
        finally:
            reader.close()
    return out


@pytest.fixture
def new_topic(topic: Callable[..., str]) -> Callable[..., str]:
    return topic


# ---------------------------------------------------------------------------------------------
# Field types, nullability, timestamp formats.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["epoch_millis", "epoch_seconds", "iso8601"])
def test_every_field_type_and_null_is_sent_as_the_stream_decodes_it(
    services: Services, new_topic: Callable[..., str], fmt: str
) -> None:
    source = _source(new_topic(), fmt)
    raw_ts = {"epoch_millis": T0_MS, "epoch_seconds": T0_MS / 1000 + 0.25, "iso8601": "2024-03-10T12:00:00Z"}
    plus2 = timezone(timedelta(hours=2))
    events = [
        _event(0, ts=raw_ts[fmt]),
        _event(1, note="gift wrap ✓", qty=3, discount=0.5, gift=True, ts=T0 + timedelta(seconds=1)),
        _event(
            2,
            note="",
            qty=-(2**63),
            discount=-1e308,
            gift=False,
            ts=datetime(2024, 3, 10, 14, 0, 2, tzinfo=plus2),
        ),
        _event(
            3,
            shop=2**63 - 1,
            amount=np.float64(2.5),
            qty=np.int64(4),
            extra={"any": [1]},
            ts=T0 + timedelta(seconds=3),
        ),
    ]
    with Producer(source, bootstrap_servers=services.kafka, config={}) as producer:
        for ev in events:
            producer.send(ev)
    assert (producer.sent, producer.delivered, producer.failed) == (4, 4, 0)

    got = [json.loads(v) for _, _, v in read_messages(services.kafka, source.topic)]
    assert [g["note"] for g in got] == [None, "gift wrap ✓", "", None]
    assert [g["qty"] for g in got] == [None, 3, -(2**63), 4]
    assert [g["discount"] for g in got] == [None, 0.5, -1e308, None]
    assert [g["gift"] for g in got] == [None, True, False, None]
    assert [g["shop"] for g in got] == [7, 8, 9, 2**63 - 1]
    assert got[3]["amount"] == 2.5 and got[3]["extra"] == {"any": [1]}
    want_ms = [T0_MS if fmt != "epoch_seconds" else T0_MS + 250, T0_MS + 1000, T0_MS + 2000, T0_MS + 3000]
    decoded = EventDecoder(_view(source)).decode(
        [v for _, _, v in read_messages(services.kafka, source.topic)]
    )
    assert decoded.failures == []
    assert decoded.ts.tolist() == want_ms
    if fmt == "epoch_millis":  # datetimes become the source's format, not strings
        assert [g["ts"] for g in got[1:3]] == [T0_MS + 1000, T0_MS + 2000]
    elif fmt == "epoch_seconds":
        assert got[1]["ts"] == T0_MS / 1000 + 1
    else:
        assert datetime.fromisoformat(got[2]["ts"]) == T0 + timedelta(seconds=2)


# ---------------------------------------------------------------------------------------------
# Invalid events: raised with the field and the fix, never sent.
# ---------------------------------------------------------------------------------------------


def _deep(n: int) -> list[Any]:
    v: list[Any] = []
    for _ in range(n):
        v = [v]
    return v


INVALID: list[tuple[str, Any, str, str]] = [
    # (case, event, field, reason)
    ("missing", {k: v for k, v in _event().items() if k != "amount"}, "amount", "missing_field"),
    ("missing ts", {k: v for k, v in _event().items() if k != "ts"}, "ts", "missing_field"),
    ("str for float", _event(amount="12.5"), "amount", "invalid_type"),
    ("null for non-nullable", _event(amount=None), "amount", "invalid_type"),
    ("float for int", _event(shop=1.5), "shop", "invalid_type"),
    ("bool for int", _event(shop=True), "shop", "invalid_type"),
    ("int for bool", _event(paid=1), "paid", "invalid_type"),
    ("int for str key", _event(user_id=42), "user_id", "invalid_type"),
    ("list for nullable str", _event(note=["a"]), "note", "invalid_type"),
    ("NaN", _event(amount=float("nan")), "amount", "invalid_value"),
    ("inf in a nullable float is not null", _event(discount=float("inf")), "discount", "invalid_value"),
    ("numpy NaN", _event(discount=np.float32("nan")), "discount", "invalid_value"),
    ("int beyond int64", _event(shop=2**63), "shop", "invalid_value"),
    ("int below int64", _event(qty=-(2**63) - 1), "qty", "invalid_value"),
    ("ts text", _event(ts="yesterday"), "ts", "bad_timestamp"),
    ("ts float for millis", _event(ts=1.5e12), "ts", "bad_timestamp"),
    ("ts before 1970", _event(ts=-1), "ts", "bad_timestamp"),
    ("ts after 2100", _event(ts=datetime(2200, 1, 1, tzinfo=UTC)), "ts", "bad_timestamp"),
    ("naive datetime", _event(ts=datetime(2024, 3, 10, 12)), "ts", "bad_timestamp"),
    ("ts NaN", _event(ts=float("nan")), "ts", "bad_timestamp"),
    ("lone surrogate", _event(user_id="a\ud800b"), "user_id", "invalid_encoding"),
    ("no JSON form", _event(note=object()), "note", "invalid_type"),
    ("no JSON form, unknown field", _event(extra={1, object()}), "extra", "invalid_type"),
    ("too deep", _event(extra=_deep(5_000)), "extra", "too_deep"),
    ("not an object", [1, 2], "(message)", "malformed_json"),
]


def test_each_kind_of_invalid_event_raises_naming_the_field_and_is_not_sent(
    services: Services, new_topic: Callable[..., str]
) -> None:
    source = _source(new_topic())
    with Producer(source, bootstrap_servers=services.kafka, config={}) as producer:
        for case, event, field, reason in INVALID:
            with pytest.raises(InvalidEvent) as caught:
                producer.send(event)
            exc = caught.value
            assert (exc.field, exc.reason) == (field, reason), (case, str(exc))
            assert isinstance(exc, FeaturestreamError) and isinstance(exc, ValueError)
            assert str(exc).startswith(f"invalid event for source 'orders' ({reason}): {field}: "), case
            assert FIX.search(exc.detail), (case, exc.detail)  # and says what to do
        assert producer.sent == 0
        producer.send(_event(9, note="marker"))
    assert [json.loads(v)["note"] for _, _, v in read_messages(services.kafka, source.topic)] == ["marker"]


def test_send_many_and_send_json_send_the_valid_and_return_the_invalid(
    services: Services, new_topic: Callable[..., str]
) -> None:
    source = _source(new_topic())
    with Producer(source, bootstrap_servers=services.kafka, config={}) as producer:
        bad = producer.send_many([_event(0), _event(1, amount="x"), _event(2), _event(3, ts=object())])
        assert [(i, e.field, e.reason) for i, e in bad] == [
            (1, "amount", "invalid_type"),
            (3, "ts", "bad_timestamp"),
        ]
        lines = [json.dumps(_event(4)).encode(), b'{"user_id": "u1"', json.dumps(_event(5)).encode()]
        bad = producer.send_json(lines, stop_at_invalid=True)
        assert [(i, e.reason) for i, e in bad] == [(1, "malformed_json")]
        bad = producer.send_json(lines)
        assert [i for i, _ in bad] == [1]
    amounts = [json.loads(v)["amount"] for _, _, v in read_messages(services.kafka, source.topic)]
    assert amounts == [10.5, 12.5, 14.5, 14.5, 15.5]


# ---------------------------------------------------------------------------------------------
# Delivery reports, flush on close, keys.
# ---------------------------------------------------------------------------------------------


def test_delivery_reports_and_counters_on_success_and_on_failure(tmp_path: Path) -> None:
    with EphemeralServices(tmp_path / "own") as own:
        source = _source(unique("deliver"))
        reports: list[Delivery] = []
        producer = Producer(
            source,
            bootstrap_servers=own.kafka_bootstrap_servers,
            config={"message.timeout.ms": 1500},
            partitions=2,
            on_delivery=reports.append,
        )
        for i in range(10):
            producer.send(_event(i))
        assert producer.flush(10) == 0
        assert (producer.sent, producer.delivered, producer.failed, producer.pending) == (10, 10, 0, 0)
        assert all(r.ok and r.topic == source.topic for r in reports)
        assert sorted((r.partition, r.offset) for r in reports) == sorted(
            (p, o) for p in (0, 1) for o in range(sum(r.partition == p for r in reports))
        )

        with pytest.raises(DeliveryError, match=r"2,000,\d+ bytes .*too large"):  # refused on send
            producer.send(_event(0, note="x" * 2_000_000))
        assert producer.sent == 10

        own.restart_kafka()  # the broker the producer knows is gone
        for i in range(3):
            producer.send(_event(i))
        assert producer.flush(15) == 0  # each one reported, as failed
        assert (producer.sent, producer.delivered, producer.failed) == (13, 10, 3)
        failed = [r for r in reports if not r.ok]
        assert len(failed) == 3 and all("timed out" in (r.error or "") for r in failed)
        producer.close()  # nothing pending: no error

        stuck = Producer(
            source,
            bootstrap_servers=own.kafka_bootstrap_servers,
            config={"message.timeout.ms": 60_000},
            partitions=1,
            on_delivery=reports.append,
        )
        own.restart_kafka()
        stuck.send(_event(1))
        started = time.monotonic()
        with pytest.raises(DeliveryError, match=r"1 event\(s\) sent to topic .* not acknowledged .* dropped"):
            stuck.close(timeout=1)
        assert time.monotonic() - started < 10  # not the 60 s message timeout
        assert (stuck.failed, stuck.pending) == (1, 0) and not reports[-1].ok
        with pytest.raises(DeliveryError, match="closed"):
            stuck.send(_event(2))


def test_close_and_context_exit_flush_batched_events(
    services: Services, new_topic: Callable[..., str]
) -> None:
    source = _source(new_topic())
    started = time.monotonic()
    with Producer(source, bootstrap_servers=services.kafka, config={}, linger_ms=20_000) as producer:
        for i in range(50):
            producer.send(_event(i))
        time.sleep(0.3)
        assert read_messages(services.kafka, source.topic) == []  # held back for batching
        assert (producer.delivered, producer.pending) == (0, 50)
    assert (producer.delivered, producer.pending) == (50, 0)
    assert time.monotonic() - started < 10  # close flushed rather than waiting out the linger
    assert len(read_messages(services.kafka, source.topic)) == 50

    second = Producer(source, bootstrap_servers=services.kafka, config={}, linger_ms=20_000)
    second.send(_event(99))
    second.close()
    second.close()  # idempotent
    assert second.delivered == 1 and len(read_messages(services.kafka, source.topic)) == 51


def test_messages_are_keyed_by_the_entity_so_an_entity_stays_in_one_partition(
    services: Services, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(4)
    view = _view(_source(topic), keys=("user_id", "shop"))
    events = [_event(i, user_id=f"u{i % 7}|x\\" if i % 2 else f"u{i % 7}") for i in range(200)]
    with Producer(view, bootstrap_servers=services.kafka, config={}) as producer:  # keys from the view
        assert producer.key_fields == ("user_id", "shop")
        producer.send_many(events)
    got = read_messages(services.kafka, topic)
    assert len(got) == 200
    for _, key, value in got:
        ev = json.loads(value)
        assert key == entity_id([ev["user_id"], ev["shop"]]).encode()  # the stream's entity string
    partitions: dict[bytes | None, set[int]] = {}
    for p, key, _ in got:
        partitions.setdefault(key, set()).add(p)
    assert len(partitions) == 42 and all(len(ps) == 1 for ps in partitions.values())
    assert len({p for p, _, _ in got}) >= 3

    other = _source(new_topic())
    with Producer(other, bootstrap_servers=services.kafka, config={}) as unkeyed:
        unkeyed.send(_event(0))
    with Producer(other, bootstrap_servers=services.kafka, config={}, key_fields=["shop"]) as by_shop:
        by_shop.send(_event(0))
    assert [k for _, k, _ in read_messages(services.kafka, other.topic)] == [None, b"7"]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["nope"], "'nope' is not a field of source 'orders'"),
        (["discount"], "'discount' is a nullable float field"),
        (["qty"], "'qty' is a nullable int field"),
        (["amount"], "'amount' is a float field"),
        (["shop", "shop"], "repeat"),
    ],
)
def test_key_fields_must_be_join_key_fields(services: Services, keys: list[str], message: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)):
        Producer(_source("any"), bootstrap_servers=services.kafka, config={}, key_fields=keys)


def test_settings_missing_topics_and_bad_client_settings(
    services: Services, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    with Producer(_source(topic), settings=Settings(kafka_bootstrap_servers=services.kafka)) as producer:
        producer.send(_event(0))
    assert producer.bootstrap_servers == services.kafka and producer.delivered == 1
    secret = {"no.such.option": 1, "sasl.password": "pw-3k"}  # kafka_config comes from the settings
    with pytest.raises(KafkaConfigError, match=r"no\.such\.option") as caught:
        Producer(
            _source(topic), settings=Settings(kafka_bootstrap_servers=services.kafka, kafka_config=secret)
        )
    assert "pw-3k" not in str(caught.value) and "FEATURESTREAM_KAFKA_CONFIG" in str(caught.value)

    missing = unique("missing")
    with pytest.raises(
        ServiceUnavailable, match=rf"topic '{missing}' of source 'orders' does not exist.*partitions=N"
    ):
        Producer(_source(missing), bootstrap_servers=services.kafka, config={})
    with Producer(_source(missing), bootstrap_servers=services.kafka, config={}, partitions=3) as created:
        created.send(_event(0))
    assert partition_count(services.kafka, missing) == 3

    with pytest.raises(KafkaConfigError, match=r"no\.such\.option") as caught:
        Producer(
            _source(topic),
            bootstrap_servers=services.kafka,
            config={"no.such.option": 1, "sasl.password": "pw-7q"},
        )
    assert "pw-7q" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Property: the producer accepts exactly what the stream's decoder accepts, for the same reason.
# ---------------------------------------------------------------------------------------------

_ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1])
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00", "é|\\"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_GOOD = {
    "str": st.text(max_size=8),
    "int": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    # NaN and infinities now and then: msgspec would write them as null, the decoder refuses them.
    "float": st.one_of(
        *[st.floats(allow_nan=False, allow_infinity=False)] * 5, st.sampled_from([math.nan, math.inf])
    ),
    "bool": st.booleans(),
}
_TS = {
    # not 946_684_800..4_102_444_799: epoch seconds of 2000..2100, refused as a unit mistake
    "epoch_millis": st.one_of(st.integers(0, 946_684_799), st.integers(4_102_444_800, 4_102_444_799_999)),
    "epoch_seconds": st.floats(min_value=0, max_value=4_102_444_799),
    "iso8601": st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
    ).map(lambda d: d.isoformat()),
}
_DATES = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.none() | st.just(UTC)
)


@st.composite
def _events(draw: st.DrawFn, fmt: str) -> dict[str, Any]:
    ev: dict[str, Any] = {}
    often = st.sampled_from([True] * 19 + [False])  # mostly true, whatever hypothesis favours
    for f in FIELDS:
        if not draw(often):
            if draw(st.booleans()):
                continue  # missing
            ev[f.name] = draw(_ANY)
        else:
            ev[f.name] = draw(_GOOD[f.dtype] | st.none() if f.nullable else _GOOD[f.dtype])
    if draw(often):
        ev["ts"] = draw(_TS[fmt] if draw(often) else st.one_of(_DATES, _ANY))
    elif draw(st.booleans()):
        ev["ts"] = draw(_ANY)
    if draw(st.booleans()):
        ev[draw(st.sampled_from(["extra", "more"]))] = draw(_ANY)
    return ev


def _oracle_bytes(event: dict[str, Any], fmt: str) -> bytes:
    """What a plain producer would send: datetimes as the documented format, then stdlib JSON."""
    ts = event.get("ts")
    if isinstance(ts, datetime) and ts.tzinfo is not None:
        since = ts - datetime(1970, 1, 1, tzinfo=UTC)
        as_format = {
            "epoch_millis": lambda: round(since / timedelta(milliseconds=1)),
            "epoch_seconds": lambda: since / timedelta(seconds=1),
            "iso8601": ts.isoformat,
        }
        event = {**event, "ts": as_format[fmt]()}
    return json.dumps(event).encode()


@pytest.mark.parametrize("fmt", ["epoch_millis", "epoch_seconds", "iso8601"])
def test_property_producer_and_stream_decoder_agree(
    services: Services, new_topic: Callable[..., str], fmt: str
) -> None:
    source = _source(new_topic(), fmt)
    decoder = EventDecoder(_view(source))
    producer = Producer(source, bootstrap_servers=services.kafka, config={}, key_fields=["user_id"])
    accepted: list[bytes] = []
    seen = {"ok": 0, "bad": 0}

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        derandomize=True,  # a fixed sample: the share of valid events stays above the floor below
        suppress_health_check=list(HealthCheck),
    )
    @given(event=_events(fmt))
    def check(event: dict[str, Any]) -> None:
        naive = isinstance(event.get("ts"), datetime) and event["ts"].tzinfo is None
        verdict = decoder.decode([_oracle_bytes(event, fmt)]) if not naive else None
        try:
            producer.send(event)
        except InvalidEvent as exc:
            seen["bad"] += 1
            if verdict is None:  # a naive datetime: no format to convert it to
                assert (exc.field, exc.reason) == ("ts", "bad_timestamp")
                return
            assert verdict.failures, f"the decoder accepts what the producer refused: {exc}"
            _, reason, detail = verdict.failures[0]
            assert (exc.reason, exc.field) == (reason, detail.split(": ", 1)[0]), (exc.detail, detail)
            return
        seen["ok"] += 1
        assert verdict is not None and verdict.failures == [], f"producer sent {event!r}"
        accepted.append(_oracle_bytes(event, fmt))

    check()
    producer.close()
    assert seen["ok"] > 10 and seen["bad"] > 10, seen  # both sides exercised
    sent = [v for _, _, v in read_messages(services.kafka, source.topic)]
    assert len(sent) == len(accepted)
    got, want = decoder.decode(sent), decoder.decode(accepted)
    assert got.failures == [] and len(got.entity) == len(accepted)  # nothing would be dead-lettered
    assert got.entity == want.entity and got.ts.tolist() == want.ts.tolist()
    for g, w in zip(got.columns, want.columns, strict=True):
        np.testing.assert_array_equal(g, w)  # same values (NaN where null) as the plain encoding
    assert got.text == want.text


# ---------------------------------------------------------------------------------------------
# End to end: produced events computed by a real dataflow reach Redis and Delta.
# ---------------------------------------------------------------------------------------------


def test_produced_events_reach_redis_and_delta(
    services: Services, new_topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    view = _view(_source(new_topic(2)))
    events = [
        _event(
            i,
            qty=i if i % 3 else None,
            discount=i / 10,
            note="n" if i % 4 == 0 else None,
            ts=T0 + timedelta(seconds=i),
        )
        for i in range(40)
    ]
    with Producer(view, bootstrap_servers=services.kafka, config={}) as producer:
        assert producer.send_many(events) == []
    run_views([view], runtime)

    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    got = store.get_online_features(["orders"], ["u0", "u3"], as_of=T0 + timedelta(minutes=5))
    for user in (0, 3):
        mine = [e for e in events if e["user_id"] == f"u{user}"]
        col = 0 if user == 0 else 1
        assert got.values["orders:events_count_1d"][col] == len(mine)
        assert got.values["orders:amount_sum_1d"][col] == pytest.approx(sum(e["amount"] for e in mine))
        assert got.values["orders:qty_sum_1d"][col] == sum(e["qty"] or 0 for e in mine)
        assert got.values["orders:discount_last_1d"][col] == pytest.approx(mine[-1]["discount"])
        assert got.values["orders:paid_sum_1d"][col] == sum(e["paid"] for e in mine)
        assert got.values["orders:note_count_1d"][col] == sum(e["note"] is not None for e in mine)

    offline = DeltaOfflineStore(runtime.delta_uri)
    table = offline.read(offline.table_uri(view.name, view.version))
    assert table is not None and table.num_rows == 40
    rows = sorted(zip(table.column("entity").to_pylist(), table.column("amount").to_pylist(), strict=True))
    assert rows == sorted((e["user_id"], e["amount"]) for e in events)
