"""API keys of the feature server and the audit of its access decisions.

A key reads ``fsk_<id>_<secret>``: ``id`` is public (it names the key in listings, audit rows and
error messages), ``secret`` is 256 random bits. Only the SHA-256 of the secret is stored, so the
registry never holds a usable key: a key is shown once, when it is created. A fast hash suffices
because the secret is random (nothing to brute-force from a dictionary); comparisons use
:func:`hmac.compare_digest`.

Scopes are names: feature views a key may read (every version of each, ``view@N`` included) and
event sources it may push to; ``"*"`` grants every one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, insert, select, update

from registry.core import Registry, RegistryError, now
from registry.schema import access_audit, api_keys

__all__ = [
    "AccessRecord",
    "ApiKey",
    "access_audit_log",
    "create_key",
    "get_key",
    "list_keys",
    "parse_key",
    "record_access",
    "revoke_key",
    "secret_hash",
]

Action = Literal["read", "produce"]
KEY_PREFIX = "fsk_"
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o, 1/l: ids are read aloud and typed
_ID_LEN = 12
_KEY = re.compile(rf"^{KEY_PREFIX}([{_ID_ALPHABET}]{{{_ID_LEN}}})_([A-Za-z0-9_-]{{43}})$")
_ID = re.compile(rf"^[{_ID_ALPHABET}]{{{_ID_LEN}}}$")
_SCOPE = re.compile(r"^(\*|[A-Za-z0-9_.\-]{1,128})$")


@dataclass(frozen=True)
class ApiKey:
    """A stored key (without its secret): what it may read and push to, and until when."""

    id: str
    name: str
    read: tuple[str, ...]
    produce: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    secret_sha256: str = ""

    def status(self, at: datetime | None = None) -> Literal["active", "expired", "revoked"]:
        at = at or now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= at:
            return "expired"
        return "active"

    def may(self, action: Action, resource: str) -> bool:
        scopes = self.read if action == "read" else self.produce
        return "*" in scopes or resource in scopes

    def matches(self, secret: str) -> bool:
        """Whether ``secret`` is this key's, compared in constant time."""
        return hmac.compare_digest(secret_hash(secret), self.secret_sha256)


@dataclass(frozen=True)
class AccessRecord:
    """Access decisions of the feature server: ``count`` identical ones (same key, action,
    resources, outcome, reason and client) from ``at`` to ``last_at`` (one decision: count 1)."""

    at: datetime
    key_id: str | None
    action: Action
    resources: tuple[str, ...]
    allowed: bool
    # ok | missing_key | malformed_key | unknown_key | wrong_secret | revoked | expired | out_of_scope
    reason: str
    client: str = ""
    count: int = 1
    last_at: datetime | None = None  # None: same as ``at``

    def __post_init__(self) -> None:
        if self.last_at is None:
            object.__setattr__(self, "last_at", self.at)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else None."""
    m = _KEY.match(key.strip())
    return (m[1], m[2]) if m else None


def is_key_id(text: str) -> bool:
    return _ID.match(text) is not None


def create_key(
    registry: Registry,
    name: str,
    *,
    read: Iterable[str] = (),
    produce: Iterable[str] = (),
    expires_at: datetime | None = None,
    expires_in: timedelta | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; returns it and the full key string, which is never shown again."""
    read_scopes, produce_scopes = _scopes("read", read), _scopes("produce", produce)
    if not name.strip():
        raise RegistryError("a key needs a name saying who or what uses it, e.g. 'fraud-scoring'")
    if not read_scopes and not produce_scopes:
        raise RegistryError(
            "a key needs at least one scope: feature views to read (read=['user_spend']) "
            "or sources to push to (produce=['transactions']); '*' means all"
        )
    if expires_at is not None and expires_in is not None:
        raise RegistryError("give expires_at or expires_in, not both")
    created = now()
    if expires_in is not None:
        if expires_in <= timedelta(0):
            raise RegistryError(f"expires_in must be positive, got {expires_in}")
        expires_at = created + expires_in
    if expires_at is not None:
        if expires_at.utcoffset() is None:
            raise RegistryError(
                f"expires_at {expires_at.isoformat()} has no time zone; pass an aware datetime, "
                "e.g. datetime(2030, 1, 1, tzinfo=UTC)"
            )
        if expires_at <= created:
            raise RegistryError(f"expires_at {expires_at.isoformat()} is in the past; pick a later time")
        expires_at = expires_at.astimezone(UTC)
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))
    secret = secrets.token_urlsafe(32)
    row = {
        "id": key_id,
        "name": name.strip(),
        "secret_sha256": secret_hash(secret),
        "read_scopes": list(read_scopes),
        "produce_scopes": list(produce_scopes),
        "created_at": created,
        "expires_at": expires_at,
        "revoked_at": None,
    }
    with registry.engine.begin() as conn:
        conn.execute(insert(api_keys).values(**row))
    return _key(row), f"{KEY_PREFIX}{key_id}_{secret}"


def list_keys(registry: Registry, *, include_revoked: bool = True) -> list[ApiKey]:
    """Every stored key, oldest first (the hashes included, for the server's key ring)."""
    query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
    if not include_revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    with registry.read() as conn:
        return [_key(r._mapping) for r in conn.execute(query)]


def get_key(registry: Registry, key_id: str) -> ApiKey:
    with registry.read() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None:
        raise RegistryError(
            f"no API key {key_id!r} in the registry at {registry.safe_url}; "
            "see `featurestream keys list` for the ids"
        )
    return _key(row._mapping)


def revoke_key(registry: Registry, key_id: str) -> ApiKey:
    """Revoke a key for good; running servers refuse it within their refresh interval."""
    key = get_key(registry, key_id)
    if key.revoked_at is None:
        with registry.engine.begin() as conn:
            conn.execute(
                update(api_keys).where(and_(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))),
                {"revoked_at": now()},
            )
    return get_key(registry, key_id)


def record_access(registry: Registry, records: Sequence[AccessRecord]) -> None:
    """Append access decisions to the audit table, in one transaction."""
    if not records:
        return
    rows = [
        {
            "at": r.at,
            "last_at": r.last_at or r.at,
            "count": r.count,
            "key_id": r.key_id,
            "action": r.action,
            "resources": list(r.resources),
            "resource_list": "," + ",".join(r.resources) + ",",
            "allowed": r.allowed,
            "reason": r.reason,
            "client": r.client[:64],
        }
        for r in records
    ]
    with registry.engine.begin() as conn:
        conn.execute(insert(access_audit), rows)


def access_audit_log(
    registry: Registry,
    *,
    key_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    allowed: bool | None = None,
    resource: str | None = None,
    limit: int = 1000,
) -> list[AccessRecord]:
    """Access decisions, newest first, filtered by key, time range (a row counts if any of its
    decisions falls in it), outcome and view or source."""
    query = select(access_audit).order_by(access_audit.c.at.desc(), access_audit.c.id.desc())
    for value, clause in (
        (key_id, lambda: access_audit.c.key_id == key_id),
        (since, lambda: access_audit.c.last_at >= since),
        (until, lambda: access_audit.c.at < until),
        (allowed, lambda: access_audit.c.allowed.is_(allowed)),
    ):
        if value is not None:
            query = query.where(clause())
    if resource is not None:
        query = query.where(access_audit.c.resource_list.contains(f",{resource},", autoescape=True))
    with registry.read() as conn:
        return [_record(r._mapping) for r in conn.execute(query.limit(limit))]


def _scopes(kind: str, names: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        name = name.strip()
        if not _SCOPE.match(name):
            raise RegistryError(
                f"{kind} scope {name!r} is not a name; give a feature view (read) or source "
                "(produce) name of letters, digits, '_', '.', '-', or '*' for all"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _key(m: Any) -> ApiKey:
    return ApiKey(
        id=m["id"],
        name=m["name"],
        read=tuple(m["read_scopes"] or ()),
        produce=tuple(m["produce_scopes"] or ()),
        created_at=_utc(m["created_at"]),  # type: ignore[arg-type]
        expires_at=_utc(m["expires_at"]),
        revoked_at=_utc(m["revoked_at"]),
        secret_sha256=m["secret_sha256"],
    )


def _record(m: Any) -> AccessRecord:
    return AccessRecord(
        at=_utc(m["at"]),  # type: ignore[arg-type]
        key_id=m["key_id"],
        action=m["action"],
        resources=tuple(m["resources"] or ()),
        allowed=bool(m["allowed"]),
        reason=m["reason"],
        client=m["client"] or "",
        count=int(m["count"]),
        last_at=_utc(m["last_at"]),
    )
