"""Redis online store: tiles per entity in one hash, written atomically, read in one pipelined round trip.

Layout: key ``{prefix}:{view}:{version}:{entity}`` is a hash whose fields are tile numbers
(8 raw bytes) and whose values are packed tile rows; field ``_v`` holds how many events the
entity has seen, packed as a row with tile number -1 (outside every window). A write carries that count and is applied only if it is larger than the stored
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
local applied = 0
local i = 3
while i <= #ARGV do
  local key, ops, tiles, dels = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  local guard = redis.call('HGET', key, '_v')
  local cur = -1
  if guard then cur = struct.unpack('<d', string.sub(guard, 9, 16)) end
  if ops >= 0 and ops > cur then
    local args = {}
    for p = 1, #tiles, rowlen do
      args[#args + 1] = string.sub(tiles, p, p + 7)
      args[#args + 1] = string.sub(tiles, p, p + rowlen - 1)
      if #args >= 2000 then
        redis.call('HSET', key, unpack(args))
        args = {}
      end
    end
    args[#args + 1] = '_v'
    args[#args + 1] = struct.pack('<dd', -1, ops) .. string.rep('\0', rowlen - 16)
    redis.call('HSET', key, unpack(args))
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    applied = applied + 1
  end
  -- Evicted tiles lie outside every window: deleting them is always safe.
  local d = {}
  for p = 1, #dels, 8 do
    d[#d + 1] = string.sub(dels, p, p + 7)
    if #d >= 2000 then
      redis.call('HDEL', key, unpack(d))
      d = {}
    end
  end
  if #d > 0 then redis.call('HDEL', key, unpack(d)) end
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
        """Apply tile changes (in order) in one atomic script; returns how many entity writes applied."""
        args: list[Any] = [ttl_ms, row_bytes]
        for update in updates:
            blob = np.ascontiguousarray(update.rows, dtype="<f8").tobytes()
            starts = (update.starts * row_bytes).tolist()
            deleted = update.deleted
            for i, ent in enumerate(update.entities):
                dels = deleted.get(ent)
                args += [
                    namespace + ent,
                    int(update.ops[i]),
                    blob[starts[i] : starts[i + 1]],
                    np.asarray(dels, dtype="<f8").tobytes() if dels else b"",
                ]
            if deleted:
                # Entities whose tiles were only evicted (unchanged this batch) still get their deletes.
                written = set(update.entities)
                for ent, dels in deleted.items():
                    if ent not in written:
                        args += [namespace + ent, -1, b"", np.asarray(dels, dtype="<f8").tobytes()]
        if len(args) == 2:
            return 0
        try:
            return int(self._write(args=args))
        except redis.RedisError as exc:
            raise StoreError(f"online write to {self.url} failed: {exc}") from exc

    def read_tiles(self, namespace: str, entities: list[str], row_bytes: int) -> list[bytes]:
        """Packed tile rows of each entity (empty bytes for an unknown or expired entity).

        One pipelined round trip of HVALS. The ``_v`` guard is a row with tile number -1, which no
        window covers, so readers need not filter it out.
        """
        if not entities:
            return []
        pipe = self.client.pipeline(transaction=False)
        for e in entities:
            pipe.hvals(namespace + e)
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"online read from {self.url} failed: {exc}") from exc
        return [b"".join(vals) for vals in replies]

    def delete_namespace(self, namespace: str) -> int:
        """Drop every key of one view version (retiring it)."""
        n = 0
        for key in self.client.scan_iter(match=namespace + "*", count=1000):
            n += self.client.delete(key)
        return n
