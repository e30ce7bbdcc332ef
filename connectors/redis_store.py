"""Redis online store: one string per entity holding a log of tile rows, read in one round trip.

Layout: key ``{prefix}:{view}:{version}:{entity}`` is a string of packed float64 rows. The first
row is a guard (tile number -1, outside every window) holding how many events the entity has
seen; after it come tile rows, appended as tiles change, where the last row of a tile number is
its current value. The dataflow rewrites the whole string (live tiles only) when the log grows
past twice the live tiles, which bounds it and drops evicted tiles.

A write carries the entity's event count and is applied only if it is larger than the stored
one, in a Lua script, so replays after a restart never move an entity back (idempotent,
effectively-once). Keys expire after the view's TTL without writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import redis

from engine.errors import ServiceUnavailable, StoreError
from engine.state import TileUpdate

__all__ = ["RedisOnlineStore"]

_WRITE = """
local ttl = tonumber(ARGV[1])
local rowlen = tonumber(ARGV[2])
local pad = string.rep('\\0', rowlen - 16)
local applied = 0
for i = 3, #ARGV, 4 do
  local key, ops, rows, mode = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local head = redis.call('GETRANGE', key, 0, 15)
  local cur = -1
  if #head == 16 then cur = struct.unpack('<d', string.sub(head, 9, 16)) end
  if ops > cur then
    local guard = struct.pack('<dd', -1, ops) .. pad
    if mode == 'r' or #head < 16 then
      redis.call('SET', key, guard .. rows)
    else
      redis.call('SETRANGE', key, 0, guard)
      redis.call('APPEND', key, rows)
    end
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    applied = applied + 1
  end
end
return applied
"""


class RedisOnlineStore:
    """Online tiles in Redis. Delivery: effectively-once per entity (see module docstring)."""

    def __init__(self, url: str, prefix: str = "fs", *, socket_timeout: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout)
        self._write = self.client.register_script(_WRITE)

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis at {self.url} did not answer: {exc}") from exc

    def namespace(self, view: str, version: str) -> str:
        return f"{self.prefix}:{view}:{version}:"

    def write(self, namespace: str, updates: list[TileUpdate], ttl_ms: int, row_bytes: int) -> int:
        """Apply tile updates (in order) in one atomic script; returns how many entity writes applied."""
        args: list[Any] = [ttl_ms, row_bytes]
        for update in updates:
            blob = np.ascontiguousarray(update.rows, dtype="<f8").tobytes()
            starts = (update.starts * row_bytes).tolist()
            ops = update.ops.tolist()
            modes = np.where(update.rewrite, "r", "a").tolist()
            for i, ent in enumerate(update.entities):
                args += [namespace + ent, ops[i], blob[starts[i] : starts[i + 1]], modes[i]]
        if len(args) == 2:
            return 0
        try:
            return int(self._write(args=args))
        except redis.RedisError as exc:
            raise StoreError(f"online write to {self.url} failed: {exc}") from exc

    def read_tiles(self, namespace: str, entities: list[str]) -> list[bytes]:
        """Each entity's packed row log (empty for an unknown or expired entity), in one MGET."""
        if not entities:
            return []
        try:
            return [b or b"" for b in self.client.mget([namespace + e for e in entities])]
        except redis.RedisError as exc:
            raise StoreError(f"online read from {self.url} failed: {exc}") from exc

    def delete_namespace(self, namespace: str) -> int:
        """Drop every key of one view version (retiring it)."""
        n = 0
        for key in self.client.scan_iter(match=namespace + "*", count=1000):
            n += self.client.delete(key)
        return n
