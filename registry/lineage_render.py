"""Rendering of a :class:`~registry.lineage_graph.LineageGraph` as a PNG: one column per node kind,
left to right, ordered to keep edge crossings few."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from registry.core import RegistryError
from registry.lineage_graph import KINDS, LineageGraph, LineageNode

__all__ = ["render_lineage"]


_COLORS = {"topic": "#d9e8fb", "view_version": "#d5f0d5", "training_set": "#fde9c8", "model": "#f3d3e6"}
_CENTRED = {"ha": "center", "va": "center"}
_TITLES = {"topic": "source topic", "view_version": "feature view version", "training_set": "training set"}


def _note(node: LineageNode) -> str:
    d = node.detail
    if node.kind == "view_version":
        return f"{d['version_hash']} ({d['status']})"
    if node.kind == "training_set":
        return f"{d['rows']:,} entity rows"
    if node.kind == "model":
        text = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d["metrics"].items()
        )
        return textwrap.shorten(text, 34, placeholder="...")
    return ""


def _layers(graph: LineageGraph) -> list[list[str]]:
    """Nodes per column, each column ordered by the mean row of its upstream nodes (fewer crossings)."""
    layers: list[list[str]] = []
    pos: dict[str, float] = {}
    for kind in KINDS:
        ids = sorted(n.id for n in graph.of_kind(kind))
        if not ids:
            continue

        def key(i: str) -> tuple[float, str]:
            ups = [pos[u] for u in graph.upstream(i) if u in pos]
            return (sum(ups) / len(ups) if ups else math.inf, graph.nodes[i].label)

        ids.sort(key=key)
        pos.update({i: float(r) for r, i in enumerate(ids)})
        layers.append(ids)
    return layers


def render_lineage(graph: LineageGraph, path: str | Path) -> Path:
    """Draw the graph left to right (topics, view versions, training sets, models) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    layers = _layers(graph)
    if not layers:
        raise RegistryError(f"the lineage of {graph.name!r} is empty; nothing to draw")
    col_w, box_w, row_h, box_h = 3.4, 2.6, 1.1, 0.75
    tallest = max(len(layer) for layer in layers)
    width, height = col_w * len(layers) + 0.4, row_h * tallest + 1.2
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    centre: dict[str, tuple[float, float]] = {}
    for c, layer in enumerate(layers):
        x = 0.2 + col_w * c + col_w / 2
        top = (height - 0.8) / 2 + row_h * len(layer) / 2
        kind = graph.nodes[layer[0]].kind
        ax.text(x, height - 0.35, _TITLES.get(kind, kind), fontsize=11, fontweight="bold", **_CENTRED)
        for r, node_id in enumerate(layer):
            y = top - row_h * r - row_h / 2
            centre[node_id] = (x, y)
            ax.add_patch(
                FancyBboxPatch(
                    (x - box_w / 2, y - box_h / 2),
                    box_w,
                    box_h,
                    boxstyle="round,pad=0.04",
                    facecolor=_COLORS[kind],
                    edgecolor="#555555",
                    linewidth=1.0,
                )
            )
            node = graph.nodes[node_id]
            lines = textwrap.wrap(textwrap.shorten(node.label, 56, placeholder="..."), 28)
            note = _note(node)
            ax.text(x, y + (0.1 if note else 0), "\n".join(lines), fontsize=9, **_CENTRED)
            if note:
                ax.text(x, y - 0.22, note, fontsize=7.5, color="#555555", **_CENTRED)
    for a, b in sorted(graph.edges):
        (xa, ya), (xb, yb) = centre[a], centre[b]
        ax.annotate(
            "",
            xy=(xb - box_w / 2 - 0.05, yb),
            xytext=(xa + box_w / 2 + 0.05, ya),
            arrowprops={"arrowstyle": "-|>", "color": "#444444", "linewidth": 1.0},
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out
