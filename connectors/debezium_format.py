"""Debezium's PostgreSQL change-event format: message keys, envelopes and Kafka Connect schemas.

What Debezium's PostgreSQL connector writes with the JSON converter, for the tables the change
source publishes (see :mod:`connectors.postgres_cdc` for the field meanings and ordering rules).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from connectors import pgoutput as pgo

__all__ = ["VERSION", "CdcTable", "connect_schemas", "envelope", "message_key"]

VERSION = "2.7.3.Final"  # the Debezium envelope version this source writes (source.version)


@dataclass
class CdcTable:
    """A published table: its columns, primary key, topic and (with schemas) Connect schemas."""

    schema: str
    name: str
    columns: tuple[pgo.Column, ...]
    key: tuple[str, ...]
    topic: str
    schema_key: dict[str, Any] | None = None
    schema_value: dict[str, Any] | None = None


def envelope(
    table: CdcTable,
    op: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    *,
    server_name: str,
    db: str,
    schemas: bool,
    lsn: int,
    ts_ms: int,
    tx_id: int | None,
    snapshot: str,
    commit: int | None,
) -> bytes:
    """The message value of one change; ``server_name`` is the topic prefix (``source.name``)."""
    payload = {
        "before": before,
        "after": after,
        "source": {
            "version": VERSION,
            "connector": "postgresql",
            "name": server_name,
            "ts_ms": ts_ms,
            "snapshot": snapshot,
            "db": db,
            "sequence": json.dumps([None if commit is None else str(commit), str(lsn)]),
            "schema": table.schema,
            "table": table.name,
            "txId": tx_id,
            "lsn": lsn,
            "xmin": None,
        },
        "op": op,
        "ts_ms": int(time.time() * 1000),
        "transaction": None,
    }
    body = {"schema": table.schema_value, "payload": payload} if schemas else payload
    return json.dumps(body, separators=(",", ":")).encode()


def message_key(table: CdcTable, row: dict[str, Any], schemas: bool) -> bytes:
    """The message key: the row's primary key columns as JSON."""
    key = {k: row[k] for k in table.key}
    body = {"schema": table.schema_key, "payload": key} if schemas else key
    return json.dumps(body, separators=(",", ":")).encode()


def connect_schemas(table: CdcTable, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kafka Connect schemas of a table's key and envelope, as Debezium's JsonConverter writes them."""
    base = f"{prefix}.{table.schema}.{table.name}"

    def fld(col: pgo.Column, optional: bool) -> dict[str, Any]:
        kind, name = pgo.connect_type(col)
        out: dict[str, Any] = {"type": kind, "optional": optional}
        if name:
            out["name"] = name
            out["version"] = 1
        out["field"] = col.name
        return out

    key = {
        "type": "struct",
        "fields": [fld(c, False) for c in table.columns if c.name in table.key],
        "optional": False,
        "name": f"{base}.Key",
    }
    row = {
        "type": "struct",
        "fields": [fld(c, c.name not in table.key) for c in table.columns],
        "optional": True,
        "name": f"{base}.Value",
    }

    def simple(name: str, kind: str, optional: bool = False) -> dict[str, Any]:
        return {"type": kind, "optional": optional, "field": name}

    source = {
        "type": "struct",
        "fields": [
            simple("version", "string"),
            simple("connector", "string"),
            simple("name", "string"),
            simple("ts_ms", "int64"),
            {
                "type": "string",
                "optional": True,
                "name": "io.debezium.data.Enum",
                "version": 1,
                "parameters": {"allowed": "true,last,false,incremental"},
                "default": "false",
                "field": "snapshot",
            },
            simple("db", "string"),
            simple("sequence", "string", True),
            simple("schema", "string"),
            simple("table", "string"),
            simple("txId", "int64", True),
            simple("lsn", "int64", True),
            simple("xmin", "int64", True),
        ],
        "optional": False,
        "name": "io.debezium.connector.postgresql.Source",
        "field": "source",
    }
    transaction = {
        "type": "struct",
        "fields": [
            simple("id", "string"),
            simple("total_order", "int64"),
            simple("data_collection_order", "int64"),
        ],
        "optional": True,
        "name": "event.block",
        "version": 1,
        "field": "transaction",
    }
    value = {
        "type": "struct",
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            source,
            simple("op", "string"),
            simple("ts_ms", "int64", True),
            transaction,
        ],
        "optional": False,
        "name": f"{base}.Envelope",
        "version": 1,
    }
    return key, value
