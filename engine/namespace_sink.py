"""The sink of a view's online values kept beside its tiles under their own namespace: session
values (engine.session_flow) and coarse tile levels (engine.level_flow).

Each namespace has its own per-entity position guard, so these writes are effectively-once exactly
as the tiles' are (connectors.redis_store): a write is skipped only when every per-partition
position in it is at or below the guard's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from connectors.redis_store import RedisOnlineStore
from engine.definitions import FeatureView
from engine.sinks import TimedUpdate, _instrument, _SharedWriters, _store_writer, shard_key
from engine.snapshots import snapshots_wanted
from engine.state import TileUpdate
from engine.tiles import TileLayout
from engine.writer import BackgroundWriter

__all__ = ["NamespaceSink"]


class _NamespacePartition(StatefulSinkPartition[TimedUpdate, None]):
    def __init__(self, writer: BackgroundWriter[Any], release: Callable[[], None]) -> None:
        self.writer = writer
        self.release = release

    def write_batch(self, items: list[TimedUpdate]) -> None:
        self.writer.submit(items)

    def snapshot(self) -> None:
        if snapshots_wanted():  # the epoch's snapshot counts only once its writes are stored
            self.writer.drain()
        else:
            self.writer.check()

    def close(self) -> None:
        self.writer.finish()
        self.release()


class NamespaceSink(FixedPartitionedSink[TimedUpdate, None]):
    """Tile updates to Redis under ``namespace``, keyed by entity shard, in order per shard.

    Delivery: effectively-once per entity (see the module docstring). Keys expire after
    ``ttl_ms`` without writes (0: never). ``label`` names the store in metrics and health.
    """

    def __init__(
        self, url: str, view: FeatureView, shards: int, namespace: str, ttl_ms: int, label: str
    ) -> None:
        self.url = url
        self.view = view
        self.shards = shards
        self.namespace = namespace
        self.ttl_ms = ttl_ms
        self.label = label

    def list_parts(self) -> list[str]:
        return [shard_key(i) for i in range(self.shards)]

    def part_fn(self, item_key: str) -> int:
        return int(item_key[1:])

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _NamespacePartition:
        view, namespace, ttl_ms = self.view, self.namespace, self.ttl_ms
        key = (self.label, self.url, namespace)
        row_bytes = TileLayout.of(view).row_bytes

        def make() -> BackgroundWriter[Any]:
            store = RedisOnlineStore(self.url)

            def write(items: list[TimedUpdate | TileUpdate]) -> None:
                updates = [i.update if isinstance(i, TimedUpdate) else i for i in items]
                store.write(namespace, updates, ttl_ms, row_bytes)

            return _store_writer("redis", view, _instrument(self.label, view, write), depth=4)

        writer = _SharedWriters.acquire(key, make)
        return _NamespacePartition(writer, lambda: _SharedWriters.release(key))
