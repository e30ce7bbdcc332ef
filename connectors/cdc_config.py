"""Settings of the PostgreSQL change source, and the LSN and table-list forms it accepts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import FeaturestreamError

__all__ = ["CdcConfig", "CdcError", "format_lsn", "parse_lsn", "parse_tables"]

_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,200}")


class CdcError(FeaturestreamError):
    """The change source cannot start or go on (configuration, permissions, Kafka delivery)."""


def format_lsn(lsn: int) -> str:
    """PostgreSQL's ``X/Y`` text of an LSN."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """The LSN of PostgreSQL's ``X/Y`` text."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def parse_tables(spec: str | list[str]) -> list[tuple[str, str]]:
    """``public.orders,customers`` -> ``[("public", "orders"), ("public", "customers")]``."""
    items = spec.split(",") if isinstance(spec, str) else [t for s in spec for t in s.split(",")]
    out: list[tuple[str, str]] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        parts = raw.split(".")
        if len(parts) > 2 or not all(parts):
            raise CdcError(f"tables: {raw!r} is not a table name; write schema.table, e.g. public.orders")
        out.append((parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0]))
    if not out:
        raise CdcError("tables: no table given; pass --tables schema.table[,schema.table...]")
    return out


@dataclass(frozen=True)
class CdcConfig:
    dsn: str
    tables: list[tuple[str, str]]
    kafka_bootstrap_servers: str
    slot: str = "featurestream_cdc"
    publication: str = "featurestream_cdc"
    topic_prefix: str = "featurestream"
    kafka_config: Mapping[str, Any] = field(default_factory=dict)
    schemas: bool = False
    set_replica_identity: bool = False
    partitions: int = 1
    status_interval: float = 1.0

    def __post_init__(self) -> None:
        if not _SLOT_NAME.fullmatch(self.slot):
            raise CdcError(
                f"slot: {self.slot!r} is not a replication slot name; use lower-case letters, digits "
                "and underscores (at most 63)"
            )
        if not self.topic_prefix or not _TOPIC.fullmatch(self.topic_prefix):
            raise CdcError(
                f"topic_prefix: {self.topic_prefix!r} is not a Kafka topic prefix; use [A-Za-z0-9._-]"
            )
