"""API-key authentication, per-view and per-source authorization, and the access audit.

Keys are checked against an in-memory copy of the registry's key table (hashes only), re-read
every ``refresh_seconds``: no database round trip on the request path. A key id the copy does
not know triggers an early re-read (at most one a second), so a new key works at once; a
revocation takes effect within ``refresh_seconds``. Secrets are compared in constant time
(:func:`hmac.compare_digest` in :meth:`registry.keys.ApiKey.matches`).

Every access decision (allowed or denied, with the key id, the views or source, the time and
the client address) is queued and written to the registry's audit table by a background thread,
identical decisions of one flush interval as one counted row. If the audit cannot be written
and its queue is full, requests are refused with 503 rather than served unrecorded. A key or
secret never reaches a log, a metric or an error message; only key ids do (they are not secret).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import anyio.to_thread

from engine.redact import describe
from featurestream.server.errors import ApiError
from featurestream.server.metrics import ServerMetrics
from registry.core import Registry
from registry.keys import AccessRecord, ApiKey, list_keys, parse_key, record_access

__all__ = ["AuditLog", "KeyRing"]

log = logging.getLogger(__name__)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="featurestream"'}
_NO_KEY = (
    "send the key as `Authorization: Bearer fsk_...` (or `X-API-Key: fsk_...`); "
    "an admin creates one with `featurestream keys create NAME --read VIEW`"
)


class AuditLog:
    """Access decisions, written to the registry by a daemon thread every ``flush_seconds``.

    Identical decisions (same key, action, resources, outcome, reason, client) within one
    interval are written as one row with their count and first and last time: every decision is
    counted, and a busy server writes a few rows a second rather than one per request.
    """

    def __init__(
        self, registry: Registry, metrics: ServerMetrics, flush_seconds: float, max_pending: int
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self._pending: dict[tuple, list] = {}  # type: ignore[type-arg]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fs-audit", daemon=True)
        self._failing = False
        metrics.audit_pending.set_function(lambda: len(self._pending))

    def start(self) -> AuditLog:
        self._thread.start()
        return self

    def add(self, record: AccessRecord) -> None:
        key = (record.key_id, record.action, record.resources, record.allowed, record.reason, record.client)
        with self._lock:
            entry = self._pending.get(key)
            if entry is not None:
                entry[1] = record.at
                entry[2] += 1
                return
            if len(self._pending) >= self.max_pending:
                raise ApiError(
                    503,
                    "audit_unavailable",
                    "the access audit cannot be written (registry unreachable), so no access is granted",
                    fix="retry later; the server recovers by itself once the registry answers",
                    headers={"Retry-After": "1"},
                )
            self._pending[key] = [record.at, record.at, 1]

    def flush(self) -> int:
        """Write what is queued; returns how many rows were written."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        rows = [
            AccessRecord(
                at=first,
                key_id=k[0],
                action=k[1],
                resources=k[2],
                allowed=k[3],
                reason=k[4],
                client=k[5],
                count=n,
                last_at=last,
            )
            for k, (first, last, n) in batch.items()
        ]
        try:
            record_access(self.registry, rows)
        except Exception as exc:
            with self._lock:  # keep them, merged with what came meanwhile, for the next round
                for k, (first, last, n) in batch.items():
                    entry = self._pending.setdefault(k, [first, last, 0])
                    entry[0], entry[2] = first, entry[2] + n
            if not self._failing:
                log.error("cannot write the access audit (will retry): %s", describe(exc))
            self._failing = True
            self.metrics.audit_errors.inc()
            return 0
        if self._failing:
            log.info("access audit written again")
        self._failing = False
        return len(rows)

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.flush()


class KeyRing:
    """The registry's keys, in memory; authenticates requests and authorizes them per resource."""

    def __init__(self, registry: Registry, audit: AuditLog, metrics: ServerMetrics) -> None:
        self.registry = registry
        self.audit = audit
        self.metrics = metrics
        self.keys: dict[str, ApiKey] = {}
        self.loaded = False
        self._last_on_demand = 0.0
        self._reload_lock = asyncio.Lock()

    def refresh(self) -> None:
        self.keys = {k.id: k for k in list_keys(self.registry)}
        self.loaded = True

    async def _reload_for(self, key_id: str) -> None:
        async with self._reload_lock:
            if key_id in self.keys:
                return
            wait = 1.0 - (time.monotonic() - self._last_on_demand)
            if wait > 0:  # at most one early re-read a second, whatever ids clients make up
                await asyncio.sleep(wait)
                if key_id in self.keys:
                    return
            self._last_on_demand = time.monotonic()
            try:
                await anyio.to_thread.run_sync(self.refresh)
            except Exception as exc:
                log.warning("cannot re-read API keys from the registry: %s", describe(exc))

    async def authenticate(
        self,
        headers: dict[str, str] | object,
        action: str,
        client: str,
        resources: Callable[[], Iterable[str]],
    ) -> ApiKey:
        """The key the request carries, or a 401 (recorded in the audit) saying what is wrong."""
        get = headers.get  # type: ignore[attr-defined]
        raw = get("authorization")
        if raw is not None:
            scheme, _, raw = raw.partition(" ")
            if scheme.lower() != "bearer":
                self._deny(None, action, resources, client, "malformed_key")
                raise ApiError(
                    401,
                    "unauthorized",
                    f"the Authorization scheme must be Bearer, not {scheme[:16]!r}",
                    field="Authorization",
                    fix=_NO_KEY,
                    headers=_CHALLENGE,
                )
        else:
            raw = get("x-api-key")
        if not raw:
            self._deny(None, action, resources, client, "missing_key")
            raise ApiError(
                401, "unauthorized", "no API key", field="Authorization", fix=_NO_KEY, headers=_CHALLENGE
            )
        parsed = parse_key(raw)
        if parsed is None:
            self._deny(None, action, resources, client, "malformed_key")
            raise ApiError(
                401,
                "unauthorized",
                "the API key is not of the form fsk_<id>_<secret>",
                field="Authorization",
                fix="send the whole key `featurestream keys create` printed",
                headers=_CHALLENGE,
            )
        key_id, secret = parsed
        key = self.keys.get(key_id)
        if key is None:
            await self._reload_for(key_id)
            key = self.keys.get(key_id)
        if key is None or not key.matches(secret):
            self._deny(key_id, action, resources, client, "unknown_key" if key is None else "wrong_secret")
            raise ApiError(
                401,
                "unauthorized",
                f"API key {key_id} is not valid",
                field="Authorization",
                fix="check that the whole key was sent; " + _NO_KEY,
                headers=_CHALLENGE,
            )
        status = key.status(datetime.now(UTC))
        if status != "active":
            self._deny(key_id, action, resources, client, status)
            when = key.revoked_at if status == "revoked" else key.expires_at
            raise ApiError(
                401,
                "unauthorized",
                f"API key {key_id} {'was revoked' if status == 'revoked' else 'expired'} "
                f"on {when:%Y-%m-%d %H:%M:%S} UTC",
                field="Authorization",
                fix="ask an admin for a new key (`featurestream keys create`)",
                headers=_CHALLENGE,
            )
        return key

    def authorize(self, key: ApiKey, action: str, resources: list[str], client: str) -> None:
        """Allow (and record) or refuse with 403 (and record) ``action`` on every one of ``resources``."""
        denied = [r for r in resources if not key.may(action, r)]  # type: ignore[arg-type]
        record = AccessRecord(
            at=datetime.now(UTC),
            key_id=key.id,
            action=action,
            resources=tuple(resources),  # type: ignore[arg-type]
            allowed=not denied,
            reason="out_of_scope" if denied else "ok",
            client=client,
        )
        self.audit.add(record)
        self.metrics.decisions.labels(action, "true" if not denied else "false", record.reason).inc()
        if denied:
            kind = "feature view" if action == "read" else "source"
            scopes = list(key.read if action == "read" else key.produce)
            verb = "read" if action == "read" else "push to"
            raise ApiError(
                403,
                "forbidden",
                f"API key {key.id} may not {verb} {kind} {denied[0]!r}; its {action} scopes are {scopes}",
                field="features" if action == "read" else "source",
                fix=f"use a key with --{action} {denied[0]} (featurestream keys create NAME --{action} "
                f"{denied[0]})",
            )

    def _deny(
        self,
        key_id: str | None,
        action: str,
        resources: Callable[[], Iterable[str]],
        client: str,
        reason: str,
    ) -> None:
        try:
            names = tuple(resources())
        except Exception:  # best effort: the request is refused either way
            names = ()
        self.metrics.decisions.labels(action, "false", reason).inc()
        self.audit.add(
            AccessRecord(
                at=datetime.now(UTC),
                key_id=key_id,
                action=action,
                resources=names,  # type: ignore[arg-type]
                allowed=False,
                reason=reason,
                client=client,
            )
        )
