"""Events as the JSON bytes a producer publishes, with the reason when one cannot be written.

A value JSON cannot hold (a Python object, a naive datetime, nesting deeper than the decoder
allows) raises :class:`InvalidEvent` naming the field, the dead-letter reason the stream would
give and the fix. NaN and infinities are written as the tokens other encoders write, so the
stream's decoder rejects them as it would from any producer.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from engine.decode import Reason
from engine.definitions import EventSource
from engine.errors import FeaturestreamError

__all__ = ["MESSAGE", "EventEncoder", "InvalidEvent"]

MESSAGE = "(message)"  # the subject of a detail when no single field is to blame
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_WANT = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
_TS_WANT = {
    "epoch_millis": "integer milliseconds since 1970-01-01T00:00:00Z or a datetime with a time zone",
    "epoch_seconds": "seconds since 1970-01-01T00:00:00Z or a datetime with a time zone",
    "iso8601": "an ISO 8601 string with a time zone or a datetime with a time zone",
}


class InvalidEvent(FeaturestreamError, ValueError):
    """An event that does not fit its source's schema; it was not sent.

    ``field`` is the field to blame (``"(message)"`` when no single one is), ``reason`` the
    dead-letter reason the stream would give it (``missing_field``, ``invalid_type``, ...) and
    ``detail`` what is wrong and the fix.
    """

    def __init__(self, source: str, field: str, reason: str, detail: str) -> None:
        super().__init__(f"invalid event for source {source!r} ({reason}): {detail}")
        self.source = source
        self.field = field
        self.reason = reason
        self.detail = detail


def _numpy_scalar(obj: Any) -> Any:
    """msgspec hook: numpy scalars (``np.float64``, ``np.int64``, ``np.bool_``) as Python values."""
    item = getattr(obj, "item", None)
    if item is not None and type(obj).__module__ == "numpy":
        return item()
    raise TypeError(f"a {type(obj).__module__}.{type(obj).__qualname__} has no JSON form")


_encode = msgspec.json.Encoder(enc_hook=_numpy_scalar).encode


_SCALARS = frozenset({str, int, bool, type(None)})


def _has_non_finite(obj: Any) -> bool:
    """Whether a NaN or infinity is anywhere in ``obj`` (msgspec would write it as null)."""
    if type(obj) is dict:  # the usual flat event: one pass over its values
        for v in obj.values():
            t = type(v)
            if t is float:
                if not math.isfinite(v):
                    return True
            elif t not in _SCALARS and _has_non_finite_deep(v):
                return True
        return False
    return _has_non_finite_deep(obj)


def _has_non_finite_deep(obj: Any) -> bool:
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            if not math.isfinite(v):
                return True
        elif isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset):
            stack.extend(v)
        elif type(v).__module__ == "numpy" and hasattr(v, "item"):
            stack.append(v.item())
    return False


class EventEncoder:
    """Writes events of ``source`` as JSON; a ``datetime`` timestamp becomes the source's format."""

    def __init__(self, source: EventSource) -> None:
        self.source = source
        self._ts = source.timestamp_field
        self._fields = {f.name: f for f in source.fields}

    def encode(self, event: Mapping[str, Any]) -> bytes:
        """The JSON bytes of ``event`` (not yet validated against the schema); raises
        :class:`InvalidEvent` for a value that cannot be written as JSON."""
        if isinstance(event, Mapping) and isinstance(event.get(self._ts), datetime):
            event = {**event, self._ts: self._timestamp(event[self._ts])}
        try:
            if not _has_non_finite(event):
                return _encode(event)
            # NaN and infinities (msgspec writes them as null): written as the tokens other
            # encoders write, so the decoder rejects them as it would from any producer.
        except UnicodeEncodeError:
            pass  # a lone surrogate: written as an escape, which the decoder names
        except (TypeError, RecursionError) as exc:
            raise self._unencodable(event, exc) from None
        try:
            return json.dumps(msgspec.to_builtins(event, enc_hook=_numpy_scalar), allow_nan=True).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise self._unencodable(event, exc) from None

    def _timestamp(self, when: datetime) -> Any:
        """A datetime as the source's timestamp_format."""
        fmt = self.source.timestamp_format
        if when.tzinfo is None or when.utcoffset() is None:
            raise InvalidEvent(
                self.source.name,
                self._ts,
                Reason.TIMESTAMP,
                f"{self._ts}: datetime {when.isoformat()} has no time zone; use an aware datetime, "
                "e.g. datetime.now(UTC)",
            )
        if fmt == "iso8601":
            return when
        if fmt == "epoch_seconds":
            return (when - _EPOCH) / timedelta(seconds=1)
        return round((when - _EPOCH) / _MS)

    def _unencodable(self, event: Any, exc: Exception) -> InvalidEvent:
        """Why ``event`` cannot be written as JSON, naming the first top-level field to blame."""
        name, kind = MESSAGE, type(event).__name__
        if isinstance(event, Mapping):
            for k, v in event.items():
                try:
                    _encode({k: v})
                except (TypeError, RecursionError):
                    name, kind = str(k), type(v).__name__
                    break
                except Exception:  # another field's problem: keep looking
                    continue
        if isinstance(exc, RecursionError):
            return InvalidEvent(
                self.source.name,
                name,
                Reason.TOO_DEEP,
                f"{name}: nested deeper than JSON encoding and the stream's decoder allow (about "
                f"{sys.getrecursionlimit()} levels); flatten the value or leave the field out",
            )
        f = self._fields.get(name)
        if name == self._ts:
            reason, want = Reason.TIMESTAMP, _TS_WANT[self.source.timestamp_format]
        elif f is not None:
            reason, want = Reason.TYPE, _WANT[f.dtype] + (" or null" if f.nullable else "")
        elif name == MESSAGE:
            reason, want = Reason.MALFORMED, f"a dict of field values ({_describe(exc)})"
        else:
            reason, want = Reason.TYPE, "a JSON value (str, int, float, bool, None, list or dict)"
        return InvalidEvent(
            self.source.name, name, reason, f"{name}: a Python {kind} cannot be written as JSON; send {want}"
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
