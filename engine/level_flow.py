"""The dataflow steps of a view's coarse tile levels (engine.levels): shard events -> one tile
state per coarse level -> Redis under the level's namespace.

Each level runs beside the level-0 tile step on the same sharded events, with the tile step's own
logic (snapshots, resync when the store lost its data, rewrite of expired keys) over a
:class:`engine.state.TileState` of the level's tile size, and its own online keys with their own
per-entity position guard (engine.namespace_sink): so the coarse tiles are effectively-once exactly
as the fine ones. Every event goes to every level, so no compaction step can drop or double count
one; each level evicts what its windows no longer need. A worker continuing a finished backfill
starts each level's shard from the backfill's (``engine.handoff``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import bytewax.operators as op

from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig
from engine.definitions import FeatureView, duration_ms
from engine.handoff import ViewSeed, _SeededTileLogic
from engine.levels import level_namespace, level_retention_ms
from engine.namespace_sink import NamespaceSink
from engine.state import TileState
from engine.tile_logic import OnlineEpochWatch, TileLogic
from engine.tiles import TileLayout

__all__ = ["add_levels", "level_step"]


def level_step(level_ms: int) -> str:
    """The step id suffix of a coarse level's tiles (``tiles_r3600`` for 1-hour tiles)."""
    return f"tiles_r{level_ms // 1000}"


def add_levels(
    keyed: Any, view: FeatureView, runtime: RuntimeConfig, step: str, seed: ViewSeed | None = None
) -> None:
    """Add a tile step per coarse level of ``view`` (none for most views); a shard without
    recovery state starts from ``seed``'s tiles of that level (a finished backfill's)."""
    levels = view.tile_levels_ms
    base = RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version)
    lateness = duration_ms(view.allowed_lateness)
    ttl_ms = duration_ms(view.effective_ttl)
    for i in range(1, len(levels)):
        layout = replace(TileLayout.of(view), tile_ms=levels[i])
        retention = level_retention_ms(levels, i, view.aggregations, lateness)
        namespace = level_namespace(base, levels[i])
        states = seed.levels.get(levels[i], {}) if seed is not None else {}

        def builder(
            resume: TileState | None,
            layout: TileLayout = layout,
            retention: int = retention,
            namespace: str = namespace,
            states: dict[str, TileState] = states,
        ) -> TileLogic:
            state = resume if resume is not None else TileState(layout, retention, ttl_ms)
            logic = TileLogic(state, OnlineEpochWatch(runtime.redis_url, namespace))
            if resume is None and seed is not None and states:
                return _SeededTileLogic(logic, seed, states)
            return logic

        tiles = op.stateful_batch(f"{step}_{level_step(levels[i])}", keyed, builder)
        sink = NamespaceSink(runtime.redis_url, view, runtime.shards, namespace, ttl_ms, "redis-levels")
        op.output(f"{step}_{level_step(levels[i])}_online", tiles, sink)
