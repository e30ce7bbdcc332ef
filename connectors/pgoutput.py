"""Decoding of PostgreSQL's built-in ``pgoutput`` logical replication messages (protocol 1), and
the conversion of their text-format column values to Debezium's JSON representations.

The wire format is PostgreSQL's "Logical Replication Message Formats" chapter. Values arrive in
their text form (the type's output function), as they do in a snapshot read with ``::text``, so
both paths share one converter and give identical JSON.

Value mapping (Debezium's defaults, except ``decimal.handling.mode=string``, which the bundled
Debezium connector config sets too): booleans and integers as JSON booleans and numbers, ``real``
and ``double precision`` as numbers, ``numeric`` as its exact decimal string, ``timestamptz`` as
an ISO-8601 UTC string (``io.debezium.time.ZonedTimestamp``), ``timestamp`` as microseconds since
the epoch (``MicroTimestamp``; milliseconds for precision <= 3), ``date`` as days since the epoch,
every other type as its PostgreSQL text.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

__all__ = [
    "UNAVAILABLE",
    "Begin",
    "Change",
    "Column",
    "Commit",
    "LogicalMessage",
    "Relation",
    "Truncate",
    "connect_type",
    "convert",
    "decode",
    "pg_epoch_to_ms",
]

# Debezium's placeholder for an unchanged TOASTed value that the WAL does not carry.
UNAVAILABLE = "__debezium_unavailable_value"
_PG_EPOCH_MS = 946_684_800_000  # 2000-01-01 in Unix milliseconds
_EPOCH_DAY = date(1970, 1, 1)


def pg_epoch_to_ms(micros: int) -> int:
    """Unix milliseconds of a PostgreSQL timestamp (microseconds since 2000-01-01)."""
    return _PG_EPOCH_MS + micros // 1000


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    typmod: int
    key: bool  # part of the replica identity key (flag 1 in the Relation message)


@dataclass(frozen=True)
class Relation:
    rel_id: int
    schema: str
    table: str
    replica_identity: str  # d(efault), n(othing), f(ull), i(ndex)
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_ms: int
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_ms: int


@dataclass(frozen=True)
class Change:
    """An insert (``I``), update (``U``) or delete (``D``) of one row of ``rel_id``. ``old`` is
    the old row image: the key columns only (kind ``K``) or the whole row (``O``, with REPLICA
    IDENTITY FULL); ``None`` when the WAL carries none (an update that keeps the key)."""

    op: str
    rel_id: int
    new: list[Any] | None
    old: list[Any] | None
    old_kind: str | None = None


@dataclass(frozen=True)
class Truncate:
    rel_ids: tuple[int, ...]


@dataclass(frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass
class _Reader:
    buf: bytes
    pos: int = 0
    _fmt: dict[str, struct.Struct] = field(default_factory=dict)

    def unpack(self, fmt: str) -> Any:
        s = self._fmt.get(fmt) or self._fmt.setdefault(fmt, struct.Struct("!" + fmt))
        out = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return out if len(out) > 1 else out[0]

    def cstring(self) -> str:
        end = self.buf.index(b"\0", self.pos)
        text = self.buf[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return text

    def raw(self, n: int) -> bytes:
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def tuple_data(self) -> list[Any]:
        out: list[Any] = []
        for _ in range(self.unpack("h")):
            kind = self.raw(1)
            if kind == b"n":
                out.append(None)
            elif kind == b"u":
                out.append(UNAVAILABLE)
            elif kind == b"t":
                out.append(self.raw(self.unpack("i")).decode("utf-8"))
            else:
                raise ValueError(f"unsupported pgoutput tuple value kind {kind!r} (use proto_version 1)")
        return out


def decode(payload: bytes) -> Begin | Commit | Relation | Change | Truncate | LogicalMessage | None:
    """One pgoutput message; ``None`` for kinds that carry nothing a change event needs
    (origin, type)."""
    r = _Reader(payload, 1)
    kind = payload[:1]
    if kind == b"B":
        final_lsn, ts, xid = r.unpack("qqI")
        return Begin(final_lsn, pg_epoch_to_ms(ts), xid)
    if kind == b"C":
        _flags, commit_lsn, end_lsn, ts = r.unpack("bqqq")
        return Commit(commit_lsn, end_lsn, pg_epoch_to_ms(ts))
    if kind == b"R":
        rel_id = r.unpack("I")
        schema, table = r.cstring(), r.cstring()
        ident = chr(r.unpack("b"))
        cols = []
        for _ in range(r.unpack("h")):
            flags = r.unpack("b")
            name = r.cstring()
            oid, typmod = r.unpack("Ii")
            cols.append(Column(name, oid, typmod, bool(flags & 1)))
        return Relation(rel_id, schema, table, ident, tuple(cols))
    if kind == b"I":
        rel_id = r.unpack("I")
        r.raw(1)  # 'N'
        return Change("I", rel_id, r.tuple_data(), None)
    if kind == b"U":
        rel_id = r.unpack("I")
        sub = r.raw(1)
        old, old_kind = None, None
        if sub in (b"K", b"O"):
            old_kind = sub.decode()
            old = r.tuple_data()
            sub = r.raw(1)
        return Change("U", rel_id, r.tuple_data(), old, old_kind)
    if kind == b"D":
        rel_id = r.unpack("I")
        old_kind = r.raw(1).decode()
        return Change("D", rel_id, None, r.tuple_data(), old_kind)
    if kind == b"T":
        n = r.unpack("I")
        r.unpack("b")
        return Truncate(tuple(r.unpack("I") for _ in range(n)))
    if kind == b"M":
        flags, lsn = r.unpack("bq")
        prefix = r.cstring()
        return LogicalMessage(bool(flags & 1), lsn, prefix, r.raw(r.unpack("i")))
    return None


# --- values ---------------------------------------------------------------------------------

_BOOL, _INT2, _INT4, _INT8, _OID = 16, 21, 23, 20, 26
_FLOAT4, _FLOAT8, _NUMERIC = 700, 701, 1700
_DATE, _TIMESTAMP, _TIMESTAMPTZ = 1082, 1114, 1184


def _timestamp(text: str) -> datetime:
    """A ``timestamp[tz]`` in PostgreSQL's ISO output (``2024-01-02 03:04:05.5+00``)."""
    if text[-3:-2] in "+-" and text[-3:].replace("+", "").replace("-", "").isdigit():
        text += ":00"  # "+05" -> "+05:00"
    return datetime.fromisoformat(text)


def _zoned(text: str) -> str:
    """Debezium's ZonedTimestamp: UTC, ``Z``, the fraction without trailing zeros."""
    ts = _timestamp(text).astimezone(UTC)
    frac = f".{ts.microsecond:06d}".rstrip("0") if ts.microsecond else ""
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def _micro(text: str) -> int:
    ts = _timestamp(text).replace(tzinfo=UTC)
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // _MICRO


_MICRO = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)


def _float(text: str) -> float | str:
    value = float(text)
    return value if value == value and abs(value) != float("inf") else text  # NaN/Infinity: text


_CONVERTERS: dict[int, Callable[[str], Any]] = {
    _BOOL: lambda t: t == "t",
    _INT2: int,
    _INT4: int,
    _INT8: int,
    _OID: int,
    _FLOAT4: _float,
    _FLOAT8: _float,
    _NUMERIC: str,
    _DATE: lambda t: (date.fromisoformat(t) - _EPOCH_DAY).days,
    _TIMESTAMPTZ: _zoned,
}

# Kafka Connect schema (type, logical name) of each value, for the schema/payload form.
_CONNECT: dict[int, tuple[str, str | None]] = {
    _BOOL: ("boolean", None),
    _INT2: ("int16", None),
    _INT4: ("int32", None),
    _INT8: ("int64", None),
    _OID: ("int64", None),
    _FLOAT4: ("float", None),
    _FLOAT8: ("double", None),
    _DATE: ("int32", "io.debezium.time.Date"),
    _TIMESTAMPTZ: ("string", "io.debezium.time.ZonedTimestamp"),
}


def connect_type(col: Column) -> tuple[str, str | None]:
    """The Kafka Connect type and logical name Debezium gives ``col``."""
    if col.type_oid == _TIMESTAMP:
        return (
            "int64",
            "io.debezium.time.Timestamp" if 0 <= col.typmod <= 3 else "io.debezium.time.MicroTimestamp",
        )
    return _CONNECT.get(col.type_oid, ("string", None))


def convert(col: Column, text: Any) -> Any:
    """The Debezium JSON value of one column from its PostgreSQL text form."""
    if text is None or text is UNAVAILABLE or not isinstance(text, str):
        return text
    if col.type_oid == _TIMESTAMP:
        if text in ("infinity", "-infinity"):
            return text
        micros = _micro(text)
        return micros // 1000 if 0 <= col.typmod <= 3 else micros
    if col.type_oid in (_TIMESTAMPTZ, _DATE) and text in ("infinity", "-infinity"):
        return text
    fn = _CONVERTERS.get(col.type_oid)
    return text if fn is None else fn(text)
