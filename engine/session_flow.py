"""The dataflow step of a view's session windows: shard events -> session state -> Redis.

It runs beside the tile step on the same sharded events, with its own state
(:class:`engine.sessions.SessionState`, driven by the tile step's logic) and its own online keys
(``engine.sessions.session_namespace``), which have their own per-entity position guard. So the
sessions' Redis writes are effectively-once exactly as the tiles' are: a write is skipped only when
every per-partition position in it is at or below the guard's, and each write replaces the
entity's whole session value, so a replay after a restart converges to the state (and a value
whose keys expired is written whole again by the entity's next event). A worker continuing a
finished backfill starts each shard from the backfill's sessions (``engine.handoff``).
"""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
from bytewax.operators import StatefulBatchLogic

from connectors.kafka import partition_count
from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig
from engine.definitions import FeatureView, duration_ms
from engine.handoff import ViewSeed, _SeededTileLogic
from engine.namespace_sink import NamespaceSink
from engine.sessions import SessionState, has_sessions, session_gaps, session_namespace
from engine.shards import ShardEvents
from engine.sinks import TimedUpdate
from engine.tile_logic import OnlineEpochWatch, TileLogic
from engine.tiles import TileLayout

__all__ = ["SessionLogic", "add_sessions"]


def add_sessions(
    keyed: Any, view: FeatureView, runtime: RuntimeConfig, step: str, seed: ViewSeed | None = None
) -> None:
    """Add the session step of ``view`` (if it has session aggregations) on its sharded events;
    a shard without recovery state starts from ``seed``'s sessions (a finished backfill's)."""
    if not has_sessions(view):
        return
    layout = TileLayout.of(view)
    gaps = session_gaps(view)
    lateness = duration_ms(view.allowed_lateness)
    base = RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version)
    namespace = session_namespace(base)

    cap = duration_ms(view.ttl) if view.ttl is not None else None
    partitions: list[int] = []  # asked once, when the first shard starts (Kafka is up by then)

    def builder(resume: SessionState | None) -> SessionLogic:
        if resume is None and not partitions:
            topic = view.source.topic
            partitions.append(
                partition_count(runtime.kafka_bootstrap_servers, topic, config=runtime.kafka_config)
            )
        n = partitions[0] if partitions else 1
        state = resume if resume is not None else SessionState(layout, gaps, lateness, n, cap)
        logic = SessionLogic(state, OnlineEpochWatch(runtime.redis_url, namespace))  # type: ignore[arg-type]
        if resume is None and seed is not None and seed.sessions:
            return _SeededSessionLogic(logic, seed, seed.sessions)
        return logic

    sessions = op.stateful_batch(f"{step}_sessions", keyed, builder)
    # Session keys expire after the view's ttl without writes, and never when it is unset: the
    # last closed session stays readable however long the entity is idle.
    ttl_ms = duration_ms(view.ttl) if view.ttl is not None else 0
    sink = NamespaceSink(runtime.redis_url, view, runtime.shards, namespace, ttl_ms, "redis-sessions")
    op.output(f"{step}_sessions_online", sessions, sink)


class SessionLogic(TileLogic):
    """The tile step's logic (snapshots, resync when the store lost its data) over one shard's
    :class:`~engine.sessions.SessionState`."""

    def on_batch(self, values: list[ShardEvents]) -> tuple[list[TimedUpdate], bool]:
        out = self._resync()
        for ev in values:
            update = self.state.apply(ev.keys, ev.codes, ev.ts, ev.columns, ev.partition, ev.offsets)
            if update.entities:
                out.append(TimedUpdate(update, ev.read_at, ev.produced_at))
        return out, StatefulBatchLogic.RETAIN


class _SeededSessionLogic(_SeededTileLogic, SessionLogic):
    """:class:`SessionLogic` that swaps in the seed's sessions of its shard with its first events."""
