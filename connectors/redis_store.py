"""Redis online store: one string per entity holding a log of tile rows, read in one round trip.

Layout, per view version (``ns`` = ``{prefix}:{view}:{version}``):

- ``{ns}:{entity}``: packed float64 tile rows, appended as tiles change; the last row of a tile
  number is its current value. The dataflow rewrites the whole string (live tiles only) when the
  log grows past twice the live tiles, which bounds it and drops evicted tiles.
- ``{ns}#g:{entity}``: the entity's guard, its position vector (packed float64, the highest
  applied offset per source partition, -1 for none).
- ``{ns}#o:{entity}``: for views with object aggregations (``first``, ``last_n``,
  ``count_distinct``, ``percentile``, ``top_k``...), the entity's log of object-tile records
  (engine.object_tiles), appended and rewritten together with its tile rows, in the same
  guarded script call, so the same guarantee covers it.
- ``{ns}/r{seconds}:{entity}`` (with its own ``#g``, ``#o``, ``#lost`` and ``#epoch`` keys):
  the coarse tiles of views with long windows (engine.levels), the same layout per level.
- ``{ns}#lost``: entities whose keys expired (their TTL ran out while the worker was down or
  behind) when an append reached them: the script refuses such an append, since the tiles it
  does not carry would be missing, and adds the entity here; the dataflow then rewrites it
  from its state (``engine.dataflow.OnlineEpochWatch``).
- ``{ns}#epoch``: a random token naming this copy of the store's data. If Redis loses its data
  (restarted without persistence, flushed), the token is gone; the dataflow notices, makes a new
  one and rewrites every entity from its state, so the store converges again.

Delivery: effectively-once per entity. A write is applied, in a Lua script, unless every position
in it is at or below the guard's (then it replays what the store already holds), whatever the
partitioning of the entity's events; a forced resync is always applied; an append to an entity
whose keys expired is refused and the entity rewritten (``{ns}#lost`` above). After a restart
the first write of an entity may interleave partitions differently, but every tile is rewritten
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
local lost = string.sub(guards, 1, #guards - 3) .. '#lost'
local applied = 0
for i = 4, #ARGV, 4 do
  local entity, pos, rows, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key, guard = tiles .. entity, guards .. entity
  local old = redis.call('GET', guard)
  if mode == 'a' and (not old or redis.call('EXISTS', key) == 0) then
    redis.call('SADD', lost, entity)
  elseif mode == 'f' or newer(pos, old) then
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

# The same script with a fifth argument per entity: its object-tile records, written like its rows.
_WRITE_OBJECTS = (
    _WRITE.replace(
        "local tiles, guards = ARGV[2], ARGV[3]", "local tiles, guards, objs = ARGV[2], ARGV[3], ARGV[4]"
    )
    .replace("for i = 4, #ARGV, 4 do", "for i = 5, #ARGV, 5 do")
    .replace(
        "local entity, pos, rows, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]",
        "local entity, pos, rows, mode, recs = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]",
    )
    .replace(
        "    redis.call('SET', guard, pos)\n",
        "    if mode == 'a' then\n"
        "      if #recs > 0 then redis.call('APPEND', objs .. entity, recs) end\n"
        "    else\n"
        "      redis.call('SET', objs .. entity, recs)\n"
        "    end\n"
        "    if ttl > 0 then redis.call('PEXPIRE', objs .. entity, ttl) end\n"
        "    redis.call('SET', guard, pos)\n",
    )
)

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
        self._write_objects = self.client.register_script(_WRITE_OBJECTS)

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

    @staticmethod
    def objects_namespace(namespace: str) -> str:
        return namespace[:-1] + "#o:"

    def write(self, namespace: str, updates: list[TileUpdate], ttl_ms: int, row_bytes: int) -> int:
        """Apply tile updates in order (each entity atomically); returns how many entity writes applied."""

        if any(u.objects is not None for u in updates):
            return self._write_with_objects(namespace, updates, ttl_ms, row_bytes)

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

    def _write_with_objects(
        self, namespace: str, updates: list[TileUpdate], ttl_ms: int, row_bytes: int
    ) -> int:
        """:meth:`write` for views with object aggregations: rows and records in one script call."""
        head: list[Any] = [ttl_ms, namespace, self.guard_namespace(namespace)]
        head.append(self.objects_namespace(namespace))
        applied = 0
        args: list[Any] = []
        try:
            for update in updates:
                blob = np.ascontiguousarray(update.rows, dtype="<f8").tobytes()
                starts = (update.starts * row_bytes).tolist()
                pos = np.ascontiguousarray(update.positions, dtype="<f8")
                width = pos.shape[1] * 8
                pos_blob = pos.tobytes()
                modes = ["f"] * len(update) if update.force else np.where(update.rewrite, "r", "a").tolist()
                objects = update.objects or [b""] * len(update)
                for i, ent in enumerate(update.entities):
                    args += (
                        ent,
                        pos_blob[i * width : (i + 1) * width],
                        blob[starts[i] : starts[i + 1]],
                        modes[i],
                        objects[i],
                    )
                    if len(args) >= _CHUNK_ARGS:
                        applied += int(self._write_objects(args=head + args))
                        args = []
            if args:
                applied += int(self._write_objects(args=head + args))
        except redis.RedisError as exc:
            raise StoreError(f"online write to {redact_url(self.url)} failed: {exc}") from exc
        return applied

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

    @staticmethod
    def lost_key(namespace: str) -> str:
        return namespace[:-1] + "#lost"

    def lost_entities(self, namespace: str) -> set[str]:
        """The entities whose appends were refused because their keys had expired."""
        try:
            return {e.decode() for e in self.client.smembers(self.lost_key(namespace))}
        except redis.RedisError as exc:
            raise StoreError(f"online read from {redact_url(self.url)} failed: {exc}") from exc

    def forget_lost(self, namespace: str, entities: list[str]) -> None:
        """Take entities off the lost set once their rewrite is on its way (an append refused
        later adds them again)."""
        if entities:
            try:
                self.client.srem(self.lost_key(namespace), *entities)
            except redis.RedisError as exc:
                raise StoreError(f"online write to {redact_url(self.url)} failed: {exc}") from exc

    def read_tiles(self, namespace: str, entities: list[str]) -> list[bytes]:
        """Each entity's packed row log (empty for an unknown or expired entity), in one MGET."""
        return self.read_spaces([namespace], entities)[0]

    def read_objects(self, namespace: str, entities: list[str]) -> list[tuple[bytes, bytes]]:
        """Each entity's (row log, object-tile records), both in one MGET (one consistent view:
        the script writes both keys of an entity atomically)."""
        tiles, objs = self.read_spaces([namespace, self.objects_namespace(namespace)], entities)
        return list(zip(tiles, objs, strict=True))

    def read_spaces(self, namespaces: list[str], entities: list[str]) -> list[list[bytes]]:
        """The value of every entity under each namespace (empty for a missing key), in one MGET:
        one consistent read of an entity's tiles, object records, sessions and coarse levels."""
        if not entities:
            return [[] for _ in namespaces]
        try:
            got = [b or b"" for b in self.client.mget([s + e for s in namespaces for e in entities])]
        except redis.RedisError as exc:
            hint = ""
            if isinstance(exc, redis.ConnectionError):
                hint = (
                    "; is Redis running there? `featurestream services up` starts the embedded one "
                    "(featurestream.connect() then finds it), `featurestream doctor` checks the settings"
                )
            raise StoreError(f"online read from {redact_url(self.url)} failed: {exc}{hint}") from exc
        n = len(entities)
        return [got[i * n : (i + 1) * n] for i in range(len(namespaces))]

    def delete_namespace(self, namespace: str) -> int:
        """Drop every key of one view version (retiring it), its sub-namespaces' too (session
        values and coarse tile levels: ``{ns}/...``)."""
        n = 0
        guards, objs = self.guard_namespace(namespace), self.objects_namespace(namespace)
        for pattern in (namespace + "*", guards + "*", objs + "*", namespace[:-1] + "/*"):
            for key in self.client.scan_iter(match=pattern, count=1000):
                n += self.client.delete(key)
        n += self.client.delete(namespace[:-1] + "#epoch", self.lost_key(namespace))
        return n
