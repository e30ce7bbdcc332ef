"""The ``featurestream`` command line. Settings come from FEATURESTREAM_* environment variables."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import FeaturestreamError

if TYPE_CHECKING:
    from engine.dataflow import RuntimeConfig
    from engine.definitions import FeatureView

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
services_app = typer.Typer(no_args_is_help=True, help="Embedded Kafka (Tansu) and Redis for local use.")
app.add_typer(services_app, name="services")
console = Console()


def _fail(exc: Exception, code: int = 2) -> typer.Exit:
    """Print why the command stops (without secrets: URL passwords are masked), as exit ``code``."""
    from engine.redact import describe, redact_text

    text = redact_text(str(exc)) if isinstance(exc, FeaturestreamError) else describe(exc, chain=True)
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)
    return typer.Exit(code=code)


def _ours(exc: BaseException) -> FeaturestreamError | None:
    """The featurestream error under an exception's chain, if one caused it."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, FeaturestreamError):
        seen = seen.__cause__ or seen.__context__
    return seen


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="events to produce")] = 200_000,
    users: Annotated[int, typer.Option(help="distinct users")] = 5_000,
    partitions: Annotated[int, typer.Option(help="partitions of the demo topic")] = 4,
    keep_services: Annotated[bool, typer.Option(help="leave embedded services running")] = False,
) -> None:
    """Start embedded services, stream synthetic card transactions, and show the features."""
    from featurestream.demo import run_demo

    try:
        run_demo(events, users, partitions, keep_services, console)
    except FeaturestreamError as exc:
        raise _fail(exc) from None


@app.command()
def run(
    pipeline: Annotated[Path, typer.Argument(help="pipeline file defining feature views")],
    workers: Annotated[int, typer.Option("-w", "--workers", min=1, help="worker threads per process")] = 1,
    processes: Annotated[int, typer.Option("-p", "--processes", min=1, help="worker processes")] = 1,
    bounded: Annotated[bool, typer.Option(help="stop at the end of the topics as of start")] = False,
    recovery_dir: Annotated[
        Path | None, typer.Option(help="snapshot state here and resume from it after a restart")
    ] = None,
    snapshot_seconds: Annotated[
        float, typer.Option(min=0.1, help="snapshot (epoch) interval with recovery")
    ] = 10.0,
) -> None:
    """Run a pipeline's feature views as a Bytewax dataflow (until stopped, or to the end with --bounded)."""
    from engine.dataflow import build_dataflow, run_dataflow
    from featurestream.config import Settings
    from featurestream.runtime import load_views, metrics_port, prepare_topics, runtime_config, start_metrics
    from featurestream.serving import served_views, start_drift_watch

    try:
        settings = Settings(bounded=bounded) if bounded else Settings()
        views = served_views(load_views(pipeline), settings)
        runtime = runtime_config(settings)
        prepare_topics(views, runtime)
        console.print(
            f"running {', '.join(f'{v.name} ({v.version})' for v in views)} "
            f"with {processes} process(es) x {workers} worker(s)"
        )
        if processes == 1:
            flow = build_dataflow(views, runtime)
            if not bounded:
                start_drift_watch(views, settings)
            port = start_metrics(settings)
            if port:
                console.print(
                    f"metrics: http://localhost:{port}/metrics, health: http://localhost:{port}/healthz"
                )
            try:
                run_dataflow(
                    flow, workers=workers, recovery_dir=recovery_dir, snapshot_seconds=snapshot_seconds
                )
            except Exception as exc:  # Bytewax wraps errors raised inside the dataflow
                cause = _ours(exc)
                if cause is None:
                    raise
                if type(cause).__name__ == "TopicChangedError":
                    again = f" --recovery-dir {recovery_dir}" if recovery_dir else ""
                    console.print(f"to recompute: featurestream reset {pipeline}{again}", soft_wrap=True)
                raise _fail(cause) from None
            return
        base = metrics_port(settings, 0)
        if base:
            urls = ", ".join(f"http://localhost:{base + i}/metrics" for i in range(processes))
            console.print(f"metrics (one per process, /healthz alongside): {urls}")
        code = _run_processes(
            pipeline, runtime, views, workers, processes, base, recovery_dir, snapshot_seconds
        )
        if code:
            raise typer.Exit(code=code)
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    except typer.Exit:
        raise
    except Exception as exc:  # not one of ours: still say why the worker exits, without secrets
        raise _fail(exc, code=1) from None


def _run_processes(
    pipeline: Path,
    runtime: RuntimeConfig,
    views: list[FeatureView],
    workers: int,
    processes: int,
    metrics: int,
    recovery_dir: Path | None,
    snapshot_seconds: float,
) -> int:
    """Run the views in ``processes`` supervised worker processes (:mod:`featurestream.workers`)."""
    from featurestream.workers import run_cluster

    env = {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": runtime.kafka_bootstrap_servers,
        "FEATURESTREAM_REDIS_URL": runtime.redis_url,
        "FEATURESTREAM_DELTA_URI": runtime.delta_uri,
        "FEATURESTREAM_BOUNDED": "true" if runtime.stop_at_end else "false",
        # Process i serves metrics on metrics + i (featurestream.runtime.metrics_port).
        "FEATURESTREAM_METRICS_PORT": str(metrics),
    }
    return run_cluster(
        pipeline.resolve(),
        workers=workers,
        processes=processes,
        versions=[v.version for v in views],
        env=env,
        recovery_dir=None if recovery_dir is None else recovery_dir.resolve(),
        snapshot_seconds=snapshot_seconds,
        echo=lambda line: console.print(escape(line), soft_wrap=True),
    )


@app.command()
def reset(
    pipeline: Annotated[Path, typer.Argument(help="pipeline file whose derived state is dropped")],
    recovery_dir: Annotated[
        Path | None, typer.Option(help="the recovery dir the pipeline ran with, if any")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Drop a pipeline's online keys, offline tables and recovery snapshots, so that the next run
    recomputes them from its topics as they are now (after the broker lost its data)."""
    from featurestream.config import Settings
    from featurestream.reset import apply_reset, plan_reset
    from featurestream.runtime import load_views
    from featurestream.serving import served_views

    try:
        settings = Settings()
        views = served_views(load_views(pipeline), settings)
        plan = plan_reset(views, settings, recovery_dir)
        for note in plan.notes:
            console.print(f"note: {note}")
        if not plan.lines():
            console.print("nothing to reset")
            return
        console.print("this drops:\n  " + "\n  ".join(plan.lines()))
        if not yes and not typer.confirm("reset?"):
            raise typer.Exit(code=1)
        for line in apply_reset(plan):
            console.print(line)
        console.print(f"done; `featurestream run {pipeline}` now recomputes from the topics")
    except FeaturestreamError as exc:
        raise _fail(exc) from None


@app.command()
def online(
    pipeline: Annotated[Path, typer.Argument(help="pipeline file defining the feature views")],
    entities: Annotated[list[str], typer.Argument(help="entity keys to read")],
    feature: Annotated[list[str] | None, typer.Option("--feature", "-f", help="view or view:feature")] = None,
) -> None:
    """Print online feature values (as of now) for some entities."""
    from featurestream.runtime import feature_store, load_views

    try:
        views = load_views(pipeline)
        store = feature_store(*views)
        result = store.get_online_features(feature or [v.name for v in views], entities)
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    table = Table()
    table.add_column("feature")
    for e in entities:
        table.add_column(e, justify="right")
    for name, vals in result.values.items():
        table.add_row(name, *["-" if v is None else f"{v:,.4g}" for v in vals])
    console.print(table)


@services_app.command("up")
def services_up() -> None:
    """Start (or reuse) the embedded broker and Redis, and print their addresses."""
    from featurestream.config import Settings
    from featurestream.services import broker_generation, ensure_services

    try:
        settings = Settings()
        before = broker_generation(settings)
        eps = ensure_services(settings)
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    console.print(f"FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS={eps.kafka_bootstrap_servers}")
    console.print(f"FEATURESTREAM_REDIS_URL={eps.redis_url}")
    console.print(f"FEATURESTREAM_DELTA_URI={eps.delta_uri}")
    if eps.kafka_generation:
        console.print(f"broker generation {eps.kafka_generation} (see `featurestream services status`)")
    if before and eps.kafka_generation and before != eps.kafka_generation:
        console.print(
            f"note: the broker started empty (generation {before} is gone with its topics); "
            "pipelines that read those topics stop until `featurestream reset PIPELINE.py`",
            soft_wrap=True,
        )


@services_app.command("down")
def services_down() -> None:
    """Stop the embedded services."""
    from featurestream.config import Settings
    from featurestream.services import stop_embedded

    for line in stop_embedded(Settings()) or ["nothing was running"]:
        console.print(line)


@services_app.command("status")
def services_status() -> None:
    """Show the embedded services and whether they answer."""
    from featurestream.config import Settings
    from featurestream.services import embedded_status

    for kind, info in embedded_status(Settings()).items():
        console.print(f"{kind}: {info}")


for _area in ("registry", "lineage", "drift", "produce", "serve", "keys"):
    importlib.import_module(f"featurestream.cli_{_area}").register(app)


if __name__ == "__main__":
    app()
