"""What the change source checks and sets up in PostgreSQL before it reads: ``wal_level``, each
table's columns, primary key and replica identity, and the publication."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from connectors import pgoutput as pgo
from connectors.cdc_config import CdcConfig, CdcError
from connectors.debezium_format import CdcTable, connect_schemas

__all__ = ["prepare"]


def prepare(
    conn: psycopg.Connection[Any], config: CdcConfig, say: Callable[[str], None]
) -> tuple[str, dict[tuple[str, str], CdcTable]]:
    """Check wal_level, the tables' keys and replica identity; create or extend the publication.

    Returns the database name and the published tables by ``(schema, name)``.
    """
    wal = conn.execute("SHOW wal_level").fetchone()
    if not wal or wal[0] != "logical":
        raise CdcError(
            f"PostgreSQL has wal_level={wal[0] if wal else '?'}; logical replication needs "
            "wal_level=logical (set it in postgresql.conf and restart the server)"
        )
    db = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    tables: dict[tuple[str, str], CdcTable] = {}
    for schema, name in config.tables:
        row = conn.execute(
            "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, name),
        ).fetchone()
        if row is None:
            raise CdcError(f"tables: table {schema}.{name} does not exist; create it or fix --tables")
        oid, ident = row
        cols = conn.execute(
            "SELECT a.attname, a.atttypid, a.atttypmod, "
            "coalesce(a.attnum = ANY(i.indkey), false) FROM pg_attribute a "
            "LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary "
            "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (oid,),
        ).fetchall()
        keys = conn.execute(
            "SELECT a.attname FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
            "JOIN pg_attribute a ON a.attnum = k.attnum "
            "WHERE i.indrelid = %s AND i.indisprimary AND a.attrelid = %s ORDER BY k.ord",
            (oid, oid),
        ).fetchall()
        if not keys:
            raise CdcError(
                f"tables: {schema}.{name} has no primary key, which is the Kafka message key of "
                f"its change events; add one (ALTER TABLE {schema}.{name} ADD PRIMARY KEY (...))"
            )
        table = CdcTable(
            schema,
            name,
            tuple(pgo.Column(c[0], int(c[1]), int(c[2]), bool(c[3])) for c in cols),
            tuple(k[0] for k in keys),
            f"{config.topic_prefix}.{schema}.{name}",
        )
        if config.schemas:
            table.schema_key, table.schema_value = connect_schemas(table, config.topic_prefix)
        tables[(schema, name)] = table
        if ident != "f":
            _replica_identity(conn, config, say, schema, name)
    _publication(conn, config, say)
    return db, tables


def _replica_identity(
    conn: psycopg.Connection[Any], config: CdcConfig, say: Callable[[str], None], schema: str, name: str
) -> None:
    ident = sql.Identifier(schema, name)
    if config.set_replica_identity:
        try:
            conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(ident))
            say(f"set REPLICA IDENTITY FULL on {schema}.{name}")
            return
        except psycopg.Error as exc:
            say(f"warning: cannot set REPLICA IDENTITY FULL on {schema}.{name}: {exc}")
    say(
        f"warning: {schema}.{name} lacks REPLICA IDENTITY FULL, so updates carry no before image "
        f"and deletes only the key; run ALTER TABLE {schema}.{name} REPLICA IDENTITY FULL "
        "(or pass --set-replica-identity)"
    )


def _publication(conn: psycopg.Connection[Any], config: CdcConfig, say: Callable[[str], None]) -> None:
    pub = config.publication
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (pub,)).fetchone()
    have = {
        (r[0], r[1])
        for r in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (pub,)
        ).fetchall()
    }
    missing = [t for t in config.tables if t not in have]
    if exists and not missing:
        return
    names = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in missing)
    stmt = "ALTER PUBLICATION {} ADD TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
    try:
        conn.execute(sql.SQL(stmt).format(sql.Identifier(pub), names))
    except psycopg.Error as exc:
        raise CdcError(
            f"publication: cannot {'extend' if exists else 'create'} publication {pub!r}: {exc}. "
            "Create it as the tables' owner (CREATE PUBLICATION ... FOR TABLE ...) or pass "
            "--publication with an existing one"
        ) from None
    say(f"publication {pub}: {'added' if exists else 'created for'} {len(missing)} table(s)")
