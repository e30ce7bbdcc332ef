"""Compile feature views into one Bytewax dataflow, and run it.

Per view::

    Kafka partitions ─► decode + validate + late check ─┬─► dead letters ─► <topic>.dlq
                                                       ├─► accepted rows ─► Delta (micro-batched)
                                                       └─► shard by entity ─► tiles ─► Redis

Entities are spread over a fixed number of shards by a stable hash (CRC-32, never ``hash()``),
so any worker count or process count works with the same state layout.
"""

from __future__ import annotations

import copy
import signal
import threading
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import numpy as np
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from pydantic import BaseModel, ConfigDict, Field

from connectors.delta_store import DeltaOfflineStore
from engine.definitions import FeatureView, duration_ms
from engine.flow_io import DecodingKafkaSource, SourceBatch, request_stop
from engine.sinks import DeadLetterSink, OfflineSink, OnlineSink, TimedUpdate, partition_key, shard_key
from engine.state import TileState
from engine.tiles import TileLayout

__all__ = [
    "RuntimeConfig",
    "build_dataflow",
    "recovery_config",
    "request_stop",
    "run_dataflow",
    "stop_on_signals",
]


class RuntimeConfig(BaseModel):
    """Where a dataflow reads and writes, and how it batches. Built at the edge, passed down."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka_bootstrap_servers: str
    redis_url: str
    delta_uri: str
    delta_storage_options: dict[str, str] = {}
    redis_prefix: str = "fs"
    batch_size: int = 20_000
    poll_timeout_seconds: float = 0.05
    shards: int = Field(default=32, ge=1, le=9999)
    stop_at_end: bool = False
    offline_flush_rows: int = 500_000
    offline_flush_seconds: float = 5.0
    consumer_config: dict[str, Any] = {}


@dataclass
class ShardEvents:
    """The events of one batch that belong to one shard; ``keys[codes[i]]`` is event i's entity."""

    keys: list[str]
    codes: np.ndarray
    ts: np.ndarray
    columns: list[np.ndarray]
    read_at: float = 0.0  # when the batch was read from Kafka (wall clock)


def shard_of(entity: str, shards: int) -> int:
    return zlib.crc32(entity.encode()) % shards


def split_shards(batch: SourceBatch, shards: int) -> list[tuple[str, ShardEvents]]:
    if not batch.entity:
        return []
    enc = pa.array(batch.entity, pa.string()).dictionary_encode()
    uniq = enc.dictionary.to_pylist()
    codes = enc.indices.to_numpy()
    shard = np.fromiter((zlib.crc32(k.encode()) % shards for k in uniq), np.int64, len(uniq))[codes]
    order = np.argsort(shard, kind="stable")
    sorted_shards = shard[order]
    cuts = np.flatnonzero(np.concatenate(([True], sorted_shards[1:] != sorted_shards[:-1])))
    bounds = np.concatenate((cuts, [len(order)]))
    out = []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        idx = order[a:b]
        used, local = np.unique(codes[idx], return_inverse=True)
        out.append(
            (
                shard_key(int(sorted_shards[a])),
                ShardEvents(
                    keys=[uniq[u] for u in used.tolist()],
                    codes=local,
                    ts=batch.ts[idx],
                    columns=[c[idx] for c in batch.columns],
                    read_at=batch.read_at,
                ),
            )
        )
    return out


class TileLogic(StatefulBatchLogic[ShardEvents, TimedUpdate, TileState]):
    """Keeps one shard's tiles; emits the tiles each batch changed, with the batch's read time."""

    def __init__(self, state: TileState) -> None:
        self.state = state

    def on_batch(self, values: list[ShardEvents]) -> tuple[list[TimedUpdate], bool]:
        out = []
        for ev in values:
            update = self.state.apply(ev.keys, ev.codes, ev.ts, ev.columns)
            if update.entities:
                out.append(TimedUpdate(update, ev.read_at))
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> TileState:
        return copy.deepcopy(self.state)


def build_dataflow(views: list[FeatureView], runtime: RuntimeConfig, name: str = "featurestream") -> Dataflow:
    """One dataflow computing every view; each view reads its own source partitions."""
    if not views:
        raise ValueError("build_dataflow needs at least one FeatureView")
    flow = Dataflow(name)
    offline = DeltaOfflineStore(runtime.delta_uri, runtime.delta_storage_options)
    for view in views:
        layout = TileLayout.of(view)
        retention = duration_ms(view.max_lookback) + duration_ms(view.allowed_lateness) + layout.tile_ms
        v = f"{view.name}_{view.version}"
        batches = op.input(
            f"{v}_source",
            flow,
            DecodingKafkaSource(
                view,
                runtime.kafka_bootstrap_servers,
                batch_size=runtime.batch_size,
                poll_timeout=runtime.poll_timeout_seconds,
                stop_at_end=runtime.stop_at_end,
                consumer_config=runtime.consumer_config,
            ),
        )
        dead = op.flat_map(f"{v}_dead", batches, lambda b: b.dead)
        op.output(
            f"{v}_dlq",
            dead,
            DeadLetterSink(runtime.kafka_bootstrap_servers, view.source.dlq_topic, view.name, view.version),
        )
        cols = view.columns
        rows = op.filter_map(
            f"{v}_rows",
            batches,
            lambda b, cols=cols: (partition_key(b.partition), b.rows(cols)) if b.entity else None,
        )
        op.output(
            f"{v}_offline",
            rows,
            OfflineSink(
                offline,
                view,
                runtime.kafka_bootstrap_servers,
                runtime.offline_flush_rows,
                runtime.offline_flush_seconds,
            ),
        )
        shards = runtime.shards
        keyed = op.flat_map(f"{v}_shard", batches, lambda b, n=shards: split_shards(b, n))

        def builder(
            resume: TileState | None, layout: TileLayout = layout, retention: int = retention
        ) -> TileLogic:
            return TileLogic(resume if resume is not None else TileState(layout, retention))

        tiles = op.stateful_batch(f"{v}_tiles", keyed, builder)
        op.output(
            f"{v}_online",
            tiles,
            OnlineSink(runtime.redis_url, runtime.redis_prefix, view, runtime.shards),
        )
    return flow


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM end the dataflow cleanly: sources stop, sinks flush, run returns."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: request_stop())


def recovery_config(directory: str | Path, partitions: int = 1) -> Any:
    """Bytewax recovery in ``directory``, creating its partitions on first use."""
    from bytewax.recovery import RecoveryConfig, init_db_dir

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if not any(path.glob("part-*.sqlite3")):
        init_db_dir(path, partitions)
    return RecoveryConfig(path, backup_interval=timedelta(0))


def run_dataflow(
    flow: Dataflow,
    workers: int = 1,
    *,
    recovery_dir: str | Path | None = None,
    snapshot_seconds: float = 10.0,
) -> None:
    """Run in this process with ``workers`` threads; returns when every source has ended.

    With ``recovery_dir``, state and positions are snapshotted every ``snapshot_seconds`` and a
    restart resumes from the last snapshot (the store sinks drain before a snapshot counts).
    """
    from bytewax._bytewax import cli_main

    stop_on_signals()
    recovery = None if recovery_dir is None else recovery_config(recovery_dir)
    cli_main(
        flow,
        workers_per_process=workers,
        epoch_interval=timedelta(seconds=snapshot_seconds),
        recovery_config=recovery,
    )
