"""Drift commands: baselines and drift reports."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
_STYLE = {"ok": "green", "warn": "yellow", "alert": "bold red"}


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""

    @app.command("baseline")
    def baseline(
        view: Annotated[str, typer.Argument(help="feature view name")],
        pipeline: Annotated[Path, typer.Option("--pipeline", help="pipeline file defining the view")],
        training_set: Annotated[
            int,
            typer.Option(
                "--training-set",
                help="id of a recorded training set (get_training_set(..., registry=...); "
                "`featurestream lineage VIEW` lists them)",
            ),
        ],
    ) -> None:
        """Capture a view's drift baseline from a recorded training set, for `featurestream drift`."""
        from engine.errors import DefinitionError
        from featurestream.config import Settings
        from featurestream.runtime import feature_store, load_views
        from registry.core import Registry
        from registry.drift import capture_baseline

        views = {v.name: v for v in load_views(pipeline)}
        if view not in views:
            raise DefinitionError(f"{pipeline} defines no feature view {view!r}; it has {sorted(views)}")
        fv = views[view]
        registry = Registry(Settings().resolved_registry_url())
        try:
            store = feature_store(fv, start_services=False)  # reads Delta only
            table = store.reproduce_training_set(registry, training_set)
            stats = capture_baseline(registry, fv, table, training_set_id=training_set)
        finally:
            registry.close()
        table_out = Table(title=f"baseline of {fv.name} ({fv.version}) from training set #{training_set}")
        for col in ("feature", "n", "null rate", "mean", "std"):
            table_out.add_column(col, justify="left" if col == "feature" else "right", overflow="fold")
        for feature, st in stats.items():
            table_out.add_row(
                feature,
                f"{st.get('n', 0):,}",
                _num(st.get("null_rate")),
                _num(st.get("mean")),
                _num(st.get("std")),
            )
        console.print(table_out)
        console.print(f"measure drift against it with `featurestream drift {fv.name} --pipeline {pipeline}`")

    @app.command("drift")
    def drift(
        view: Annotated[str, typer.Argument(help="feature view name")],
        pipeline: Annotated[Path, typer.Option("--pipeline", help="pipeline file defining the view")],
        since: Annotated[str, typer.Option(help="measure [now - since, now)")] = "6h",
        bucket: Annotated[str, typer.Option(help="bucket size")] = "1h",
        plot: Annotated[Path | None, typer.Option(help="write a PNG plot here")] = None,
    ) -> None:
        """Measure a view's drift from its training baseline per bucket; print a table (and plot)."""
        from engine.definitions import parse_duration
        from engine.errors import DefinitionError, FeaturestreamError
        from featurestream.config import Settings
        from featurestream.runtime import feature_store, load_views
        from registry.core import Registry
        from registry.drift import measure_drift, plot_drift

        try:
            views = {v.name: v for v in load_views(pipeline)}
            if view not in views:
                raise DefinitionError(f"{pipeline} defines no feature view {view!r}; it has {sorted(views)}")
            fv = views[view]
            span, step = parse_duration(since), parse_duration(bucket)
            end = datetime.now(UTC)
            registry = Registry(Settings().resolved_registry_url())
            try:
                store = feature_store(fv, start_services=False)  # drift reads Delta only
                found = measure_drift(registry, store, fv, end - span, end, step)
                if plot is not None:
                    plot_drift(registry, fv, plot)
            finally:
                registry.close()
        except (FeaturestreamError, ValueError) as exc:
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(code=2) from None
        table = Table(title=f"drift of {fv.name}@{fv.version} since {end - span:%Y-%m-%d %H:%M} UTC")
        for col in ("feature", "bucket", "n", "psi", "ks", "status"):
            table.add_column(col, justify="right" if col in ("n", "psi", "ks") else "left")
        for m in found:
            style = _STYLE.get(m.status, "")
            table.add_row(
                m.feature,
                f"{m.bucket_start:%Y-%m-%d %H:%M}",
                str(m.n),
                _num(m.psi),
                _num(m.ks),
                f"[{style}]{m.status}[/]" if style else m.status,
            )
        console.print(table)
        if not found:
            console.print(f"no accepted events of {fv.name} since {end - span:%Y-%m-%d %H:%M} UTC")
        if plot is not None:
            console.print(f"plot written to {plot}")
