"""``featurestream training-set``: a point-in-time training set from the offline store to Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.errors import FeaturestreamError

console = Console()


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""

    @app.command("training-set")
    def training_set(
        pipeline: Annotated[Path, typer.Argument(help="pipeline file defining the feature views")],
        entities: Annotated[
            Path, typer.Option("--entities", help="entity rows: join keys and a timestamp (.parquet or .csv)")
        ],
        features: Annotated[str, typer.Option("--features", help="view:feature,... (a bare view: all)")],
        out: Annotated[Path, typer.Option("--out", help="Parquet file to write")],
        timestamp_column: Annotated[
            str, typer.Option("--timestamp-column", help="the rows' time column")
        ] = "event_timestamp",
        chunk_rows: Annotated[
            int, typer.Option("--chunk-rows", min=1, help="rows computed at a time")
        ] = 262_144,
    ) -> None:
        """Write each entity row plus its features as of the row's time, read from Delta.

        No value uses an event after its row's time. Rows are computed and written in chunks, so
        memory is the events read plus one chunk."""
        from connectors.delta_store import DeltaOfflineStore
        from featurestream.client import _resolve
        from featurestream.config import Settings
        from featurestream.runtime import load_views
        from featurestream.training import read_entities, write_training_set

        try:
            if out.suffix.lower() != ".parquet":
                raise FeaturestreamError(f"--out: {out} must end in .parquet")
            views = {v.name: v for v in load_views(pipeline)}
            wanted = _resolve(views, [f.strip() for f in features.split(",") if f.strip()])
            table = read_entities(entities, [views[n] for n in wanted], timestamp_column)
            settings = Settings()
            offline = DeltaOfflineStore(settings.resolved_delta_uri(), settings.delta_storage_options)
            columns = (
                TextColumn("training set"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
                task = bar.add_task("rows", total=table.num_rows, rate="")

                def advance(rows: int) -> None:
                    bar.advance(task, rows)
                    elapsed = bar.tasks[0].elapsed or 0.0
                    done = bar.tasks[0].completed
                    bar.update(task, rate=f"{done / elapsed:,.0f} rows/s" if elapsed else "")

                written = write_training_set(
                    offline, views, wanted, table, timestamp_column, out, chunk_rows, advance
                )
        except FeaturestreamError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(code=2) from None
        console.print(f"wrote {written:,} rows to {escape(str(out))}")
