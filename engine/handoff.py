"""Seeds: where a view version's dataflow starts when it has no recovery state of its own.

A backfill starts each source partition at an offset it chose (its seed) and ends at fixed end
offsets. When it finishes, it leaves a *handoff* next to its recovery directory: the final
snapshot of every source partition (offset, newest event time, topic id, recent dedup ids), of
every tile shard, of every coarse tile level's shard (long windows) and of every session shard
(views with session windows). A worker that then serves the same view version, and has no
recovery state for it, starts from that handoff: each partition continues at the backfill's end
with the same watermark, each shard with the backfill's tiles, coarse tiles and sessions. So
nothing is read twice or skipped, and the online and offline stores (which the backfill wrote)
keep growing from where it stopped.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.delta_store import DeltaOfflineStore
from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig
from engine.definitions import FeatureView
from engine.errors import DefinitionError
from engine.shards import ShardEvents, shard_of
from engine.sinks import TimedUpdate, shard_key
from engine.state import TileState
from engine.tile_logic import TileLogic

__all__ = ["HANDOFF_FILE", "ViewSeed", "final_states", "find_handoff", "seeded", "write_handoff"]

log = logging.getLogger(__name__)

HANDOFF_FILE = "handoff.pkl"


@dataclass
class ViewSeed:
    """Starting state of one view version: ``sources`` (partition -> source snapshot),
    ``tiles`` (shard key -> :class:`TileState`), ``sessions`` (shard key ->
    :class:`engine.sessions.SessionState`), ``levels`` (coarse tile ms -> shard key ->
    :class:`TileState`, engine.levels) and, for a bounded read, ``end_offsets``
    (partition -> first offset not read). ``namespace``/``shards`` say which online namespace
    and shard layout the tiles belong to."""

    sources: dict[str, dict]
    tiles: dict[str, TileState] = field(default_factory=dict)
    end_offsets: dict[int, int] | None = None
    shards: int = 0
    namespace: str = ""
    offline_version: int | None = None  # of the Delta table when the backfill ended (None: no table)
    sessions: dict[str, Any] = field(default_factory=dict)
    levels: dict[int, dict[str, TileState]] = field(default_factory=dict)  # coarse tile ms -> shards

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A handoff written before sessions or coarse levels had none.
        self.__dict__.update({"sessions": {}, "levels": {}, **state})


class _SeededTileLogic(TileLogic):
    """A shard's logic that swaps in the seed's state of its shard (``states``: the seed's tiles
    unless given) with its first events (Bytewax does not tell a logic its key, so the shard is
    found from the first entity)."""

    def __init__(self, base: TileLogic, seed: ViewSeed, states: dict[str, Any] | None = None) -> None:
        super().__init__(base.state, base.watch)
        self.seed: ViewSeed | None = seed
        self.states = seed.tiles if states is None else states

    def on_batch(self, values: list[ShardEvents]) -> tuple[list[TimedUpdate], bool]:
        if self.seed is not None and values and values[0].keys:
            found = self.states.pop(shard_key(shard_of(values[0].keys[0], self.seed.shards)), None)
            if found is not None:
                self.state = found
            self.seed = None
        return super().on_batch(values)


def seeded(logic: TileLogic, seed: ViewSeed) -> TileLogic:
    return _SeededTileLogic(logic, seed)


def final_states(recovery_dir: Path, step_prefix: str) -> dict[tuple[str, str], Any]:
    """The committed state of every (step, key) whose step id starts with ``step_prefix``, read
    from a Bytewax recovery directory (its SQLite partitions) after the dataflow ended."""
    parts = sorted(Path(recovery_dir).glob("part-*.sqlite3"))
    if not parts:
        return {}
    dbs = [sqlite3.connect(f"file:{p}?mode=ro", uri=True) for p in parts]
    try:
        commits = [e for db in dbs for (e,) in db.execute("SELECT commit_epoch FROM commits")]
        if not commits:
            return {}
        epoch = min(commits)
        best: dict[tuple[str, str], tuple[int, bytes | None]] = {}
        for db in dbs:
            rows = db.execute(
                "SELECT step_id, state_key, snap_epoch, ser_change FROM snaps "
                "WHERE snap_epoch <= ? AND substr(step_id, 1, ?) = ?",
                (epoch, len(step_prefix), step_prefix),
            )
            for step, key, snap_epoch, blob in rows:
                if (step, key) not in best or best[(step, key)][0] < snap_epoch:
                    best[(step, key)] = (snap_epoch, blob)
    finally:
        for db in dbs:
            db.close()
    return {k: pickle.loads(blob) for k, (_, blob) in best.items() if blob is not None}


def step_prefix(view: FeatureView, flow_name: str = "featurestream") -> str:
    return f"{flow_name}.{view.name}_{view.version}_"


def write_handoff(directory: Path, view: FeatureView, runtime: RuntimeConfig) -> ViewSeed:
    """Write the handoff of a finished backfill whose recovery state is in ``directory/recovery``."""
    prefix = step_prefix(view)
    states = final_states(directory / "recovery", prefix)
    seed = ViewSeed(
        sources={k: v for (s, k), v in states.items() if s == prefix + "source"},
        tiles={k: v for (s, k), v in states.items() if s == prefix + "tiles"},
        sessions={k: v for (s, k), v in states.items() if s == prefix + "sessions"},
        levels={
            r: {k: v for (s, k), v in states.items() if s == prefix + f"tiles_r{r // 1000}"}
            for r in view.tile_levels_ms[1:]
        },
        shards=runtime.shards,
        namespace=RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version),
    )
    offline = DeltaOfflineStore(runtime.delta_uri, runtime.delta_storage_options)
    seed.offline_version = offline.version(offline.table_uri(view.name, view.version))
    tmp = directory / (HANDOFF_FILE + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(seed, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / HANDOFF_FILE)
    return seed


def find_handoff(runtime: RuntimeConfig, view: FeatureView) -> ViewSeed | None:
    """The newest finished backfill's handoff of this view version, if the runtime has a
    backfill directory and one exists for the same online namespace."""
    if runtime.backfill_dir is None:
        return None
    found = sorted(
        (Path(runtime.backfill_dir) / f"{view.name}__{view.version}").glob(f"*/{HANDOFF_FILE}"),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        return None
    try:
        with open(found[-1], "rb") as f:
            seed: ViewSeed = pickle.load(f)
    except Exception as exc:
        raise DefinitionError(
            f"cannot read the handoff of backfill {found[-1].parent} ({exc}); run that backfill again "
            "with --restart, or delete its directory to compute the version from the topic's start"
        ) from None
    offline = DeltaOfflineStore(runtime.delta_uri, runtime.delta_storage_options)
    uri = offline.table_uri(view.name, view.version)
    if seed.offline_version is not None and offline.version(uri) is None:
        log.warning(
            "backfill %s: its Delta table %s is gone (reset?); computing %s (%s) from the topic's start",
            found[-1].parent,
            uri,
            view.name,
            view.version,
        )
        return None
    namespace = RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version)
    if seed.namespace != namespace:
        log.warning(
            "backfill %s wrote online namespace %s, this worker writes %s: not continuing from it",
            found[-1].parent,
            seed.namespace,
            namespace,
        )
        return None
    if seed.shards != runtime.shards:
        raise DefinitionError(
            f"backfill {found[-1].parent} of {view.name} ({view.version}) kept {seed.shards} shards "
            f"but this worker uses shards={runtime.shards}; run it with shards={seed.shards}"
        )
    log.info("%s (%s) continues from backfill %s", view.name, view.version, found[-1].parent)
    return seed
