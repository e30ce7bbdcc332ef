"""Card-transaction features: spend and activity per user over sliding and tumbling windows.

Deploy with ``featurestream run pipelines/transactions.py`` or
``python -m bytewax.run pipelines/transactions.py:flow -w 2``.
"""

from __future__ import annotations

from typing import Any

from featurestream import Aggregation, Entity, EventSource, FeatureView, Field, Window

user = Entity(name="user", join_keys=("user_id",), description="A card holder.")

transactions = EventSource(
    name="transactions",
    topic="transactions",
    timestamp_field="ts",
    timestamp_format="epoch_millis",
    fields=(
        Field(name="user_id", dtype="str"),
        Field(name="card_id", dtype="str"),
        Field(name="merchant", dtype="str"),
        Field(name="category", dtype="str"),
        Field(name="amount", dtype="float"),
        Field(name="country", dtype="str"),
        Field(name="is_online", dtype="bool"),
    ),
    description="One event per card authorisation.",
)

user_spend = FeatureView(
    name="user_spend",
    entity=user,
    source=transactions,
    aggregations=(
        *(
            Aggregation(function=fn, column=None if fn == "count" else "amount", window=w)
            for w in ("10m", "1h", "1d")
            for fn in ("count", "sum", "mean", "max")
        ),
        Aggregation(function="stddev", column="amount", window="1d"),
        Aggregation(function="last", column="amount", window="1d"),
        Aggregation(function="sum", column="is_online", window="1h", name="online_tx_1h"),
        Aggregation(function="sum", column="amount", window=Window.tumbling("1h")),
    ),
    tile_size="1m",
    allowed_lateness="2m",
    owner="risk-team@example.com",
    description="Spend velocity per user, for fraud scoring.",
    tags={"domain": "payments"},
)

views = [user_spend]


def __getattr__(name: str) -> Any:
    # Built on first access, so importing the definitions starts and connects to nothing.
    if name == "flow":
        from featurestream.runtime import dataflow

        return dataflow(*views)
    raise AttributeError(name)
