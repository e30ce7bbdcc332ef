"""The edge between settings and the engine: resolve services, load pipelines, build flows."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from bytewax.dataflow import Dataflow

from connectors.kafka import ensure_topic, partition_count
from engine.dataflow import RuntimeConfig, build_dataflow, snapshots_needed, stop_on_signals, tune_gc
from engine.definitions import FeatureView
from engine.errors import DefinitionError, ServiceUnavailable
from engine.table_definitions import TableView
from featurestream.client import FeatureStore
from featurestream.config import Settings
from featurestream.local.services import ensure_services
from registry.core import Registry

__all__ = [
    "dataflow",
    "feature_store",
    "load_views",
    "metrics_port",
    "prepare_topics",
    "runtime_config",
    "start_metrics",
]


def load_views(path: str | Path) -> list[FeatureView]:
    """Feature views defined in a pipeline file: its ``views`` list, else every FeatureView in it."""
    path = Path(path).resolve()
    if not path.is_file():
        raise DefinitionError(f"pipeline file {path} does not exist")
    name = f"_featurestream_pipeline_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    found = list(getattr(module, "views", None) or [])
    if not found:
        found = [v for v in vars(module).values() if isinstance(v, FeatureView | TableView)]
    if not found:
        raise DefinitionError(f"{path} defines no FeatureView; define one or a `views` list")
    names = [v.name for v in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DefinitionError(f"{path} defines feature views {dupes} more than once; names must be unique")
    return found


def runtime_config(settings: Settings | None = None, **overrides: object) -> RuntimeConfig:
    """Runtime for this environment, starting embedded services where none are configured."""
    settings = settings or Settings()
    eps = ensure_services(settings)
    values: dict[str, object] = {
        "kafka_bootstrap_servers": eps.kafka_bootstrap_servers,
        "redis_url": eps.redis_url,
        "delta_uri": eps.delta_uri,
        "delta_storage_options": settings.delta_storage_options,
        "redis_prefix": settings.redis_prefix,
        "stop_at_end": settings.bounded,
        "kafka_config": settings.kafka_config,
        "backfill_dir": str((settings.state_dir / "backfills").resolve()),  # engine.backfill
    }
    return RuntimeConfig(**{**values, **overrides})


def prepare_topics(views: list[FeatureView], runtime: RuntimeConfig) -> None:
    """Check every source topic exists and create the dead-letter topics."""
    for view in views:
        try:
            partition_count(runtime.kafka_bootstrap_servers, view.source.topic, config=runtime.kafka_config)
        except ServiceUnavailable as exc:
            if "does not exist" not in str(exc):
                raise
            raise ServiceUnavailable(
                f"source topic {view.source.topic!r} of feature view {view.name!r} does not exist on "
                f"{runtime.kafka_bootstrap_servers} (`run` creates only dead-letter topics); create it "
                f"by publishing to it, e.g. `featurestream produce PIPELINE.py {view.source.name} "
                "events.jsonl --partitions 4`, or fix the source's topic name"
            ) from None
        ensure_topic(runtime.kafka_bootstrap_servers, view.source.dlq_topic, 1, config=runtime.kafka_config)


def metrics_port(settings: Settings, process_id: int | None = None) -> int:
    """This process's metrics port: ``metrics_port`` plus the Bytewax process id (0: disabled).

    The process id defaults to ``BYTEWAX_PROCESS_ID`` (``featurestream run -p`` sets it), else 0.
    """
    if not settings.metrics_port:
        return 0
    if process_id is None:
        process_id = int(os.environ.get("BYTEWAX_PROCESS_ID") or 0)
    return settings.metrics_port + process_id


def start_metrics(settings: Settings, process_id: int | None = None) -> int:
    """Serve ``/metrics`` and ``/healthz`` for this worker process on ``metrics_host`` (default
    loopback only); returns the port (0: disabled)."""
    from engine.observe import serve

    port = metrics_port(settings, process_id)
    if port:
        serve(port, host=settings.metrics_host)
    return port


def _tell_recovery_from_bytewax_run() -> None:
    """Under ``python -m bytewax.run`` without ``-r``, state snapshots are never used: say so, so
    the tile operators skip them (anything else keeps them)."""
    argv = sys.argv
    if not argv or not argv[0].replace("\\", "/").endswith("bytewax/run.py"):
        return
    recovery = os.environ.get("BYTEWAX_RECOVERY_DIRECTORY") or any(
        a in ("-r", "--recovery-directory") or a.startswith("--recovery-directory=") for a in argv[1:]
    )
    snapshots_needed(bool(recovery))


def dataflow(*views: FeatureView, settings: Settings | None = None) -> Dataflow:
    """A ready-to-run dataflow for ``views`` (what ``python -m bytewax.run file.py:flow`` runs).

    Also starts this process's metrics endpoint (see :func:`start_metrics`).
    """
    from engine.observe import configure_logging
    from featurestream.registered import served_views, start_drift_watch

    configure_logging()
    _tell_recovery_from_bytewax_run()
    tune_gc()
    settings = settings or Settings()
    runtime = runtime_config(settings)
    served = served_views(list(views), settings)
    prepare_topics(served, runtime)
    flow = build_dataflow(served, runtime)
    _announce(served)
    start_metrics(settings)
    if int(os.environ.get("BYTEWAX_PROCESS_ID", "0")) == 0:
        start_drift_watch(served, settings)
    stop_on_signals()
    return flow


def run_summary(views: list[FeatureView], seconds: float) -> list[str]:
    """What a run did, from this process's metrics: per view, events read and accepted, dead
    letters by reason, time and rate."""
    from engine.metrics import DEAD_LETTERS, EVENTS_ACCEPTED, EVENTS_IN, total

    lines = []
    for view in views:
        read = int(total(EVENTS_IN, view=view.name))
        accepted = int(total(EVENTS_ACCEPTED, view=view.name))
        reasons: dict[str, int] = {}
        for metric in DEAD_LETTERS.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("view") == view.name and sample.value:
                    reason = sample.labels["reason"]
                    reasons[reason] = reasons.get(reason, 0) + int(sample.value)
        detail = f" ({', '.join(f'{r} {n:,}' for r, n in sorted(reasons.items()))})" if reasons else ""
        rate = f"{read / seconds:,.0f} events/s" if seconds > 0 else "-"
        lines.append(
            f"{view.name} ({view.version}): {read:,} events read from {view.source.topic} in "
            f"{seconds:,.1f} s ({rate}); {accepted:,} accepted; {sum(reasons.values()):,} dead "
            f"letters{detail} on {view.source.dlq_topic}"
        )
    return lines


def _announce(views: list[FeatureView]) -> None:
    """Under ``python -m bytewax.run``: log what runs, and a summary when the process ends."""
    import atexit
    import logging
    import time

    log = logging.getLogger("featurestream")
    log.info("running %s", ", ".join(f"{v.name} ({v.version})" for v in views))
    started = time.monotonic()

    def summary() -> None:
        for line in run_summary(views, time.monotonic() - started):
            log.info("%s", line)

    atexit.register(summary)


def feature_store(
    *views: FeatureView,
    settings: Settings | None = None,
    registry: Registry | None = None,
    start_services: bool = True,
) -> FeatureStore:
    """A store for this environment. ``start_services=False`` starts nothing: for offline-only
    work (drift, training sets) where the configured or recorded endpoints suffice."""
    settings = settings or Settings()
    if start_services:
        eps = ensure_services(settings)
        redis_url, delta_uri = eps.redis_url, eps.delta_uri
    else:
        redis_url = settings.redis_url or "redis://127.0.0.1:6379/0"  # connected only on an online read
        delta_uri = settings.resolved_delta_uri()
    return FeatureStore(
        views,
        redis_url=redis_url,
        delta_uri=delta_uri,
        redis_prefix=settings.redis_prefix,
        delta_storage_options=settings.delta_storage_options,
        registry=registry,
    )
