"""``featurestream backfill``: compute a view version from its topic's history, then stop."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from engine.errors import FeaturestreamError

console = Console()


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""
    app.command("backfill")(backfill)


def backfill(
    pipeline: Annotated[Path, typer.Argument(help="pipeline file defining the view")],
    view: Annotated[str, typer.Argument(help="feature view name (its definition in the pipeline file)")],
    start: Annotated[
        str,
        typer.Option(
            "--from",
            help="earliest, an ISO-8601 time (Kafka record time; UTC when no offset given), "
            "offset:N (every partition) or offset:P=N,P=N",
        ),
    ],
    end: Annotated[
        str | None,
        typer.Option("--to", help="same forms, exclusive; default: each partition's end at the first start"),
    ] = None,
    backfill_id: Annotated[
        str | None, typer.Option("--id", help="name of this backfill (default: from --from/--to)")
    ] = None,
    restart: Annotated[
        bool, typer.Option(help="drop this backfill's progress and start over (over what it wrote)")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="events per read (smaller: gentler)")] = 20_000,
    snapshot_seconds: Annotated[float, typer.Option(min=0.1, help="snapshot interval (resume point)")] = 2.0,
) -> None:
    """Compute VIEW from its topic's history with the streaming dataflow, then stop.

    Writes the version's online and offline stores like a worker, with its own consumer group
    and no committed offsets. Interrupted (even by kill -9), the same command resumes it. Once
    finished, a worker serving this version continues from the backfill's end.
    """
    from featurestream.cli.core import _fail, _ours

    try:
        _backfill(pipeline, view, start, end, backfill_id, restart, batch_size, snapshot_seconds)
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    except Exception as exc:  # Bytewax wraps errors raised inside the dataflow
        cause = _ours(exc)
        if cause is None:
            raise
        raise _fail(cause) from None


def _backfill(
    pipeline: Path,
    name: str,
    start: str,
    end: str | None,
    ident: str | None,
    restart: bool,
    batch_size: int,
    snapshot_seconds: float,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.backfill import backfill_dir, backfill_id, describe_plan, parse_position, run_backfill
    from engine.errors import DefinitionError
    from featurestream.config import Settings
    from featurestream.runtime import load_views, runtime_config

    first = parse_position(start, "--from")
    last = parse_position(end, "--to") if end is not None else None
    views = {v.name: v for v in load_views(pipeline)}
    if name not in views:
        raise DefinitionError(f"{pipeline} defines no feature view {name!r}; it defines {sorted(views)}")
    fv = views[name]
    settings = Settings()
    root = settings.state_dir.resolve() / "backfills"
    ident = ident or backfill_id(first, last)
    directory = backfill_dir(root, fv, ident)
    if restart and directory.exists():
        shutil.rmtree(directory)
        console.print(f"dropped the progress of backfill {ident}")
    runtime = runtime_config(settings, batch_size=batch_size)
    console.print(
        f"backfill {ident} of {fv.name} ({fv.version}) from {first.text} to {last.text if last else 'latest'}"
    )
    columns = (TextColumn("offsets"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("offsets", total=None)
        result = run_backfill(
            fv,
            runtime,
            root,
            first,
            last,
            ident=ident,
            snapshot_seconds=snapshot_seconds,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            over_existing=restart,
        )
    for line in describe_plan(result.plan):
        console.print(f"  {line}")
    state = "was already complete" if result.already_done else "complete"
    console.print(
        f"backfill {ident} {state}: {result.plan.total:,} offsets of {escape(result.plan.topic)}; "
        f"a worker serving {fv.name} ({fv.version}) continues from its end ({escape(str(result.directory))})",
        soft_wrap=True,
    )
