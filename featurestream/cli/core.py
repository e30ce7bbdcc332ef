"""Stream Kafka events into windowed ML features, served from Redis and Delta Lake.

Settings come from FEATURESTREAM_* environment variables, else from featurestream.toml in the
working directory (FEATURESTREAM_CONFIG names another file). `featurestream doctor` checks them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.exceptions import TyperException

from engine.errors import FeaturestreamError

if TYPE_CHECKING:
    from engine.dataflow import RuntimeConfig
    from engine.definitions import FeatureView

_DEBUG = {"on": bool(os.environ.get("FEATURESTREAM_DEBUG"))}


class _Commands(TyperGroup):
    """Every command's errors as one or two lines, never a traceback (``--debug`` shows it);
    help without internal placeholders."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (TyperException, typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if _DEBUG["on"]:
                raise
            ours = _ours(exc)
            if ours is not None:
                raise _fail(ours) from None
            console.print("(run `featurestream --debug ...` for the traceback)")
            raise _fail(exc, code=1) from None

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _tidy(command)
        return command


def _tidy(command: Any) -> None:
    """Plain metavars (PIPELINE, N, PATH) instead of ``{pipeline}`` and ``<bool>``."""
    for param in command.params:
        if isinstance(param, TyperArgument):
            if param.metavar is None and param.name:
                dots = "..." if param.nargs != 1 else ""
                shown = param.name.upper() + dots if param.required else f"[{param.name.upper()}]{dots}"
                param.metavar = shown
                param._usage_display_name = lambda shown=shown: shown  # typer braces required ones
            param.display_type_rich = lambda ctx: None  # the name says it: no <path>, <str>
        elif isinstance(param, TyperOption) and param.metavar is None:
            if param.is_flag:
                param.metavar = ""
            else:
                kind = param.bare_type().lower()
                param.metavar = (
                    "N" if "int" in kind else "X" if "float" in kind else "PATH" if "path" in kind else "TEXT"
                )
    for sub in getattr(command, "commands", {}).values():
        _tidy(sub)


app = typer.Typer(
    cls=_Commands, add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None
)
console = Console()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error")] = False,
) -> None:
    _DEBUG["on"] = _DEBUG["on"] or debug


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
    from featurestream.registered import served_views, start_drift_watch
    from featurestream.runtime import load_views, metrics_port, prepare_topics, runtime_config, start_metrics

    try:
        settings = Settings(bounded=bounded) if bounded else Settings()
        views = served_views(load_views(pipeline), settings)
        _note_embedded_start(settings)
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
            started = time.monotonic()
            try:
                with _progress(views, runtime) if bounded else _nothing():
                    run_dataflow(
                        flow, workers=workers, recovery_dir=recovery_dir, snapshot_seconds=snapshot_seconds
                    )
                _print_run_summary(views, time.monotonic() - started)
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


def _note_embedded_start(settings: Any) -> None:
    """Say so when a command is about to start embedded services (they outlive it)."""
    from featurestream.local.services import embedded_status

    if settings.kafka_bootstrap_servers is not None and settings.redis_url is not None:
        return
    status = embedded_status(settings)
    wanted = [
        k
        for k, v in (("kafka", settings.kafka_bootstrap_servers), ("redis", settings.redis_url))
        if v is None
    ]
    if all(status.get(k, {}).get("answers") for k in wanted):
        return
    names = " and ".join({"kafka": "broker", "redis": "Redis"}[k] for k in wanted)
    console.print(
        f"starting the embedded {names} (state dir {settings.state_dir}); they keep running "
        "for later commands: `featurestream services down` stops them",
        soft_wrap=True,
    )


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def _progress(views: list[FeatureView], runtime: RuntimeConfig) -> Iterator[None]:
    """A progress bar of a bounded run: events read of those in the topics at start (on a
    terminal; a run resumed from recovery ends before the bar is full)."""
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from connectors.kafka import partition_count, partition_end
    from engine.metrics import EVENTS_IN, total

    if not console.is_terminal:
        yield
        return
    expected = 0
    for view in views:
        topic, config = view.source.topic, runtime.kafka_config
        for p in range(partition_count(runtime.kafka_bootstrap_servers, topic, config=config)):
            low, high = partition_end(runtime.kafka_bootstrap_servers, topic, p, 0, config)
            expected += max(0, high - low)
    done = threading.Event()
    columns = (TextColumn("events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("events", total=expected)

        def follow() -> None:
            while not done.wait(0.2):
                seen = sum(total(EVENTS_IN, view=v.name) for v in views)
                bar.update(task, completed=seen, total=max(expected, seen))

        threading.Thread(target=follow, daemon=True).start()
        try:
            yield
        finally:
            done.set()


def _print_run_summary(views: list[FeatureView], seconds: float) -> None:
    from featurestream.runtime import run_summary

    for line in run_summary(views, seconds):
        console.print(line, soft_wrap=True)


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
    from featurestream.registered import served_views
    from featurestream.reset import apply_reset, plan_reset
    from featurestream.runtime import load_views

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
    feature: Annotated[
        list[str] | None,
        typer.Option("--feature", "-f", help="view, view:feature or view@N:feature (a registered version)"),
    ] = None,
) -> None:
    """Print online feature values (as of now) for some entities.

    Reads the configured Redis, or the embedded one `featurestream services up` started; starts
    nothing."""
    from featurestream.client import connect

    store = connect(pipeline)
    result = store.get_online_features(feature or list(store.views), entities)
    table = Table(title=f"online features as of now ({len(entities)} entities)")
    table.add_column("feature", overflow="fold")
    for e in entities:
        table.add_column(e, justify="right", overflow="fold")
    for name, vals in result.values.items():
        table.add_row(name, *[_value(v) for v in vals])
    console.print(table)


def _value(v: object) -> str:
    """A feature value as it is: counts as integers, other numbers with their decimals (money
    keeps two), never rounded to a few significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return escape(str(v))
    if isinstance(v, int) or (v.is_integer() and abs(v) < 1e15):
        return f"{int(v):,}"
    if abs(v - round(v, 2)) <= 1e-9 * max(1.0, abs(v)):
        return f"{v:,.2f}"
    text = f"{v:,.6f}".rstrip("0")
    return text if not text.endswith(".") else text + "0"


for _area in ("services", "registry", "lineage", "drift", "produce", "serve", "keys", "cdc", "doctor"):
    importlib.import_module(f"featurestream.cli.{_area}").register(app)
