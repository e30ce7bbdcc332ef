"""Compile feature views into one Bytewax dataflow, and run it.

Per view::

    Kafka partitions ─► decode + validate + late check ─┬─► dead letters ─► <topic>.dlq
                                                       ├─► accepted rows ─► Delta (micro-batched)
                                                       └─► shard by entity ─► tiles ─► Redis

Entities are spread over a fixed number of shards by a stable hash (CRC-32, never ``hash()``),
so any worker count or process count works with the same state layout.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from pydantic import BaseModel, ConfigDict, Field

from connectors.delta_store import DeltaOfflineStore
from connectors.redis_store import RedisOnlineStore
from engine.dead_letter_sink import DeadLetterSink
from engine.definitions import FeatureView, duration_ms
from engine.flow_io import STOP, DecodingKafkaSource, request_stop
from engine.levels import level_retention_ms
from engine.object_tiles import object_text_columns
from engine.observe import configure_logging
from engine.redact import describe
from engine.shards import ShardEvents, shard_of, split_shards  # noqa: F401 (re-exported)
from engine.sinks import OfflineSink, OnlineSink, partition_key
from engine.snapshots import snapshots_needed
from engine.state import TileState
from engine.table_definitions import TableView
from engine.table_flow import add_table_view
from engine.tile_logic import OnlineEpochWatch, TileLogic
from engine.tiles import TileLayout
from engine.writer import new_run

log = logging.getLogger(__name__)

__all__ = [
    "RuntimeConfig",
    "build_dataflow",
    "recovery_config",
    "request_stop",
    "run_dataflow",
    "snapshots_needed",
    "stop_on_signals",
    "tune_gc",
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
    poll_timeout_seconds: float = 0.005  # an idle partition's wait before its next (non-blocking) read
    shards: int = Field(default=32, ge=1, le=9999)
    stop_at_end: bool = False
    offline_flush_rows: int = 500_000
    offline_flush_seconds: float = 5.0
    consumer_config: dict[str, Any] = {}
    kafka_config: dict[str, Any] = {}  # librdkafka settings for every client (SASL/SSL...)
    backfill_dir: str | None = None  # finished backfills hand their state over from here (engine.handoff)


def tune_gc() -> None:
    """Collect young objects every 100k allocations instead of every 700.

    The hot path allocates many short-lived objects per micro-batch (decoded events, changes),
    almost none of them in cycles, so the default thresholds spend a large share of the time in
    collections that find nothing (a quarter of a CDC run's CPU). State that lives long is frozen
    out of the collector's view after a collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def dead_letters(batches: Any, step: str, view: Any, runtime: RuntimeConfig) -> None:
    """Route the dead letters of a source's batches (``batch.dead``) to the view's DLQ topic."""
    dead = op.flat_map(f"{step}_dead", batches, lambda b: b.dead)
    op.output(
        f"{step}_dlq",
        dead,
        DeadLetterSink(
            runtime.kafka_bootstrap_servers,
            view.source.dlq_topic,
            view.name,
            view.version,
            runtime.kafka_config,
        ),
    )


def build_dataflow(
    views: list[FeatureView | TableView],
    runtime: RuntimeConfig,
    name: str = "featurestream",
    seeds: dict[str, Any] | None = None,
) -> Dataflow:
    """One dataflow computing every view; each view reads its own source partitions.

    A view version without recovery state starts from its seed (:class:`engine.handoff.ViewSeed`,
    by version): ``seeds`` when given (a backfill), else a finished backfill's in
    ``runtime.backfill_dir``.
    """
    from engine.handoff import find_handoff, seeded

    if not views:
        raise ValueError("build_dataflow needs at least one FeatureView")
    flow = Dataflow(name)
    offline = DeltaOfflineStore(runtime.delta_uri, runtime.delta_storage_options)
    for view in views:
        if isinstance(view, TableView):  # CDC: current-row aggregates, see engine.table_flow
            add_table_view(flow, view, runtime, offline)
            continue
        layout = TileLayout.of(view)
        lateness = duration_ms(view.allowed_lateness)
        retention = level_retention_ms(view.tile_levels_ms, 0, view.aggregations, lateness)
        v = f"{view.name}_{view.version}"
        seed = seeds.get(view.version) if seeds is not None else find_handoff(runtime, view)
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
                kafka_config=runtime.kafka_config,
                seed=seed.sources if seed else None,
                end_offsets=seed.end_offsets if seed else None,
            ),
        )
        dead_letters(batches, v, view, runtime)
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
                runtime.kafka_config,
            ),
        )
        shards = runtime.shards
        tc = object_text_columns(view)
        keyed = op.flat_map(f"{v}_shard", batches, lambda b, n=shards, tc=tc: split_shards(b, n, tc))

        namespace = RedisOnlineStore.namespace_of(runtime.redis_prefix, view.name, view.version)

        def builder(
            resume: TileState | None,
            layout: TileLayout = layout,
            retention: int = retention,
            namespace: str = namespace,
            seed: Any = seed,
            ttl_ms: int = duration_ms(view.effective_ttl),
        ) -> TileLogic:
            state = resume if resume is not None else TileState(layout, retention, ttl_ms)
            logic = TileLogic(state, OnlineEpochWatch(runtime.redis_url, namespace))
            return seeded(logic, seed) if resume is None and seed and seed.tiles else logic

        tiles = op.stateful_batch(f"{v}_tiles", keyed, builder)
        op.output(
            f"{v}_online",
            tiles,
            OnlineSink(
                runtime.redis_url,
                runtime.redis_prefix,
                view,
                runtime.shards,
                tiles=offline,
                tile_flush=(runtime.offline_flush_rows, runtime.offline_flush_seconds),
            ),
        )
        from engine.level_flow import add_levels  # imports this module
        from engine.session_flow import add_sessions  # imports this module

        add_levels(keyed, view, runtime, v, seed)  # long windows: coarse tiles, their own keys
        add_sessions(keyed, view, runtime, v, seed)  # session windows: their own state and keys
    return flow


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM end the dataflow cleanly: sources stop, sinks flush, run returns.

    A store that is down then gets a grace period (:data:`engine.writer.STOP_GRACE_SECONDS`)
    before the worker exits without it. A second signal exits at once; either way nothing is
    lost, since positions never advance past unwritten data.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if STOP.is_set():
            log.error("%s again: exiting now; unwritten data will be replayed on restart", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s: stop requested; sources stop, buffered data is written, then the worker exits", name)
        request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


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
    process_id: int | None = None,
    addresses: list[str] | None = None,
    handle_signals: bool = True,
) -> None:
    """Run in this process with ``workers`` threads; returns when every source has ended.

    With ``recovery_dir``, state and positions are snapshotted every ``snapshot_seconds`` and a
    restart resumes from the last snapshot (the store sinks drain before a snapshot counts).
    With ``addresses`` (``host:port`` of every process of a cluster), this is process
    ``process_id`` of it; every process runs the same flow and they share the recovery partitions.
    ``handle_signals=False`` keeps the caller's SIGINT/SIGTERM handlers (they must call
    :func:`request_stop`).

    The cause of the exit is logged either way (redacted): a stop request, the sources' end, or
    the error that ended the run (which is then re-raised).
    """
    from bytewax._bytewax import cli_main

    configure_logging()
    if handle_signals:
        stop_on_signals()
    new_run()
    OnlineEpochWatch.forget()
    try:
        partitions = workers * len(addresses or [""])
        recovery = None if recovery_dir is None else recovery_config(recovery_dir, partitions)
        snapshots_needed(recovery is not None)
        tune_gc()
        cli_main(
            flow,
            workers_per_process=workers,
            process_id=process_id,
            addresses=addresses or None,
            epoch_interval=timedelta(seconds=snapshot_seconds),
            recovery_config=recovery,
        )
    except BaseException as exc:
        log.error("worker exiting on an error: %s", describe(exc, chain=True))
        raise
    log.info("worker exiting: %s", "stop requested" if STOP.is_set() else "every source reached its end")
