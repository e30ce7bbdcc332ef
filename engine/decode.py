"""Decode and validate raw event bytes into columns, routing every failure to a dead letter.

A batch is decoded in one C call (msgspec, typed by the source schema); only when that fails is
it decoded message by message, with the same decoder, to find the bad ones. Both paths accept
exactly the same events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import numpy as np

from engine.definitions import EventSource, FeatureView

__all__ = ["DeadLetter", "DecodedEvents", "EventDecoder", "Reason", "entity_id"]

# Epoch milliseconds accepted as event times: 1970-01-01 .. 2100-01-01.
_MAX_TS_MS = 4_102_444_800_000
_PATH = re.compile(r"at `\$\.([A-Za-z0-9_]+)`")
_MISSING = re.compile(r"missing required field `([A-Za-z0-9_]+)`")


class Reason:
    """Dead-letter reasons, as written to the ``fs-reason`` header."""

    MALFORMED = "malformed_json"
    MISSING = "missing_field"
    TYPE = "invalid_type"
    TIMESTAMP = "bad_timestamp"
    LATE = "late"


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


_PY = {"int": int, "float": float, "str": str, "bool": bool}


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
        ts_type: Any = {"epoch_millis": int, "epoch_seconds": float, "iso8601": datetime}[
            src.timestamp_format
        ]
        spec: list[tuple[Any, ...]] = [(self.ts_field, ts_type)]
        for f in src.fields:
            t = _PY[f.dtype]
            spec.append((f.name, t | None, None) if f.nullable else (f.name, t))
        struct = msgspec.defstruct("Event", spec, kw_only=True)
        self._one = msgspec.json.Decoder(struct)
        self._many = msgspec.json.Decoder(list[struct])

    def decode(self, values: list[bytes]) -> DecodedEvents:
        failures: list[tuple[int, str, str]] = []
        try:
            events = self._many.decode(b"[" + b",".join(values) + b"]")
            # One element per message, or some message held several (or none): decode one by one.
            if len(events) != len(values):
                raise msgspec.DecodeError("message count mismatch")
            index = np.arange(len(values))
        except msgspec.DecodeError:
            events, kept = [], []
            one = self._one.decode
            for i, v in enumerate(values):
                try:
                    events.append(one(v))
                    kept.append(i)
                except msgspec.DecodeError as exc:
                    failures.append((i, *self._classify(exc)))
            index = np.asarray(kept, dtype=np.int64)
        ts, bad = self._timestamps([getattr(e, self.ts_field) for e in events])
        if bad:
            badset = set(bad)
            failures.extend((int(index[j]), Reason.TIMESTAMP, why) for j, why in bad.items())
            keep = [j for j in range(len(events)) if j not in badset]
            events = [events[j] for j in keep]
            index, ts = index[keep], ts[keep]
        if len(self.keys) == 1:
            k = self.keys[0]
            entity = [str(getattr(e, k)) for e in events]
        else:
            entity = [entity_id([getattr(e, k) for k in self.keys]) for e in events]
        cols = [np.array([getattr(e, c) for e in events], dtype=np.float64) for c in self.columns]
        failures.sort()
        return DecodedEvents(index=index, entity=entity, ts=ts, columns=cols, failures=failures)

    def _timestamps(self, raw: list[Any]) -> tuple[np.ndarray, dict[int, str]]:
        bad: dict[int, str] = {}
        if self.ts_format == "epoch_millis":
            ts = np.array(raw, dtype=np.int64) if raw else np.zeros(0, dtype=np.int64)
        elif self.ts_format == "epoch_seconds":
            ts = np.round(np.array(raw, dtype=np.float64) * 1000).astype(np.int64)
        else:
            out = []
            for j, d in enumerate(raw):
                if d.tzinfo is None:
                    bad[j] = f"{self.ts_field}: timestamp {d.isoformat()} has no time zone; add one, e.g. 'Z'"
                    out.append(0)
                else:
                    out.append(round(d.timestamp() * 1000))
            ts = np.array(out, dtype=np.int64)
        wrong = np.flatnonzero((ts < 0) | (ts >= _MAX_TS_MS))
        for j in wrong.tolist():
            if j not in bad:
                bad[j] = (
                    f"{self.ts_field}: {raw[j]!r} is outside 1970..2100 as {self.ts_format}; "
                    f"send {self.ts_format} event times"
                )
        return ts, bad

    def _classify(self, exc: msgspec.DecodeError) -> tuple[str, str]:
        msg = str(exc)
        if not isinstance(exc, msgspec.ValidationError):
            return Reason.MALFORMED, msg
        missing = _MISSING.search(msg)
        if missing:
            name = missing.group(1)
            return Reason.MISSING, f"{name}: required field is missing; include it in every event"
        path = _PATH.search(msg)
        if path is None:
            return Reason.MALFORMED, f"{msg}; each event must be one JSON object"
        name = path.group(1)
        if name == self.ts_field:
            return Reason.TIMESTAMP, f"{name}: {msg.split(' - at')[0]} (expected {self.ts_format})"
        return Reason.TYPE, f"{name}: {msg.split(' - at')[0]}"
