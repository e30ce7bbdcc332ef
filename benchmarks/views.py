"""The view the throughput benchmark computes (importable by the worker processes it starts)."""

from __future__ import annotations

from engine.definitions import Aggregation, Entity, FeatureView
from pipelines.transactions import transactions


def bench_view(topic: str) -> FeatureView:
    """3 windows x 4 aggregations over the example card-transaction source, on ``topic``."""
    source = transactions.model_copy(update={"topic": topic})
    aggs = tuple(
        Aggregation(function=f, column=None if f == "count" else "amount", window=w)
        for w in ("10m", "1h", "1d")
        for f in ("count", "sum", "mean", "max")
    )
    return FeatureView(
        name="bench",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=source,
        aggregations=aggs,
        tile_size="1m",
        allowed_lateness="2m",
    )
