"""Debezium change events as Debezium documents them, and a table oracle for CDC tests.

The envelope follows Debezium's PostgreSQL connector: value ``{before, after, source, op, ts_ms,
transaction}`` with ``source`` = ``{version, connector, name, ts_ms, snapshot, db, sequence,
schema, table, txId, lsn, xmin}``; key ``{"id": ...}``; with ``schemas.enable=true`` both are
wrapped as ``{"schema": ..., "payload": ...}``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from engine.definitions import Entity, Field
from engine.table_definitions import CdcSource, TableFeature, TableView

FIELDS = (
    Field(name="id", dtype="int"),
    Field(name="customer_id", dtype="str", nullable=True),
    Field(name="amount", dtype="float", nullable=True),
    Field(name="status", dtype="str", nullable=True),
)


def orders_source(topic: str = "dbserver1.public.orders") -> CdcSource:
    return CdcSource(name="orders", topic=topic, primary_key=("id",), fields=FIELDS)


def orders_view(topic: str = "dbserver1.public.orders") -> TableView:
    return TableView(
        name="customer_orders",
        entity=Entity(name="customer", join_keys=("customer_id",)),
        source=orders_source(topic),
        features=(
            TableFeature(function="count"),
            TableFeature(function="count", column="amount"),
            TableFeature(function="sum", column="amount"),
            TableFeature(function="mean", column="amount"),
            TableFeature(function="min", column="amount"),
            TableFeature(function="max", column="amount"),
            TableFeature(function="count_distinct", column="status"),
        ),
    )


def order_view(topic: str = "dbserver1.public.orders") -> TableView:
    """Keyed by the primary key itself: latest values of one order."""
    return TableView(
        name="order_latest",
        entity=Entity(name="order", join_keys=("id",)),
        source=orders_source(topic),
        features=(
            TableFeature(function="latest", column="status"),
            TableFeature(function="latest", column="amount"),
        ),
    )


_VALUE_SCHEMA = {
    "type": "struct",
    "name": "dbserver1.public.orders.Envelope",
    "optional": False,
    "fields": [
        {"type": "struct", "field": "before", "optional": True, "name": "dbserver1.public.orders.Value",
         "fields": [{"type": "int32", "optional": False, "field": "id"},
                    {"type": "string", "optional": True, "field": "customer_id"},
                    {"type": "double", "optional": True, "field": "amount"},
                    {"type": "string", "optional": True, "field": "status"}]},
        {"type": "struct", "field": "after", "optional": True, "name": "dbserver1.public.orders.Value"},
        {"type": "struct", "field": "source", "optional": False,
         "name": "io.debezium.connector.postgresql.Source"},
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
    ],
}  # fmt: skip
_KEY_SCHEMA = {
    "type": "struct",
    "name": "dbserver1.public.orders.Key",
    "optional": False,
    "fields": [{"type": "int32", "optional": False, "field": "id"}],
}


def envelope(
    op: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    ts_ms: int,
    lsn: int | None = None,
    wrapped: bool = False,
) -> bytes:
    source = {
        "version": "2.7.4.Final",
        "connector": "postgresql",
        "name": "dbserver1",
        "ts_ms": ts_ms,
        "snapshot": "true" if op == "r" else "false",
        "db": "postgres",
        "sequence": json.dumps([None, str(lsn)]) if lsn is not None else None,
        "schema": "public",
        "table": "orders",
        "txId": 555,
        "lsn": lsn,
        "xmin": None,
    }
    payload = {
        "before": before,
        "after": after,
        "source": source,
        "op": op,
        "ts_ms": ts_ms + 7,
        "transaction": None,
    }
    return json.dumps({"schema": _VALUE_SCHEMA, "payload": payload} if wrapped else payload).encode()


def key(pk: int, wrapped: bool = False) -> bytes:
    return json.dumps({"schema": _KEY_SCHEMA, "payload": {"id": pk}} if wrapped else {"id": pk}).encode()


def oracle(rows: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The customer_orders features of each customer, recomputed from the table ``rows``."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows.values():
        if r["customer_id"] is not None:
            by.setdefault(r["customer_id"], []).append(r)
    out = {}
    for cust, mine in by.items():
        amounts = [r["amount"] for r in mine if r["amount"] is not None]
        out[cust] = {
            "rows_count": len(mine),
            "amount_count": len(amounts),
            "amount_sum": math.fsum(amounts),
            "amount_mean": math.fsum(amounts) / len(amounts) if amounts else None,
            "amount_min": min(amounts) if amounts else None,
            "amount_max": max(amounts) if amounts else None,
            "status_count_distinct": len({r["status"] for r in mine if r["status"] is not None}),
        }
    return out


EMPTY = {
    "rows_count": 0,
    "amount_count": 0,
    "amount_sum": 0.0,
    "amount_mean": None,
    "amount_min": None,
    "amount_max": None,
    "status_count_distinct": 0,
}
