"""Decode and validate raw event bytes into columns, routing every failure to a dead letter.

Each message is decoded by msgspec, typed by the source schema (in C, about half a microsecond
an event), so a bad message is found exactly and never affects its neighbours. Nothing a message
holds can stop the decoder: a message that fails for any reason is a failure of its own, with the
field to blame (found only for failures) and the fix; a batch that fails in an unforeseen way
while building columns is decoded again one message at a time.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import numpy as np

from engine.decode_errors import MESSAGE as _MESSAGE
from engine.decode_errors import (
    deepest_field,
    describe_error,
    field_at,
    invalid_utf8_field,
    non_finite_at,
    other_encoding,
    show,
    subject,
)
from engine.definitions import EventSource, FeatureView

__all__ = ["DeadLetter", "DecodedEvents", "EventDecoder", "Reason", "entity_id"]

# Epoch milliseconds accepted as event times: 1970-01-01 .. 2100-01-01.
_MAX_TS_MS = 4_102_444_800_000
# Epoch seconds of 2000..2100 read as milliseconds fall in January/February 1970: a unit mistake.
SECONDS_AS_MILLIS = (946_684_800, 4_102_444_800)
_PATH = re.compile(r"at `\$\.([A-Za-z0-9_]+)`")
_MISSING = re.compile(r"missing required field `([A-Za-z0-9_]+)`")
_BYTE = re.compile(r"\(byte (\d+)\)")
# A \\u escape of half a surrogate pair without its other half (msgspec may report only that the
# input ended, when it is the last string).
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_MAX_DETAIL = 500
# Integers are aggregated as float64 but must fit int64, the type every store and reader knows.
_INT64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_PY: dict[str, Any] = {"int": _INT64, "float": float, "str": str, "bool": bool}
_TS_WANT = {
    "epoch_millis": "epoch_millis: integer milliseconds since 1970-01-01T00:00:00Z",
    "epoch_seconds": "epoch_seconds: seconds since 1970-01-01T00:00:00Z",
    "iso8601": "iso8601: a string with a time zone, e.g. 2024-03-10T23:00:00Z",
}
_WANT = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


class Reason:
    """Dead-letter reasons, as written to the ``fs-reason`` header."""

    MALFORMED = "malformed_json"  # not one JSON object
    ENCODING = "invalid_encoding"  # not UTF-8: other encodings, invalid bytes, lone surrogates
    TOO_DEEP = "too_deep"  # nested deeper than the decoder's recursion limit
    MISSING = "missing_field"
    TYPE = "invalid_type"
    VALUE = "invalid_value"  # the right type out of range: 1e400, NaN, an int beyond int64
    TIMESTAMP = "bad_timestamp"
    LATE = "late"
    UNDECODABLE = "undecodable"  # any other failure: the catch-all, never expected


@dataclass(frozen=True)
class DeadLetter:
    """An event the pipeline could not use, with everything needed to inspect or replay it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str
    detail: str


@dataclass
class DecodedEvents:
    """Valid events of one batch as columns; ``index`` points back into the raw batch."""

    index: np.ndarray
    entity: list[str]
    ts: np.ndarray
    columns: list[np.ndarray]
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    text: dict[str, list[str | None]] = field(default_factory=dict)


def entity_id(values: list[Any]) -> str:
    """One string per entity. Composite keys join their parts with ``|``, escaping ``\\`` and
    ``|`` inside parts, so distinct key tuples never collide."""
    if len(values) == 1:
        return str(values[0])
    return "|".join(str(v).replace("\\", "\\\\").replace("|", "\\|") for v in values)


class EventDecoder:
    """Turns JSON event bytes into the entity key, event time and aggregated columns of a view."""

    def __init__(self, view: FeatureView) -> None:
        src: EventSource = view.source
        self.ts_field = src.timestamp_field
        self.ts_format = src.timestamp_format
        self.keys = view.entity.join_keys
        self.columns = view.columns
        self.fields = {f.name: f for f in src.fields}
        ts_type: Any = {"epoch_millis": int, "epoch_seconds": float, "iso8601": datetime}[
            src.timestamp_format
        ]
        spec: list[tuple[Any, ...]] = [(self.ts_field, ts_type)]
        for f in src.fields:
            t = _PY[f.dtype]
            spec.append((f.name, t | None, None) if f.nullable else (f.name, t))
        struct = msgspec.defstruct("Event", spec, kw_only=True)
        self._one = msgspec.json.Decoder(struct)
        self.text_columns = view.text_columns
        self._changes: Any = None
        if src.format == "debezium-json":  # Debezium change events as events (engine.cdc_decode)
            from engine.cdc_decode import CdcDecoder

            self._changes = CdcDecoder(src)
            self._ops = frozenset(src.ops)

    def decode(self, values: list[bytes]) -> DecodedEvents:
        """Never raises: every message is either an event or a failure."""
        try:
            return self._decode(values)
        except Exception as exc:  # unforeseen: find the message to blame, spare the others
            if len(values) != 1:
                return self._stitch([self.decode([v]) for v in values])
            why = f"{_MESSAGE}: could not be decoded ({describe_error(exc)}); send one UTF-8 JSON object"
            return self._stitch([], [(0, Reason.UNDECODABLE, why[:_MAX_DETAIL])])

    def _decode(self, values: list[bytes]) -> DecodedEvents:
        if self._changes is not None:
            return self._decode_changes(values)
        # One decode per message (faster than joining them, and no message can bleed into
        # another). Failures of any kind stay with their message.
        failures: list[tuple[int, str, str]] = []
        events, kept = [], []
        one, append = self._one.decode, events.append
        for i, v in enumerate(values):
            try:
                append(one(v))
                kept.append(i)
            except Exception as exc:  # DecodeError, RecursionError, UnicodeDecodeError, ...
                failures.append((i, *self._explain(exc, v)))
        index = np.asarray(kept, dtype=np.int64)
        ts, bad = self._timestamps([getattr(e, self.ts_field) for e in events])
        if bad:
            failures.extend((int(index[j]), Reason.TIMESTAMP, why) for j, why in bad.items())
            keep = [j for j in range(len(events)) if j not in bad]
            events = [events[j] for j in keep]
            index, ts = index[keep], ts[keep]
        empty = {j: k for j, e in enumerate(events) for k in self.keys if getattr(e, k) == ""}
        if empty:  # an empty key would pool unrelated events under one entity
            failures.extend(
                (int(index[j]), Reason.VALUE, f"{k}: the entity key is empty; send a non-empty {k}")
                for j, k in empty.items()
            )
            keep = [j for j in range(len(events)) if j not in empty]
            events = [events[j] for j in keep]
            index, ts = index[keep], ts[keep]
        if len(self.keys) == 1:
            k = self.keys[0]
            entity = [str(getattr(e, k)) for e in events]
        else:
            entity = [entity_id([getattr(e, k) for k in self.keys]) for e in events]
        cols, text = [], {}
        for c in self.columns:
            raw = [getattr(e, c) for e in events]
            if c in self.text_columns:
                # Only counted: a present value is 0.0, a null is NaN; the strings go offline as is.
                text[c] = raw
                cols.append(np.array([np.nan if v is None else 0.0 for v in raw], dtype=np.float64))
            else:
                cols.append(np.array(raw, dtype=np.float64))
        failures.sort()
        return DecodedEvents(index=index, entity=entity, ts=ts, columns=cols, failures=failures, text=text)

    def _decode_changes(self, values: list[bytes]) -> DecodedEvents:
        """Debezium changes whose op is selected, as events: fields from the row image (``before``
        for a delete), ``op`` as a field, event time from ``source.ts_ms``."""
        ch = self._changes.decode([None] * len(values), values, np.zeros(len(values), np.int64))
        failures = list(ch.failures)
        names = self._changes.names
        required = [n for n in names if not self.fields[n].nullable]
        kept, entity, ts, rows = [], [], [], []
        for j, op in enumerate(ch.op):
            if op not in self._ops:
                continue
            where = "before" if op == "d" else "after"
            image = ch.before[j] if op == "d" else ch.after[j]
            row = {"op": op} if image is None else {**dict(zip(names, image, strict=True)), "op": op}
            gone = next((n for n in required if row.get(n) is None), None)
            if image is None or gone is not None:
                fix = "set REPLICA IDENTITY FULL on the table" if op == "d" else "send it in every row image"
                subject = where if image is None else f"{where}.{gone}"
                failures.append((int(ch.index[j]), Reason.MISSING, f"{subject}: is missing or null; {fix}"))
                continue
            kept.append(int(ch.index[j]))
            ts.append(int(ch.ts[j]))
            entity.append(entity_id([row[k] for k in self.keys]))
            rows.append(row)
        cols, text = [], {}
        for c in self.columns:
            raw = [r[c] for r in rows]
            if c in self.text_columns:
                text[c] = raw
                cols.append(np.array([np.nan if v is None else 0.0 for v in raw], dtype=np.float64))
            else:
                cols.append(np.array([np.nan if v is None else v for v in raw], dtype=np.float64))
        return DecodedEvents(
            index=np.asarray(kept, dtype=np.int64),
            entity=entity,
            ts=np.asarray(ts, dtype=np.int64),
            columns=cols,
            failures=sorted(failures),
            text=text,
        )

    def _stitch(
        self, parts: list[DecodedEvents], failures: list[tuple[int, str, str]] | None = None
    ) -> DecodedEvents:
        """Results of one message each (``parts[i]`` for message ``i``) as one batch's."""
        fails = list(failures or [])
        index: list[int] = []
        for i, p in enumerate(parts):
            fails.extend((i, r, m) for _, r, m in p.failures)
            index.extend([i] * len(p.index))
        return DecodedEvents(
            index=np.asarray(index, dtype=np.int64),
            entity=[e for p in parts for e in p.entity],
            ts=np.concatenate([np.zeros(0, np.int64), *(p.ts for p in parts)]),
            columns=[
                np.concatenate([np.zeros(0, np.float64), *(p.columns[j] for p in parts)])
                for j in range(len(self.columns))
            ],
            failures=sorted(fails),
            text={c: [v for p in parts for v in p.text.get(c, [])] for c in self.text_columns},
        )

    def _timestamps(self, raw: list[Any]) -> tuple[np.ndarray, dict[int, str]]:
        """Event times in ms, and why each unusable one is unusable (by position)."""
        bad: dict[int, str] = {}
        if self.ts_format == "epoch_millis":
            try:
                ts = np.array(raw, dtype=np.int64) if raw else np.zeros(0, dtype=np.int64)
            except OverflowError:  # an integer beyond int64: reject just those
                big = {j for j, v in enumerate(raw) if not -(2**63) <= v < 2**63}
                ts = np.array([0 if j in big else v for j, v in enumerate(raw)], dtype=np.int64)
                bad.update({j: self._out_of_range(raw[j]) for j in big})
        elif self.ts_format == "epoch_seconds":
            with np.errstate(over="ignore", invalid="ignore"):
                ms = np.array(raw, dtype=np.float64) * 1000
            ok = np.isfinite(ms) & (ms >= 0) & (ms < _MAX_TS_MS)
            ts = np.round(np.where(ok, ms, 0.0)).astype(np.int64)
            bad.update({j: self._out_of_range(raw[j]) for j in np.flatnonzero(~ok).tolist()})
        else:
            out = []
            for j, d in enumerate(raw):
                if d.tzinfo is None:
                    bad[j] = f"{self.ts_field}: timestamp {d.isoformat()} has no time zone; add one, e.g. 'Z'"
                    out.append(0)
                    continue
                try:
                    out.append(round(d.timestamp() * 1000))
                except (OverflowError, ValueError):
                    bad[j] = self._out_of_range(d)
                    out.append(0)
            ts = np.array(out, dtype=np.int64)
        for j in np.flatnonzero((ts < 0) | (ts >= _MAX_TS_MS)).tolist():
            bad.setdefault(j, self._out_of_range(raw[j]))
        if self.ts_format == "epoch_millis" and len(ts):
            low, high = SECONDS_AS_MILLIS
            for j in np.flatnonzero((ts >= low) & (ts < high)).tolist():
                when = datetime.fromtimestamp(int(ts[j]), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                bad.setdefault(
                    j,
                    f"{self.ts_field}: {ts[j]} looks like epoch seconds ({when}), but the source's "
                    "timestamp_format is epoch_millis; send milliseconds (seconds x 1000) or set "
                    'timestamp_format="epoch_seconds"',
                )
        return ts, bad

    def _out_of_range(self, value: Any) -> str:
        hint = ""
        if (
            self.ts_format == "epoch_seconds"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            if SECONDS_AS_MILLIS[0] * 1000 <= value < _MAX_TS_MS:
                hint = (
                    " (it looks like epoch milliseconds: divide by 1000 or set "
                    'timestamp_format="epoch_millis")'
                )
        return (
            f"{self.ts_field}: {show(value)} is outside 1970..2100 as {self.ts_format}{hint}; "
            f"send {_TS_WANT[self.ts_format]}"
        )

    # -- why a message failed (only failures pay for this) -----------------------------------

    def _explain(self, exc: Exception, raw: Any) -> tuple[str, str]:
        """The reason and detail of one failed message; never raises."""
        try:
            if isinstance(exc, msgspec.ValidationError):
                reason, detail = self._invalid(str(exc))
            elif isinstance(exc, msgspec.DecodeError):
                reason, detail = self._malformed(str(exc), raw)
            elif isinstance(exc, RecursionError):
                name = deepest_field(raw, sys.getrecursionlimit())
                reason, detail = (
                    Reason.TOO_DEEP,
                    (
                        f"{subject(name)}: nested deeper than the decoder allows (about "
                        f"{sys.getrecursionlimit()} levels); flatten the value or leave the field out"
                    ),
                )
            elif isinstance(exc, UnicodeDecodeError):
                name = invalid_utf8_field(raw, self.fields)
                reason, detail = (
                    Reason.ENCODING,
                    (f"{subject(name)}: not valid UTF-8 ({exc.reason}); send text as UTF-8"),
                )
            else:
                reason, detail = (
                    Reason.UNDECODABLE,
                    (f"{_MESSAGE}: could not be decoded ({describe_error(exc)}); send one UTF-8 JSON object"),
                )
        except Exception as inner:  # explaining must not fail either
            reason, detail = Reason.UNDECODABLE, f"{_MESSAGE}: could not be decoded ({describe_error(inner)})"
        return reason, detail[:_MAX_DETAIL]

    def _invalid(self, msg: str) -> tuple[str, str]:
        """A ValidationError: valid JSON, not a valid event."""
        missing = _MISSING.search(msg)
        if missing:
            name = missing.group(1)
            return Reason.MISSING, f"{name}: required field is missing; include it in every event"
        path = _PATH.search(msg)
        if path is None:
            return Reason.MALFORMED, f"{_MESSAGE}: {msg}; each event must be one JSON object"
        name, what = path.group(1), msg.split(" - at")[0]
        if name == self.ts_field:
            return Reason.TIMESTAMP, f"{name}: {what}; send {_TS_WANT[self.ts_format]}"
        f = self.fields[name]
        null = " or null" if f.nullable else ""
        if "out of range" in what or what.startswith(("Expected `int` >=", "Expected `int` <=")):
            want = "a finite number within ±1.7e308" if f.dtype == "float" else "an integer within ±2^63"
            return Reason.VALUE, f"{name}: {what}; send {want}{null}"
        return Reason.TYPE, f"{name}: {what}; send {_WANT[f.dtype]}{null}"

    def _malformed(self, msg: str, raw: Any) -> tuple[str, str]:
        """A DecodeError: not JSON (in UTF-8) at all, or not at one place."""
        other = other_encoding(raw)
        if other is not None:
            return Reason.ENCODING, f"{_MESSAGE}: the message is {other}; send UTF-8 JSON"
        if not bytes(raw).strip():
            return Reason.MALFORMED, f"{_MESSAGE}: the message is empty; send one JSON object per message"
        if "Invalid UTF-8" in msg:  # msgspec >= 0.20 says so in a DecodeError, not a UnicodeDecodeError
            try:
                bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                who = subject(invalid_utf8_field(raw, self.fields))
                return Reason.ENCODING, f"{who}: not valid UTF-8 ({exc.reason}); send text as UTF-8"
        at = _BYTE.search(msg)
        pos = int(at.group(1)) if at else None
        # msgspec may only say that the input ended when the last string holds a lone surrogate.
        lone = _LONE_SURROGATE.search(raw) if pos is None or "surrogate" in msg else None
        if lone is not None and pos is None:
            pos = lone.start()
        name = None if pos is None else field_at(raw, pos)
        if lone is not None or "surrogate" in msg:
            escape = "" if lone is None else f" {lone.group().decode()}"
            return Reason.ENCODING, (
                f"{subject(name)}: lone UTF-16 surrogate escape{escape}; escape characters beyond "
                f"U+FFFF as a surrogate pair (\\ud83d\\ude00) or send them as UTF-8"
            )
        token = None if pos is None else non_finite_at(raw, pos)
        if token is not None and pos:  # inside an object (a non-object fails validation first)
            if name == self.ts_field:
                return (
                    Reason.TIMESTAMP,
                    f"{name}: {token} is not a JSON number; send {_TS_WANT[self.ts_format]}",
                )
            return Reason.VALUE, (
                f"{subject(name)}: {token} is not a JSON number and non-finite values are not "
                f"accepted; send a finite number (or null where the field is nullable)"
            )
        return Reason.MALFORMED, f"{subject(name)}: {msg}; send one UTF-8 JSON object per message"
