"""Redis online store: one string per entity holding a log of tile rows, read in one round trip.

Layout, per view version (``ns`` = ``{prefix}:{view}:{version}``):

- ``{ns}:{entity}``: packed float64 tile rows, appended as tiles change; the last row of a tile
  number is its current value. The dataflow rewrites the whole string (live tiles only) when the
  log grows past twice the live tiles, which bounds it and drops evicted tiles.
- ``{ns}#g:{entity}``: the entity's guard, its position vector (packed float64, the highest
  applied offset per source partition, -1 for none).
- ``{ns}#epoch``: a random token naming this copy of the store's data. If Redis loses its data
  (restarted without persistence, flushed), the token is gone; the dataflow notices, makes a new
  one and rewrites every entity from its state, so the store converges again.

Delivery: effectively-once per entity. A write is applied, in a Lua script, unless every position
in it is at or below the guard's (then it replays what the store already holds), whatever the
partitioning of the entity's events; a forced resync is always applied. After a restart the
first write of an entity may interleave partitions differently, but every tile is rewritten
once its events are applied again, so the store converges to the state. Keys expire after the
view's TTL without writes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import redis

from engine.errors import ServiceUnavailable, StoreError
from engine.redact import redact_url
from engine.state import TileUpdate

__all__ = ["RedisOnlineStore"]

_WRITE = """
local ttl = tonumber(ARGV[1])
local tiles, guards = ARGV[2], ARGV[3]
local function newer(new, old)
  if not old then return true end
  local n_old = #old / 8
  for j = 1, #new / 8 do
    local p = struct.unpack('<d', new, (j - 1) * 8 + 1)
    if p >= 0 then
      local o = -1
      if j <= n_old then o = struct.unpack('<d', old, (j - 1) * 8 + 1) end
      if p > o then return true end
    end
  end
  return false
end
local applied = 0
for i = 4, #ARGV, 4 do
  local entity, pos, rows, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key, guard = tiles .. entity, guards .. entity
  if mode == 'f' or newer(pos, redis.call('GET', guard)) then
    if mode == 'a' then
      redis.call('APPEND', key, rows)
    else
      redis.call('SET', key, rows)
    end
    redis.call('SET', guard, pos)
    if ttl > 0 then
      redis.call('PEXPIRE', key, ttl)
      redis.call('PEXPIRE', guard, ttl)
    end
    applied = applied + 1
  end
end
return applied
"""

_CHUNK_ARGS = 4 * 2048  # entities per script call: bounds the time Redis is blocked by one call


class RedisOnlineStore:
    """Online tiles in Redis. Delivery: effectively-once per entity (see module docstring)."""

    def __init__(
        self,
        url: str,
        prefix: str = "fs",
        *,
        socket_timeout: float = 5.0,
        connect_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout
        )
        self._write = self.client.register_script(_WRITE)

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis at {redact_url(self.url)} did not answer: {exc}") from exc

    def namespace(self, view: str, version: str) -> str:
        return self.namespace_of(self.prefix, view, version)

    @staticmethod
    def namespace_of(prefix: str, view: str, version: str) -> str:
        """Key prefix of a view version's tile strings."""
        return f"{prefix}:{view}:{version}:"

    @staticmethod
    def guard_namespace(namespace: str) -> str:
        return namespace[:-1] + "#g:"

    def write(self, namespace: str, updates: list[TileUpdate], ttl_ms: int, row_bytes: int) -> int:
        """Apply tile updates in order (each entity atomically); returns how many entity writes applied."""

        def entries() -> Iterator[tuple[str, bytes, bytes, str]]:
            for update in updates:
                blob = np.ascontiguousarray(update.rows, dtype="<f8").tobytes()
                starts = (update.starts * row_bytes).tolist()
                pos = np.ascontiguousarray(update.positions, dtype="<f8")
                width = pos.shape[1] * 8
                pos_blob = pos.tobytes()
                modes = ["f"] * len(update) if update.force else np.where(update.rewrite, "r", "a").tolist()
                for i, ent in enumerate(update.entities):
                    yield (
                        ent,
                        pos_blob[i * width : (i + 1) * width],
                        blob[starts[i] : starts[i + 1]],
                        modes[i],
                    )

        return self.apply_guarded(namespace, ttl_ms, entries())

    def apply_guarded(
        self, namespace: str, ttl_ms: int, entries: Iterable[tuple[str, bytes, bytes, str]]
    ) -> int:
        """Run the guarded write script over ``(entity, positions, bytes, mode)`` entries, in order
        and in chunks (mode ``a`` appends, ``r`` replaces, ``f`` replaces whatever the guard says);
        returns how many entity writes applied."""
        head: list[Any] = [ttl_ms, namespace, self.guard_namespace(namespace)]
        args: list[Any] = []
        applied = 0
        try:
            for entry in entries:
                args += entry
                if len(args) >= _CHUNK_ARGS:
                    applied += int(self._write(args=head + args))
                    args = []
            if args:
                applied += int(self._write(args=head + args))
        except redis.RedisError as exc:
            raise StoreError(f"online write to {redact_url(self.url)} failed: {exc}") from exc
        return applied

    def epoch(self, namespace: str) -> str:
        """The token naming this copy of the namespace's data; made anew if Redis lost it."""
        key = namespace[:-1] + "#epoch"
        try:
            self.client.set(key, secrets.token_hex(8), nx=True)
            token = self.client.get(key)
        except redis.RedisError as exc:
            raise StoreError(f"online epoch check at {redact_url(self.url)} failed: {exc}") from exc
        return token.decode() if token else ""

    def read_tiles(self, namespace: str, entities: list[str]) -> list[bytes]:
        """Each entity's packed row log (empty for an unknown or expired entity), in one MGET."""
        if not entities:
            return []
        try:
            return [b or b"" for b in self.client.mget([namespace + e for e in entities])]
        except redis.RedisError as exc:
            hint = ""
            if isinstance(exc, redis.ConnectionError):
                hint = (
                    "; is Redis running there? `featurestream services up` starts the embedded one "
                    "(featurestream.connect() then finds it), `featurestream doctor` checks the settings"
                )
            raise StoreError(f"online read from {redact_url(self.url)} failed: {exc}{hint}") from exc

    def delete_namespace(self, namespace: str) -> int:
        """Drop every key of one view version (retiring it)."""
        n = 0
        for pattern in (namespace + "*", self.guard_namespace(namespace) + "*"):
            for key in self.client.scan_iter(match=pattern, count=1000):
                n += self.client.delete(key)
        n += self.client.delete(namespace[:-1] + "#epoch")
        return n
