"""Decode Debezium change events (JSON) into typed changes, routing every failure to a dead letter.

The format is Debezium's documented JSON: the value is the change envelope
``{"before", "after", "source", "op", "ts_ms", "transaction"}``, either bare (the converter's
``schemas.enable=false``, the default here) or wrapped as ``{"schema": ..., "payload": envelope}``;
the key is the row's primary key as a JSON object, bare or wrapped the same way. Numeric columns
may come as numbers or as decimal strings (``decimal.handling.mode=string``). ``op`` is ``c``
(insert), ``u`` (update), ``d`` (delete) or ``r`` (a snapshot read). A delete is followed by a
*tombstone* (the same key, a null value) for log compaction: it is skipped, not an error.

Each message is decoded by one typed msgspec call (the row images are typed by the source's
fields), so a bad message is found exactly and never affects its neighbours. The event time is
``source.ts_ms`` (when the database made the change), else ``ts_ms``; the ordering position is
``source.lsn`` (PostgreSQL's log sequence number), else the Kafka offset.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
from msgspec.structs import astuple

from engine.decode import _INT64, _MAX_DETAIL, _MAX_TS_MS, _PY, _WANT, Reason, entity_id
from engine.decode_errors import MESSAGE as _MESSAGE
from engine.decode_errors import describe_error as _describe
from engine.decode_errors import field_at as _field_at
from engine.decode_errors import non_finite_at as _non_finite_at
from engine.decode_errors import other_encoding as _other_encoding
from engine.decode_errors import subject as _subject
from engine.definitions import EventSource
from engine.table_definitions import CdcSource

__all__ = ["ARROW_TYPES", "OPS", "CdcDecoder", "DecodedChanges"]

OPS = ("c", "u", "d", "r")
ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}
_PATH = re.compile(r"at `\$\.([A-Za-z0-9_.\[\]]+)`")
_MISSING = re.compile(r"missing required field `([A-Za-z0-9_]+)`")
_ENVELOPE_HINT = "send a Debezium change event {before, after, source, op, ts_ms} (optionally as payload)"
_OP_NAMES = {"t": "a truncate", "m": "a logical decoding message"}


class _Source(msgspec.Struct, kw_only=True, gc=False):
    ts_ms: _INT64 | None = None
    lsn: _INT64 | None = None


@dataclass
class DecodedChanges:
    """Valid changes of one batch; ``index`` points back into the raw batch.

    ``after[i]``/``before[i]`` hold the source's fields in declaration order (None: no image).
    ``tombstones`` counts the skipped tombstones.
    """

    index: np.ndarray
    op: list[str]
    pk: list[str]
    position: np.ndarray
    lsn: list[int | None]
    ts: np.ndarray
    after: list[tuple[Any, ...] | None]
    before: list[tuple[Any, ...] | None]
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    tombstones: int = 0


class _Failure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class CdcDecoder:
    """Turns Debezium (key, value) bytes into changes of a :class:`CdcSource`. Never raises.

    Of an :class:`EventSource` (``format="debezium-json"``), changes have no primary key (``""``),
    tombstones need no key, and a field named ``op`` is not read from the row images.
    """

    def __init__(self, source: CdcSource | EventSource) -> None:
        self.source = source
        row_fields = [f for f in source.fields if isinstance(source, CdcSource) or f.name != "op"]
        self.fields = {f.name: f for f in row_fields}
        self.names = tuple(self.fields)
        self.pk = source.primary_key if isinstance(source, CdcSource) else ()
        after_spec: list[tuple[Any, ...]] = []
        before_spec: list[tuple[Any, ...]] = []
        for f in row_fields:
            t = _PY[f.dtype]
            required = not f.nullable
            after_spec.append((f.name, t) if required else (f.name, t | None, None))
            before_spec.append((f.name, t | None, None))
        # gc=False: decoded structs hold only scalars and other structs (no cycles), so the
        # garbage collector need not track the several made per message.
        after = msgspec.defstruct("After", after_spec, kw_only=True, gc=False)
        before = msgspec.defstruct("Before", before_spec, kw_only=True, gc=False)
        common: list[tuple[Any, ...]] = [
            ("op", str | None, None),
            ("before", before | None, None),
            ("after", after | None, None),
            ("source", _Source | None, None),
            ("ts_ms", _INT64 | None, None),
        ]
        inner = msgspec.defstruct("Payload", common, kw_only=True, gc=False)
        outer = msgspec.defstruct(
            "Envelope",
            [*common, ("payload", inner | None, None), ("schema", msgspec.Raw, msgspec.Raw(b""))],
            kw_only=True,
            gc=False,
        )
        # strict=False: numbers sent as strings (Debezium's decimal.handling.mode=string, e.g.
        # "12.50" for a numeric column) are read as numbers; non-finite ones are refused below.
        self._value = msgspec.json.Decoder(outer, strict=False)
        self._floats = [i for i, f in enumerate(row_fields) if f.dtype == "float"]
        self._key = msgspec.json.Decoder(dict[str, Any])
        # The common key, bare with typed key columns, in one typed call; anything else (wrapped,
        # or wrong) takes the general path, which also names what is wrong.
        key_spec: list[tuple[Any, ...]] = [(k, _PY[self.fields[k].dtype]) for k in self.pk]
        key_spec += [("schema", msgspec.Raw, msgspec.Raw(b"")), ("payload", msgspec.Raw, msgspec.Raw(b""))]
        self._typed_key = msgspec.json.Decoder(msgspec.defstruct("Key", key_spec, kw_only=True, gc=False))
        self._envelope, self._after_type, self._before_type = outer, after, before
        self._arrow = [ARROW_TYPES[f.dtype] for f in row_fields]

    def decode(self, keys: list[bytes | None], values: list[bytes], offsets: np.ndarray) -> DecodedChanges:
        """Every message is a change, a skipped tombstone or a failure (reason, detail)."""
        out = DecodedChanges(
            index=np.zeros(0, np.int64), op=[], pk=[], position=np.zeros(0, np.int64), lsn=[],
            ts=np.zeros(0, np.int64), after=[], before=[],
        )  # fmt: skip
        kept: list[int] = []
        pos: list[int] = []
        ts: list[int] = []
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            if not v:
                if k or not self.pk:  # a tombstone: the key of a deleted row with a null value
                    out.tombstones += 1
                else:
                    out.failures.append(
                        (
                            i,
                            Reason.MALFORMED,
                            f"{_MESSAGE}: the message is empty and has no key; {_ENVELOPE_HINT}",
                        )
                    )
                continue
            try:
                op, pk, p, lsn, t, after, before = self._one(k, v, int(offsets[i]))
            except _Failure as f:
                out.failures.append((i, f.reason, f.detail[:_MAX_DETAIL]))
                continue
            except Exception as exc:  # unforeseen: blame this message only
                why = f"{_MESSAGE}: could not be decoded ({_describe(exc)}); {_ENVELOPE_HINT}"
                out.failures.append((i, Reason.UNDECODABLE, why[:_MAX_DETAIL]))
                continue
            kept.append(i)
            out.op.append(op)
            out.pk.append(pk)
            pos.append(p)
            out.lsn.append(lsn)
            ts.append(t)
            out.after.append(after)
            out.before.append(before)
        out.index = np.asarray(kept, np.int64)
        out.position = np.asarray(pos, np.int64)
        out.ts = np.asarray(ts, np.int64)
        return out

    def _one(
        self, key: bytes | None, value: bytes, offset: int
    ) -> tuple[str, str, int, int | None, int, tuple[Any, ...] | None, tuple[Any, ...] | None]:
        try:
            env = self._value.decode(value)
        except Exception as exc:
            raise _Failure(*self._explain(exc, value)) from None
        if env.payload is not None:
            env = env.payload
        elif env.op is None and len(env.schema):
            raise _Failure(
                Reason.MISSING,
                "payload: the message has a schema but no payload object; send the change event as "
                "payload, or the bare event (schemas.enable=false)",
            )
        op = env.op
        if op is None:
            raise _Failure(Reason.MISSING, f"op: required field is missing; {_ENVELOPE_HINT}")
        if op not in OPS:
            what = _OP_NAMES.get(op, repr(op)[:40])
            raise _Failure(
                Reason.VALUE,
                f"op: {what} event is not a row change; send op 'c', 'u', 'd' or 'r' "
                "(exclude other events in the connector, e.g. skipped.operations=t)",
            )
        src = env.source
        ts = src.ts_ms if src is not None and src.ts_ms is not None else env.ts_ms
        if ts is None:
            raise _Failure(
                Reason.TIMESTAMP,
                "source.ts_ms: the event has neither source.ts_ms nor ts_ms; send the change time "
                "in milliseconds since 1970-01-01T00:00:00Z",
            )
        if not 0 <= ts < _MAX_TS_MS:
            where = "source.ts_ms" if src is not None and src.ts_ms is not None else "ts_ms"
            raise _Failure(
                Reason.TIMESTAMP,
                f"{where}: {ts} is outside 1970..2100 as epoch milliseconds; send milliseconds since "
                "1970-01-01T00:00:00Z",
            )
        lsn = src.lsn if src is not None else None
        if lsn is not None and lsn < 0:
            raise _Failure(
                Reason.VALUE, f"source.lsn: {lsn} is negative; send the change's log sequence number"
            )
        # The image structs' fields are self.names, in order.
        after = None if env.after is None else astuple(env.after)
        before = None if env.before is None else astuple(env.before)
        for image, where in ((after, "after"), (before, "before")):
            for j in self._floats if image is not None else ():
                v = image[j]
                if v is not None and not math.isfinite(v):
                    raise _Failure(
                        Reason.VALUE,
                        f"{where}.{self.names[j]}: {v} is not a finite number; send a finite number"
                        + (" or null" if self.fields[self.names[j]].nullable else ""),
                    )
        if op != "d" and after is None:
            raise _Failure(
                Reason.MISSING, f"after: op {op!r} needs the row's after image; send after as an object"
            )
        if not self.pk:
            pk = ""
        elif key:
            pk = self._key_pk(key)
        else:
            image = after if op != "d" else before
            if image is None:
                raise _Failure(
                    Reason.MISSING,
                    "before: a delete without a message key needs the before image to find the row; "
                    "send the Debezium key or the before image",
                )
            where = "after" if op != "d" else "before"
            values = []
            for k in self.pk:
                v = image[self.names.index(k)]
                if v is None:
                    raise _Failure(
                        Reason.MISSING,
                        f"{where}.{k}: primary key column is null and the message has no key; send "
                        "the Debezium key or the key column in the row image",
                    )
                values.append(v)
            pk = entity_id(values)
        return op, pk, offset if lsn is None else lsn, lsn, ts, after, before

    def _key_pk(self, key: bytes) -> str:
        try:
            typed = self._typed_key.decode(key)
            if not (len(typed.schema) and len(typed.payload)):
                return entity_id([getattr(typed, k) for k in self.pk])
        except Exception:  # the general path below says what is wrong
            pass
        try:
            obj = self._key.decode(key)
        except Exception as exc:
            reason = Reason.ENCODING if isinstance(exc, UnicodeDecodeError) else Reason.MALFORMED
            raise _Failure(
                reason,
                f"key: not a JSON object ({_describe(exc)[:120]}); key change events by the row's primary "
                'key as Debezium\'s key JSON, e.g. {"id": 1}',
            ) from None
        if "payload" in obj and "schema" in obj:
            obj = obj["payload"]
            if not isinstance(obj, dict):
                raise _Failure(
                    Reason.TYPE, "key.payload: is not an object; send the key columns as an object"
                )
        values = []
        for k in self.pk:
            if k not in obj or obj[k] is None:
                raise _Failure(
                    Reason.MISSING,
                    f"key.{k}: primary key column is missing from the message key; key events by "
                    f"{list(self.pk)} (the table's primary key)",
                )
            v, want = obj[k], self.fields[k].dtype
            if isinstance(v, bool) or not isinstance(v, int if want == "int" else str):
                raise _Failure(
                    Reason.TYPE, f"key.{k}: got {type(v).__name__} {repr(v)[:40]}; send {_WANT[want]}"
                )
            values.append(v)
        return entity_id(values)

    def _explain(self, exc: Exception, raw: bytes) -> tuple[str, str]:
        """The reason and detail of a value msgspec refused; never raises."""
        try:
            if isinstance(exc, msgspec.ValidationError):
                return self._invalid(str(exc))
            if isinstance(exc, UnicodeDecodeError):
                return Reason.ENCODING, f"{_MESSAGE}: not valid UTF-8 ({exc.reason}); send text as UTF-8"
            if isinstance(exc, RecursionError):
                return Reason.TOO_DEEP, (
                    f"{_MESSAGE}: nested deeper than the decoder allows (about "
                    f"{sys.getrecursionlimit()} levels); flatten the value"
                )
            if isinstance(exc, msgspec.DecodeError):
                other = _other_encoding(raw)
                if other is not None:
                    return Reason.ENCODING, f"{_MESSAGE}: the message is {other}; send UTF-8 JSON"
                msg = str(exc)
                at = re.search(r"\(byte (\d+)\)", msg)
                name = _field_at(raw, int(at.group(1))) if at else None
                token = _non_finite_at(raw, int(at.group(1))) if at else None
                if token is not None:
                    return Reason.VALUE, (
                        f"{_subject(name)}: {token} is not a JSON number; send a finite number "
                        "(or null where the field is nullable)"
                    )
                return Reason.MALFORMED, f"{_subject(name)}: {msg}; {_ENVELOPE_HINT}"
            return (
                Reason.UNDECODABLE,
                f"{_MESSAGE}: could not be decoded ({_describe(exc)}); {_ENVELOPE_HINT}",
            )
        except Exception as inner:
            return Reason.UNDECODABLE, f"{_MESSAGE}: could not be decoded ({_describe(inner)})"

    def _invalid(self, msg: str) -> tuple[str, str]:
        path_m = _PATH.search(msg)
        path = path_m.group(1) if path_m else ""
        what = msg.split(" - at")[0]
        missing = _MISSING.search(msg)
        if missing:
            name = f"{path}.{missing.group(1)}" if path else missing.group(1)
            return Reason.MISSING, f"{name}: required column is missing; include it in every row image"
        if not path:
            return Reason.MALFORMED, f"{_MESSAGE}: {what}; {_ENVELOPE_HINT}"
        leaf = path.rsplit(".", 1)[-1]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if parent.endswith(("before", "after")) and leaf in self.fields:
            f = self.fields[leaf]
            null = " or null" if f.nullable else ""
            if "out of range" in what or what.startswith(("Expected `int` >=", "Expected `int` <=")):
                return Reason.VALUE, f"{path}: {what}; send an integer within ±2^63{null}"
            return Reason.TYPE, f"{path}: {what}; send {_WANT[f.dtype]}{null}"
        if leaf == "ts_ms":
            return Reason.TIMESTAMP, f"{path}: {what}; send milliseconds since 1970-01-01T00:00:00Z"
        if leaf == "lsn":
            return Reason.TYPE, f"{path}: {what}; send the log sequence number as an integer"
        want = {
            "op": "'c', 'u', 'd' or 'r'",
            "before": "the row image as an object, or null",
            "after": "the row image as an object, or null",
            "source": "Debezium's source block as an object",
            "payload": "the change event as an object",
        }.get(leaf, "the type Debezium documents")
        return Reason.TYPE, f"{path}: {what}; send {want}"
