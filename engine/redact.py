"""Secrets out of text: passwords in URLs and secret-named settings, before anything is shown.

Health answers, log lines and error messages may carry a service URL
(``redis://user:pass@host``, ``rediss://``, ``postgresql://...``, ``s3://key:secret@...``) or a
settings mapping (``sasl.password``, ``ssl.key.password``, delta-rs credentials). Whatever leaves
the process goes through these functions first, so a secret never reaches a log, a metric, an
HTTP answer or an error message.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MASK",
    "causes",
    "describe",
    "is_secret_key",
    "redact",
    "redact_config",
    "redact_text",
    "redact_url",
]

MASK = "***"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours, e.g. in delta-rs error messages

# scheme://user:password@host. The password runs to the last "@" before the host, as in
# urllib.parse: a netloc never holds "/", "?", "#" or whitespace.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*:)[^\s/?#]*(?=@)")
# redis://password@host: Redis reads a lone user part as the password.
_BARE = re.compile(r"(?P<head>\b(?:rediss?|valkeys?)://)[^\s/?#:@]+(?=@)", re.IGNORECASE)
_KEY_END = re.compile(r"(?:^|[._\-]|api)key$")  # account_key, sas-key, apikey; not "monkey"
_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "credential", "private")
# password=..., ?password=...&, sasl.password: ..., "ssl.key.password": "...", account_key=...
_WORDS = "|".join(_SECRET_WORDS)
_PAIR = re.compile(
    rf"(?P<head>(?P<key>[A-Za-z0-9_.\-]*(?:{_WORDS})[A-Za-z0-9_.\-]*|[A-Za-z0-9_.\-]*key)['\"]?\s*[=:]\s*['\"]?)"
    r"(?P<value>[^\s'\"&,;})]+)",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """True for setting names whose value is a secret: ``sasl.password``, ``ssl.key.password``,
    ``aws_secret_access_key``, ``azure_storage_account_key``, ``sas_token``, ``client_secret``."""
    low = key.lower()
    return any(word in low for word in _SECRET_WORDS) or _KEY_END.search(low) is not None


def redact_url(text: str) -> str:
    """``text`` (a URL, or text holding URLs) with every password in a URL replaced by ``***``."""
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _BARE.sub(lambda m: m["head"] + MASK, text)


def redact_text(text: str, config: Mapping[str, Any] | None = None) -> str:
    """``text`` without URL passwords, ``secret_name=value`` values, nor the values of
    ``config``'s secret-named settings wherever they appear."""
    for key, value in (config or {}).items():
        if is_secret_key(str(key)) and value not in (None, "") and len(str(value)) >= 3:
            text = text.replace(str(value), MASK)
    text = redact_url(text)
    return _PAIR.sub(lambda m: m["head"] + MASK if is_secret_key(m["key"]) else m[0], text)


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with secret-named settings masked and URLs in the others redacted."""
    return {
        k: MASK if is_secret_key(str(k)) and v not in (None, "") else redact(v) for k, v in config.items()
    }


def redact(value: Any) -> Any:
    """Redacted form of a string, a mapping, a list or tuple of them; other values' ``str``."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_config(value)
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(str(value))


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (explicitly or while handling), outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not seen for seen in out):
        out.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return out


def describe(exc: BaseException, *, trace: bool = False, chain: bool = False) -> str:
    """``Type: message`` of an exception, redacted. With ``chain``, its root cause first, then the
    exceptions it was raised as (``A: root; raised as B: wrapper``); with ``trace``, the whole
    traceback."""
    if trace:
        text = "".join(traceback.format_exception(exc)).rstrip()
    else:
        parts = reversed(causes(exc)) if chain else [exc]
        text = "; raised as ".join(f"{type(e).__name__}: {e}" for e in parts)
    return redact_text(_ANSI.sub("", text))
