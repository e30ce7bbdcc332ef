"""Durations in definitions: parsing (``"90s"``, ``"10m"``, ISO 8601), milliseconds and labels."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError

__all__ = ["duration_ms", "format_duration", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_ISO_DURATION = TypeAdapter(timedelta)


def parse_duration(value: Any) -> timedelta:
    """Accept a timedelta, seconds as a number, or a string such as ``"90s"``, ``"10m"``, ``"1d"``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(milliseconds=int(m.group(1)) * _UNITS[m.group(2)])
        if value.startswith(("P", "-P")):  # ISO 8601, as definitions are stored
            try:
                return _ISO_DURATION.validate_python(value)
            except ValidationError:
                pass
    raise ValueError(
        f"cannot read {value!r} as a duration; use a timedelta or a string like '30s', '10m', '1h', '1d'"
    )


def duration_ms(td: timedelta) -> int:
    return round(td.total_seconds() * 1000)


def format_duration(td: timedelta) -> str:
    ms = duration_ms(td)
    for unit in ("w", "d", "h", "m", "s"):
        if ms % _UNITS[unit] == 0:
            return f"{ms // _UNITS[unit]}{unit}"
    return f"{ms}ms"
