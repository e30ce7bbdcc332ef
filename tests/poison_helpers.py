"""Shared by the poison-message tests: a corpus of hostile messages, each with the dead-letter
reason it must get, odd but valid messages that must be accepted, and a stream mixing both into
good traffic.

The view has a composite key (``user_id`` str, ``shop`` int), a float ``amount`` and epoch-millis
``ts``. Every poison message is otherwise a valid event, so only its one defect is tested.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Any

from engine.definitions import FeatureView, Field
from tests.pipeline_faults_helpers import make_view
from tests.pipeline_helpers import BASE

KEYS = (Field(name="user_id", dtype="str"), Field(name="shop", dtype="int"))
BIG = 3 * 1024 * 1024  # bytes of the multi-megabyte poison message
DEEP = 5_000  # nesting levels, well past the decoder's recursion limit
MESSAGE = "(message)"  # the detail's subject when no single field is to blame


def poison_view(topic: str, name: str = "poison_view") -> FeatureView:
    return make_view(topic, name, keys=KEYS)


@dataclass(frozen=True)
class Poison:
    kind: str
    value: bytes | None  # None: a tombstone (null value)
    key: bytes | None
    reason: str
    field: str  # the detail must start with "<field>:"


@dataclass(frozen=True)
class Odd:
    """An unusual message that is a valid event: it must be accepted with these values."""

    kind: str
    value: bytes
    key: bytes | None
    user_id: str
    shop: int
    amount: float


def _msg(at: int, /, **fields: bytes | None) -> bytes:
    """A JSON object from raw field encodings (event time ``at``); a field set to None is left out."""
    parts = {"user_id": b'"p"', "shop": b"1", "amount": b"1.5", "ts": str(at).encode()}
    parts.update(fields)
    return b"{" + b",".join(b'"' + k.encode() + b'":' + v for k, v in parts.items() if v is not None) + b"}"


def poison_corpus(ts: int, bound: int) -> list[Poison]:
    """Hostile messages with their reasons; ``bound`` is the dead-letter payload bound."""
    good = _msg(ts)
    text = good.decode()
    deep_arr = b"[" * DEEP + b"]" * DEEP
    deep_obj = b'{"a":' * DEEP + b"1" + b"}" * DEEP
    keys: list[bytes | None] = [None, b"", b"\x00\xff\xfe binary", "ключ".encode(), b"k" * 300]
    items: list[tuple[str, bytes | None, str, str]] = [
        # encodings
        ("utf8-invalid-byte", _msg(ts, user_id=b'"u\xff"'), "invalid_encoding", "user_id"),
        ("utf8-overlong", _msg(ts, user_id=b'"\xc0\xaf"'), "invalid_encoding", "user_id"),
        ("utf8-truncated-sequence", _msg(ts, user_id=b'"ab\xe2\x82"'), "invalid_encoding", "user_id"),
        ("utf8-encoded-surrogate", _msg(ts, user_id=b'"\xed\xa0\x80"'), "invalid_encoding", "user_id"),
        ("latin1-text", _msg(ts, user_id='"café"'.encode("latin-1")), "invalid_encoding", "user_id"),
        ("lone-high-surrogate", _msg(ts, user_id=b'"\\ud800"'), "invalid_encoding", "user_id"),
        ("lone-low-surrogate", _msg(ts, user_id=b'"\\udc00x"'), "invalid_encoding", "user_id"),
        ("lone-surrogate-unknown-field", _msg(ts, x=b'"\\udc00"'), "invalid_encoding", "x"),
        ("utf8-bom", b"\xef\xbb\xbf" + good, "invalid_encoding", MESSAGE),
        ("utf16-le-bom", text.encode("utf-16"), "invalid_encoding", MESSAGE),
        ("utf16-be", text.encode("utf-16-be"), "invalid_encoding", MESSAGE),
        ("utf32", text.encode("utf-32"), "invalid_encoding", MESSAGE),
        ("raw-tab-in-string", _msg(ts, user_id=b'"a\tb"'), "malformed_json", "user_id"),
        ("gzip", gzip.compress(good, mtime=0), "malformed_json", MESSAGE),
        ("png-bytes", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "malformed_json", MESSAGE),
        # depth
        ("deep-array-unknown-field", _msg(ts, x=deep_arr), "too_deep", "x"),
        ("deep-object-unknown-field", _msg(ts, nested=deep_obj), "too_deep", "nested"),
        ("deep-unterminated", _msg(ts, x=b"[" * 100_000)[:-1], "too_deep", "x"),
        ("deep-in-key-field", _msg(ts, user_id=deep_arr), "invalid_type", "user_id"),
        ("deep-in-timestamp", _msg(ts, ts=deep_obj), "bad_timestamp", "ts"),
        ("deep-top-level", deep_arr, "malformed_json", MESSAGE),
        # size: over the dead-letter bound, delivered truncated
        ("huge-malformed", _msg(ts, note=b'"' + b"n" * BIG + b'"')[:-1], "malformed_json", MESSAGE),
        (
            "huge-missing-field",
            _msg(ts, user_id=None, pad=b'"' + b"p" * BIG + b'"'),
            "missing_field",
            "user_id",
        ),
        (
            "just-over-bound",
            _msg(ts, amount=b'"x"', pad=b'"' + b"q" * bound + b'"'),
            "invalid_type",
            "amount",
        ),
        # numbers
        ("float-1e400", _msg(ts, amount=b"1e400"), "invalid_value", "amount"),
        ("float-minus-1e400", _msg(ts, amount=b"-1e400"), "invalid_value", "amount"),
        ("float-NaN", _msg(ts, amount=b"NaN"), "invalid_value", "amount"),
        ("float-Infinity", _msg(ts, amount=b"Infinity"), "invalid_value", "amount"),
        ("float-minus-Infinity", _msg(ts, amount=b"-Infinity"), "invalid_value", "amount"),
        ("float-400-digits", _msg(ts, amount=b"9" * 400), "invalid_value", "amount"),
        ("float-NaN-text", _msg(ts, amount=b'"NaN"'), "invalid_type", "amount"),
        ("float-bool", _msg(ts, amount=b"true"), "invalid_type", "amount"),
        ("float-null", _msg(ts, amount=b"null"), "invalid_type", "amount"),
        ("float-leading-zeros", _msg(ts, amount=b"007"), "malformed_json", "amount"),
        ("float-hex", _msg(ts, amount=b"0x10"), "malformed_json", "amount"),
        ("int-2^63", _msg(ts, shop=str(2**63).encode()), "invalid_value", "shop"),
        ("int-below-int64", _msg(ts, shop=str(-(2**63) - 1).encode()), "invalid_value", "shop"),
        ("int-5000-digits", _msg(ts, shop=b"7" * 5000), "invalid_value", "shop"),
        ("int-fraction", _msg(ts, shop=b"1.5"), "invalid_type", "shop"),
        ("int-exponent", _msg(ts, shop=b"1e2"), "invalid_type", "shop"),
        # timestamps
        ("ts-float", _msg(ts, ts=b"1.7e12"), "bad_timestamp", "ts"),
        ("ts-digit-string", _msg(ts, ts=f'"{ts}"'.encode()), "bad_timestamp", "ts"),
        ("ts-iso-string", _msg(ts, ts=b'"2024-03-10T23:00:00Z"'), "bad_timestamp", "ts"),
        ("ts-negative", _msg(ts, ts=b"-1"), "bad_timestamp", "ts"),
        ("ts-after-2100", _msg(ts, ts=b"4102444800000"), "bad_timestamp", "ts"),
        ("ts-microseconds", _msg(ts, ts=str(ts * 1000).encode()), "bad_timestamp", "ts"),
        ("ts-beyond-int64", _msg(ts, ts=b"1" + b"0" * 30), "bad_timestamp", "ts"),
        ("ts-4400-digits", _msg(ts, ts=b"9" * 4400), "bad_timestamp", "ts"),
        ("ts-1e400", _msg(ts, ts=b"1e400"), "bad_timestamp", "ts"),
        ("ts-NaN", _msg(ts, ts=b"NaN"), "bad_timestamp", "ts"),
        ("ts-null", _msg(ts, ts=b"null"), "bad_timestamp", "ts"),
        ("ts-bool", _msg(ts, ts=b"true"), "bad_timestamp", "ts"),
        ("ts-array", _msg(ts, ts=f"[{ts}]".encode()), "bad_timestamp", "ts"),
        ("ts-object", _msg(ts, ts=f'{{"$date": {ts}}}'.encode()), "bad_timestamp", "ts"),
        ("ts-missing", _msg(ts, ts=None), "missing_field", "ts"),
        # structure
        ("empty-value", b"", "malformed_json", MESSAGE),
        ("null-value", None, "malformed_json", MESSAGE),
        ("whitespace", b" \n\t ", "malformed_json", MESSAGE),
        ("json-null", b"null", "malformed_json", MESSAGE),
        ("json-array-of-events", b"[" + good + b"]", "malformed_json", MESSAGE),
        ("json-number", b"42", "malformed_json", MESSAGE),
        ("json-string", b'"event"', "malformed_json", MESSAGE),
        ("json-true", b"true", "malformed_json", MESSAGE),
        ("trailing-garbage", good + b" x", "malformed_json", MESSAGE),
        ("trailing-nul", good + b"\x00", "malformed_json", MESSAGE),
        ("two-objects", good + good, "malformed_json", MESSAGE),
        ("trailing-comma", good[:-1] + b",}", "malformed_json", MESSAGE),
        ("single-quotes", text.replace('"', "'").encode(), "malformed_json", MESSAGE),
        ("js-comment", b"/* c */" + good, "malformed_json", MESSAGE),
        ("truncated-object", good[:-3], "malformed_json", MESSAGE),
        ("duplicate-key-last-invalid", good[:-1] + b',"amount":"x"}', "invalid_type", "amount"),
        ("missing-user-id", _msg(ts, user_id=None), "missing_field", "user_id"),
        ("missing-shop", _msg(ts, shop=None), "missing_field", "shop"),
        ("user-id-null", _msg(ts, user_id=b"null"), "invalid_type", "user_id"),
        ("user-id-number", _msg(ts, user_id=b"7"), "invalid_type", "user_id"),
        ("user-id-object", _msg(ts, user_id=b'{"id": "u"}'), "invalid_type", "user_id"),
    ]
    out = [Poison(kind, v, keys[i % len(keys)], reason, f) for i, (kind, v, reason, f) in enumerate(items)]
    out.append(Poison("huge-key", _msg(ts, amount=None), b"K" * (2 * bound), "missing_field", "amount"))
    return out


def odd_corpus(ts: int) -> list[Odd]:
    """Unusual messages that are valid events (``ts`` is their event time)."""

    def odd(kind: str, value: bytes, user_id: str, shop: int, amount: float, key: bytes | None = None) -> Odd:
        return Odd(kind, value, key, user_id, shop, amount)

    return [
        odd("duplicate-key-last-wins", _msg(ts, user_id=b'"o1"')[:-1] + b',"amount":2.5}', "o1", 1, 2.5),
        odd("surrounding-whitespace", b" \r\n" + _msg(ts, user_id=b'"o2"') + b"\n ", "o2", 1, 1.5),
        odd("nested-100-unknown", _msg(ts, user_id=b'"o3"', x=b"[" * 100 + b"]" * 100), "o3", 1, 1.5),
        odd("bad-utf8-in-unknown-field", _msg(ts, user_id=b'"o4"', x=b'"\xff\xfe"'), "o4", 1, 1.5),
        odd("bad-utf8-in-unknown-key", b'{"\xff":1,' + _msg(ts, user_id=b'"o4"')[1:], "o4", 1, 1.5),
        odd("escaped-nul-in-key-field", _msg(ts, user_id=b'"o\\u0000"'), "o\x00", 1, 1.5),
        odd("escaped-surrogate-pair", _msg(ts, user_id=b'"\\ud83d\\ude00"'), "\U0001f600", 1, 1.5),
        odd("unicode-key-field", _msg(ts, user_id='"ключ"'.encode()), "ключ", 1, 1.5),
        odd(
            "escaped-field-name", _msg(ts, user_id=b'"o5"').replace(b'"shop"', b'"sh\\u006fp"'), "o5", 1, 1.5
        ),
        odd("int64-max", _msg(ts, user_id=b'"o6"', shop=str(2**63 - 1).encode()), "o6", 2**63 - 1, 1.5),
        odd("int64-min", _msg(ts, user_id=b'"o6"', shop=str(-(2**63)).encode()), "o6", -(2**63), 1.5),
        odd("float-as-integer", _msg(ts, user_id=b'"o7"', amount=b"7"), "o7", 1, 7.0),
        odd("float-negative-zero", _msg(ts, user_id=b'"o7"', amount=b"-0.0"), "o7", 1, 0.0),
        odd("float-underflow", _msg(ts, user_id=b'"o7"', amount=b"1e-400"), "o7", 1, 0.0),
        odd("float-exponent", _msg(ts, user_id=b'"o7"', amount=b"1E+2"), "o7", 1, 100.0),
        odd("big-valid-event", _msg(ts, user_id=b'"o8"', pad=b'"' + b"z" * 1_200_000 + b'"'), "o8", 1, 1.5),
        odd("null-key", _msg(ts, user_id=b'"o9"'), "o9", 1, 1.5, None),
        odd("empty-key", _msg(ts, user_id=b'"o9"'), "o9", 1, 1.5, b""),
        odd("binary-key", _msg(ts, user_id=b'"o9"'), "o9", 1, 1.5, b"\x00\xff\x80"),
        odd("large-key", _msg(ts, user_id=b'"o9"'), "o9", 1, 1.5, b"k" * 100_000),
    ]


# ---------------------------------------------------------------------------------------------
# A stream: good traffic with the corpus spread through it.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One message to produce; ``poison`` or ``good`` (the event's expected values) is set."""

    value: bytes | None
    key: bytes | None
    partition: int
    poison: Poison | None = None
    good: dict[str, Any] | None = None


def stream(bound: int, n_good: int = 240, partitions: int = 2, seed: int = 0) -> list[Item]:
    """``n_good`` plain events of 6 entities, 10 s apart, with the poison and odd messages spread
    between them; the events' times only grow within each partition (nothing is late)."""
    items: list[Item] = []
    poison = poison_corpus(BASE, bound)
    odd = odd_corpus(BASE)
    extra = [(p, None) for p in poison] + [(None, o) for o in odd]
    every = max(1, n_good // len(extra))
    j = 0
    for i in range(n_good):
        ts = BASE + i * 10_000
        ev = {
            "user_id": f"g{(i + seed) % 3}",
            "shop": i % 2,
            "amount": round(1.25 * (i % 17) - 3, 2),
            "ts": ts,
        }
        items.append(Item(json.dumps(ev).encode(), ev["user_id"].encode(), i % partitions, good=ev))
        if i % every == 0 and j < len(extra):
            p, o = extra[j]
            j += 1
            part = j % partitions
            if p is not None:
                items.append(Item(p.value, p.key, part, poison=p))
            else:
                assert o is not None
                value = o.value.replace(str(BASE).encode(), str(ts).encode(), 1)
                expect = {"user_id": o.user_id, "shop": o.shop, "amount": o.amount, "ts": ts}
                items.append(Item(value, o.key, part, good=expect))
    for p, o in extra[j:]:
        assert p is not None or o is not None
        last = BASE + n_good * 10_000
        if p is not None:
            items.append(Item(p.value, p.key, 0, poison=p))
        else:
            assert o is not None
            value = o.value.replace(str(BASE).encode(), str(last).encode(), 1)
            expect = {"user_id": o.user_id, "shop": o.shop, "amount": o.amount, "ts": last}
            items.append(Item(value, o.key, 0, good=expect))
    return items


def entity_of(ev: dict[str, Any]) -> str:
    """The oracle's own entity label (any injective one works: the store is read by key values)."""
    return json.dumps([ev["user_id"], ev["shop"]])
