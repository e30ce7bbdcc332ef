"""The ``featurestream`` command line. Settings come from FEATURESTREAM_* environment variables."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from engine.errors import FeaturestreamError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
services_app = typer.Typer(no_args_is_help=True, help="Embedded Kafka (Tansu) and Redis for local use.")
app.add_typer(services_app, name="services")
console = Console()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    return typer.Exit(code=2)


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
    workers: Annotated[int, typer.Option("-w", "--workers", help="worker threads per process")] = 1,
    processes: Annotated[int, typer.Option("-p", "--processes", help="worker processes")] = 1,
    bounded: Annotated[bool, typer.Option(help="stop at the end of the topics as of start")] = False,
    recovery_dir: Annotated[
        Path | None, typer.Option(help="snapshot state here and resume from it after a restart")
    ] = None,
    snapshot_seconds: Annotated[float, typer.Option(help="snapshot (epoch) interval with recovery")] = 10.0,
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
            run_dataflow(flow, workers=workers, recovery_dir=recovery_dir, snapshot_seconds=snapshot_seconds)
            return
        if recovery_dir is not None:
            raise FeaturestreamError(
                "--recovery-dir runs one process; for several, start each with "
                "`python -m bytewax.run ... -r DIR -i N -a ...`"
            )
        base = metrics_port(settings, 0)
        if base:
            urls = ", ".join(f"http://localhost:{base + i}/metrics" for i in range(processes))
            console.print(f"metrics (one per process, /healthz alongside): {urls}")
        _run_processes(pipeline, runtime, workers, processes, base)
    except FeaturestreamError as exc:
        raise _fail(exc) from None


def _run_processes(pipeline: Path, runtime: object, workers: int, processes: int, metrics: int = 0) -> None:
    from featurestream.services import _free_port

    addresses = ";".join(f"127.0.0.1:{_free_port()}" for _ in range(processes))
    env = {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": runtime.kafka_bootstrap_servers,  # type: ignore[attr-defined]
        "FEATURESTREAM_REDIS_URL": runtime.redis_url,  # type: ignore[attr-defined]
        "FEATURESTREAM_DELTA_URI": runtime.delta_uri,  # type: ignore[attr-defined]
        "FEATURESTREAM_BOUNDED": "true" if runtime.stop_at_end else "false",  # type: ignore[attr-defined]
        # Process i serves metrics on metrics + i (featurestream.runtime.metrics_port).
        "FEATURESTREAM_METRICS_PORT": str(metrics),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bytewax.run",
                f"{pipeline}:flow",
                "-w",
                str(workers),
                "-i",
                str(i),
                "-a",
                addresses,
            ],
            env={**env, "BYTEWAX_PROCESS_ID": str(i)},
        )
        for i in range(processes)
    ]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise typer.Exit(code=max(codes))


@app.command()
def produce(
    pipeline: Annotated[Path, typer.Argument(help="pipeline file whose source gets the events")],
    events: Annotated[int, typer.Option(help="synthetic card transactions to publish")] = 100_000,
    users: Annotated[int, typer.Option(help="distinct users")] = 5_000,
    partitions: Annotated[int, typer.Option(help="partitions if the topic is created")] = 4,
) -> None:
    """Publish synthetic card transactions to a pipeline's source topic (creating it if needed)."""
    from confluent_kafka import Producer

    from connectors.kafka import ensure_topic
    from featurestream.runtime import load_views, runtime_config
    from featurestream.synthetic import card_transactions

    try:
        views = load_views(pipeline)
        runtime = runtime_config()
        topic = views[0].source.topic
        ensure_topic(runtime.kafka_bootstrap_servers, topic, partitions)
        p = Producer({"bootstrap.servers": runtime.kafka_bootstrap_servers, "linger.ms": 20})
        now = int(datetime.now(UTC).timestamp() * 1000)
        for i, ev in enumerate(card_transactions(events, users, end_ms=now), 1):
            p.produce(topic, key=ev.key, value=ev.value)
            if i % 10_000 == 0:
                p.poll(0)
        p.flush(60)
        console.print(f"published {events:,} events to {topic}")
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
    from featurestream.services import ensure_services

    try:
        eps = ensure_services(Settings())
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    console.print(f"FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS={eps.kafka_bootstrap_servers}")
    console.print(f"FEATURESTREAM_REDIS_URL={eps.redis_url}")
    console.print(f"FEATURESTREAM_DELTA_URI={eps.delta_uri}")


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


for _area in ("registry", "lineage", "drift"):
    importlib.import_module(f"featurestream.cli_{_area}").register(app)


if __name__ == "__main__":
    app()
