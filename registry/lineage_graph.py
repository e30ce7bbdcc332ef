"""The lineage graph: nodes (source topics, feature view versions, training sets, models) and the
edges from each upstream node to what was built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "LineageGraph", "LineageNode"]

KINDS = ("topic", "view_version", "training_set", "model")


@dataclass(frozen=True)
class LineageNode:
    id: str  # "<kind>:<key>", unique in a graph
    kind: str  # one of KINDS
    label: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class LineageGraph:
    name: str
    nodes: dict[str, LineageNode] = field(default_factory=dict)
    edges: set[tuple[str, str]] = field(default_factory=set)  # (upstream id, downstream id)

    def add(self, node: LineageNode) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def of_kind(self, kind: str) -> list[LineageNode]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def upstream(self, node_id: str) -> list[str]:
        return sorted(a for a, b in self.edges if b == node_id)

    def downstream(self, node_id: str) -> list[str]:
        return sorted(b for a, b in self.edges if a == node_id)

    def label_edges(self) -> set[tuple[str, str]]:
        """Edges as (upstream label, downstream label): handy to read and to assert on."""
        return {(self.nodes[a].label, self.nodes[b].label) for a, b in self.edges}
