"""Order features from a database table: Debezium change events of ``public.orders``.

The topic ``dbserver1.public.orders`` holds what Debezium's PostgreSQL connector (or
``featurestream cdc postgres``) publishes for the table: a change event per insert, update and
delete, keyed by the primary key. Deploy with ``featurestream run pipelines/orders_cdc.py``.
"""

from __future__ import annotations

from typing import Any

from featurestream import CdcSource, Entity, Field, TableFeature, TableView

orders = CdcSource(
    name="orders",
    topic="dbserver1.public.orders",
    primary_key=("id",),
    fields=(
        Field(name="id", dtype="int"),
        Field(name="customer_id", dtype="str", nullable=True),
        Field(name="amount", dtype="float", nullable=True),  # numeric: number or decimal string
        Field(name="status", dtype="str", nullable=True),
    ),
    description="Rows of public.orders, as Debezium change events.",
)

# Open orders per customer: every order row that exists now, grouped by its customer.
customer_orders = TableView(
    name="customer_orders",
    entity=Entity(name="customer", join_keys=("customer_id",)),
    source=orders,
    features=(
        TableFeature(function="count", name="orders"),
        TableFeature(function="sum", column="amount", name="order_value"),
        TableFeature(function="mean", column="amount"),
        TableFeature(function="max", column="amount"),
        TableFeature(function="count_distinct", column="status"),
    ),
    owner="risk-team@example.com",
    description="Current orders per customer.",
)

# The current status and amount of one order (keyed by the primary key itself).
order_state = TableView(
    name="order_state",
    entity=Entity(name="order", join_keys=("id",)),
    source=orders,
    features=(
        TableFeature(function="latest", column="status"),
        TableFeature(function="latest", column="amount"),
    ),
)

views = [customer_orders, order_state]


def __getattr__(name: str) -> Any:
    # Built on first access, so importing the definitions starts and connects to nothing.
    if name == "flow":
        from featurestream.runtime import dataflow

        return dataflow(*views)
    raise AttributeError(name)
