"""Redis online store of table views: one string per entity holding its current feature values.

Layout, per view version (``ns`` = ``{prefix}:{view}:{version}``), as for feature views:
``{ns}:{entity}`` holds the values (msgpack: newest change time, then the values in feature
order), ``{ns}#g:{entity}`` the entity's guard (its position vector), ``{ns}#epoch`` the token
naming this copy of the data.

Delivery: effectively-once per entity, by the same Lua script as the tile store
(:mod:`connectors.redis_store`): a write replaces the value unless every position in it is at or
below the guard's (a replay of what the store holds), whatever the partitioning of the entity's
changes; a forced resync (after the store lost its data) is always applied. After a restart, an
entity's first writes may interleave partitions differently, but each later write carries the
positions of everything applied, so the store converges to the state.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import repeat
from typing import Any

import numpy as np

from connectors.redis_store import RedisOnlineStore
from engine.table_state import TableUpdate, unpack

__all__ = ["RedisTableStore"]


class RedisTableStore(RedisOnlineStore):
    """Current table-view values in Redis. Delivery: effectively-once per entity (see module)."""

    def write_values(self, namespace: str, updates: list[TableUpdate], ttl_ms: int = 0) -> int:
        """Apply updates in order (each entity atomically); returns how many entity writes applied."""

        def entries() -> Iterator[tuple[str, bytes, bytes, str]]:
            for update in updates:
                raw = np.ascontiguousarray(update.positions, dtype="<f8").tobytes()
                w = 8 * update.positions.shape[1]  # one entity's guard: its row of positions
                guards = [raw[i : i + w] for i in range(0, len(raw), w)] if w else [b""] * len(update)
                mode = "f" if update.force else "r"
                yield from zip(update.entities, guards, update.blobs, repeat(mode))

        return self.apply_guarded(namespace, ttl_ms, entries())

    def read_values(self, namespace: str, entities: list[str]) -> list[tuple[int | None, list[Any] | None]]:
        """Each entity's (newest change time ms, values); (None, None) for an unknown entity."""
        return [unpack(b) for b in self.read_tiles(namespace, entities)]
