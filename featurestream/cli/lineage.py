"""Lineage commands: training sets, models, lineage graphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from engine.errors import FeaturestreamError

if TYPE_CHECKING:
    from registry.core import Registry
    from registry.lineage import LineageGraph

console = Console()

_KIND_STYLE = {
    "model": "[bold magenta]model[/]",
    "training_set": "[bold yellow]training set[/]",
    "view_version": "[bold green]view[/]",
    "topic": "[bold blue]topic[/]",
}


def _registry() -> Registry:
    from featurestream.config import Settings
    from registry.core import Registry

    return Registry(Settings().resolved_registry_url())


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(code=2)


def _compact(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, separators=(", ", "="))[1:-1].replace('"', "") if d else "-"


def _describe(graph: LineageGraph, node_id: str) -> str:
    node = graph.nodes[node_id]
    text = f"{_KIND_STYLE[node.kind]} {escape(node.label.removeprefix('training set '))}"
    d = node.detail
    if node.kind == "model":
        params, metrics = escape(_compact(d["parameters"])), escape(_compact(d["metrics"]))
        text += f"  [dim]metrics: {metrics}; params: {params}[/]"
    elif node.kind == "training_set":
        pins = ", ".join(f"{Path(u).name}@v{v}" for u, v in d["delta_versions"].items())
        text += f"  [dim]{d['rows']} entity rows, sha256 {d['entity_sha256'][:12]}, delta {escape(pins)}[/]"
    elif node.kind == "view_version":
        text += f"  [dim]{d['version_hash']} {d['status']}[/]"
    return text


def lineage_tree(graph: LineageGraph) -> Tree:
    """Downstream nodes (models, or else the furthest along) at the top, their inputs below."""
    tree = Tree(f"lineage of [bold]{escape(graph.name)}[/]")
    sinks = [n for n in graph.nodes if not graph.downstream(n)]
    order = {"model": 0, "training_set": 1, "view_version": 2, "topic": 3}
    sinks.sort(key=lambda n: (order[graph.nodes[n].kind], graph.nodes[n].label))

    def add(parent: Tree, node_id: str) -> None:
        branch = parent.add(_describe(graph, node_id))
        for up in graph.upstream(node_id):
            add(branch, up)

    for sink in sinks:
        add(tree, sink)
    return tree


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""

    @app.command()
    def lineage(
        name: Annotated[str, typer.Argument(help="a model name or a feature view name")],
        image: Annotated[Path | None, typer.Option("--image", help="also draw the graph to this PNG")] = None,
    ) -> None:
        """Show topic -> view version -> training set -> model lineage of a model or a view."""
        from registry.lineage import lineage_graph, render_lineage

        try:
            reg = _registry()
            try:
                graph = lineage_graph(reg, name)
            finally:
                reg.close()
            console.print(lineage_tree(graph))
            if image is not None:
                console.print(f"image written to {render_lineage(graph, image)}")
        except FeaturestreamError as exc:
            raise _fail(exc) from None

    @app.command("models")
    def list_models(
        name: Annotated[str | None, typer.Argument(help="only the versions of this model")] = None,
    ) -> None:
        """List registered models with their training sets, parameters and metrics."""
        from registry.lineage import models

        try:
            reg = _registry()
            try:
                found = models(reg, name)
            finally:
                reg.close()
        except FeaturestreamError as exc:
            raise _fail(exc) from None
        if not found:
            console.print(f"no model named {name!r} is registered" if name else "no models are registered")
            return
        table = Table(title="registered models")
        for col in ("model", "version", "training set", "created", "parameters", "metrics"):
            table.add_column(col, overflow="fold")
        for m in found:
            table.add_row(
                escape(m.name),
                escape(m.version),
                f"#{m.training_set_id}",
                m.created_at.strftime("%Y-%m-%d\n%H:%M:%S UTC"),
                escape(_compact(m.parameters).replace(", ", "\n")),
                escape(_compact(m.metrics).replace(", ", "\n")),
            )
        console.print(table)
