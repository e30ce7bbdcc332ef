"""``featurestream verify``: check a view's online and offline values against its raw events."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import FeaturestreamError

console = Console()


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""
    app.command("verify")(verify)


def verify(
    pipeline: Annotated[Path, typer.Argument(help="pipeline file defining the view")],
    view: Annotated[str, typer.Argument(help="feature view name (its definition in the pipeline file)")],
    sample: Annotated[int, typer.Option(min=1, help="entities to check")] = 100,
    seed: Annotated[int | None, typer.Option(help="seed of the entity sample (default: random)")] = None,
    metrics_file: Annotated[
        Path | None, typer.Option(help="write the metrics here (Prometheus textfile collector format)")
    ] = None,
    pushgateway: Annotated[
        str | None, typer.Option(help="push the metrics to this Prometheus Pushgateway (host:port)")
    ] = None,
) -> None:
    """Compare VIEW's features online (now), offline (a training set at the same time) and
    recomputed from the source topic's raw events, for a sample of entities.

    Exits 1 when any value differs (tolerance: counts, min, max and last exact; sums, means and
    variances within a relative 1e-9). Reports the freshness lag: the newest event time in the
    topic minus the newest the online store shows.
    """
    from featurestream.cli.core import _fail

    try:
        code = _verify(pipeline, view, sample, seed, metrics_file, pushgateway)
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    if code:
        raise typer.Exit(code=code)


def _verify(
    pipeline: Path,
    name: str,
    sample: int,
    seed: int | None,
    metrics_file: Path | None,
    pushgateway: str | None,
) -> int:
    from engine.errors import DefinitionError
    from engine.verify import verify_view
    from engine.verify_metrics import push_metrics, write_metrics
    from featurestream.client import connect
    from featurestream.config import Settings
    from featurestream.local.services import ensure_services
    from featurestream.runtime import load_views

    views = {v.name: v for v in load_views(pipeline)}
    if name not in views:
        raise DefinitionError(f"{pipeline} defines no feature view {name!r}; it defines {sorted(views)}")
    fv = views[name]
    settings = Settings()
    store = connect(fv, settings=settings)
    report = verify_view(
        store,
        fv,
        ensure_services(settings, start=False).kafka_bootstrap_servers,
        sample=sample,
        seed=seed,
        kafka_config=settings.kafka_config,
    )
    src = report.source
    console.print(
        f"{fv.name} ({fv.version}): {src.read:,} messages in {escape(fv.source.topic)}, "
        f"{len(src.ts):,} accepted ({src.dead:,} invalid, {src.late:,} late, {src.duplicates:,} duplicates); "
        f"{report.sampled} entities sampled, {report.unsettled} unsettled (events arrived during the check)",
        soft_wrap=True,
    )
    table = Table(title="mismatches per feature (online or offline vs recomputed)")
    for col in ("feature", "compared", "mismatched", "ratio"):
        table.add_column(col, justify="left" if col == "feature" else "right")
    for check in report.checks.values():
        table.add_row(check.feature, str(check.compared), str(check.mismatched), f"{check.ratio:.4f}")
    console.print(table)
    for check in report.checks.values():
        for example in check.examples:
            console.print(f"  {check.feature}: {escape(example)}", soft_wrap=True)
    if report.not_checked:
        console.print(
            f"not checked (not recomputed by verify): {', '.join(report.not_checked)}", soft_wrap=True
        )
    fresh = "-" if report.freshness_seconds is None else f"{report.freshness_seconds:,.3f} s"
    newest = report.newest_source.isoformat() if report.newest_source else "-"
    console.print(f"freshness lag: {fresh} (newest event in the topic: {newest})")
    if metrics_file is not None:
        write_metrics(report, metrics_file)
        console.print(f"metrics written to {escape(str(metrics_file))}")
    if pushgateway:
        push_metrics(report, pushgateway)
        console.print(f"metrics pushed to {escape(pushgateway)}")
    if report.mismatches:
        console.print(f"[bold red]{report.mismatches} mismatched values[/]")
        return 1
    console.print("ok: every compared value matches")
    return 0
