"""Locating the problem in a message that failed to decode: the field to blame, the encoding,
a short form of the value. Best effort and bounded (a crafted message stays cheap to explain);
used only for failures, so the decoder's fast path never pays for it."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

__all__ = [
    "MESSAGE",
    "deepest_field",
    "describe_error",
    "field_at",
    "invalid_utf8_field",
    "non_finite_at",
    "other_encoding",
    "show",
    "subject",
    "walk",
]

MESSAGE = "(message)"  # a detail's subject when no single field is to blame
_NON_FINITE = re.compile(rb"-?(?:nan|inf(?:inity)?)(?![A-Za-z0-9_])", re.IGNORECASE)
# JSON strings and structural characters: enough to tell which top-level field a byte is in.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]', re.DOTALL)
_MAX_TOKENS = 100_000
# (byte-order mark or first bytes, codec, name): messages that are JSON, but not in UTF-8.
_BOMS = (
    (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32"),
    (b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32"),
    (b"\xef\xbb\xbf", "utf-8-sig", "UTF-8 with a byte-order mark"),
    (b"\xfe\xff", "utf-16-be", "UTF-16"),
    (b"\xff\xfe", "utf-16-le", "UTF-16"),
)


def walk(raw: bytes) -> Iterator[tuple[int, int, bytes | None, bytes]]:
    """(start, depth, top-level field, token) for each JSON string and structural character; the
    field is the one whose value the token is in (None outside of any). Stops after
    :data:`_MAX_TOKENS`, so that explaining a crafted message stays cheap."""
    depth, last = 0, b""
    key: bytes | None = None
    for m in itertools.islice(_TOKEN.finditer(raw), _MAX_TOKENS):
        tok = m.group()
        c = tok[:1]
        if c == b'"':
            last = tok
        elif c in b"{[":
            depth += 1
            if depth == 1:
                key = None
        elif c in b"}]":
            depth -= 1
            if depth <= 0:
                key = None
        elif depth == 1:
            key = last if c == b":" else None
        yield m.start(), depth, key, tok


def token_name(token: bytes | None) -> str | None:
    if not token:
        return None
    try:
        return str(json.loads(token))
    except ValueError:
        return token[1:-1].decode("utf-8", "replace")


def field_at(raw: bytes, pos: int) -> str | None:
    """The top-level field whose value holds byte ``pos``."""
    key, walked = None, 0
    for start, _, k, _ in walk(raw):
        if start > pos:
            return token_name(key)
        key, walked = k, walked + 1
    return None if walked >= _MAX_TOKENS else token_name(key)  # pos may lie beyond the tokens walked


def deepest_field(raw: bytes, limit: int) -> str | None:
    """The first top-level field nested deeper than ``limit``, else the most nested one."""
    best, key, walked = 0, None, 0
    for _, depth, k, _ in walk(raw):
        walked += 1
        if depth > best:
            best, key = depth, k
            if depth > limit:
                return token_name(key)
    return None if walked >= _MAX_TOKENS else token_name(key)  # a deeper one may lie beyond


def invalid_utf8_field(raw: bytes, fields: dict[str, Any]) -> str | None:
    """The first schema field whose string value is not UTF-8 (unknown fields are skipped
    undecoded, so they never fail)."""
    for _, depth, key, tok in walk(raw):
        if depth == 1 and key is not None and tok[:1] == b'"':
            name = token_name(key)
            if name in fields:
                try:
                    tok.decode("utf-8")
                except UnicodeDecodeError:
                    return name
    return None


def non_finite_at(raw: bytes, pos: int) -> str | None:
    """``NaN``, ``Infinity`` and the like where JSON parsing stopped (at ``pos`` or just after a
    minus sign)."""
    for at in (pos - 1, pos):
        m = _NON_FINITE.match(raw, max(at, 0))
        if m:
            return m.group().decode()
    return None


def other_encoding(raw: bytes) -> str | None:
    """The encoding of a message that is JSON in UTF-16/32 or UTF-8 with a byte-order mark."""
    head = bytes(raw[:64])
    found = next(((codec, name) for bom, codec, name in _BOMS if head.startswith(bom)), None)
    if found is None and len(head) >= 4:
        nul = tuple(b == 0 for b in head[:4])
        found = {
            (True, True, True, False): ("utf-32-be", "UTF-32"),
            (False, True, True, True): ("utf-32-le", "UTF-32"),
            (True, False, True, False): ("utf-16-be", "UTF-16"),
            (False, True, False, True): ("utf-16-le", "UTF-16"),
        }.get(nul)
    if found is None:
        return None
    codec, name = found
    unit = 4 if "32" in codec else 2
    text = head[: len(head) - len(head) % unit].decode(codec, "ignore").lstrip("\ufeff \t\r\n")
    return name if text[:1] in ("{", "[") else None


def subject(name: str | None) -> str:
    if name is None:
        return MESSAGE
    return name[:64] if name.isprintable() else repr(name[:64])


def show(value: Any) -> str:
    """A value for a detail: short, whatever its size."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, int) and not -(10**30) < value < 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value)[:80]


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
