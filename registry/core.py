"""The registry database: connection, migrations and serialised writes, on SQLite or PostgreSQL.

SQLite (a file, the default) suits one machine; PostgreSQL is the shared backend. Writers that
must not interleave (migrations, ``apply``) take :meth:`Registry.write_lock`: an advisory
transaction lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.exc import OperationalError

from engine.errors import FeaturestreamError
from registry.schema import LATEST, MIGRATIONS, schema_migrations

__all__ = ["Registry", "RegistryError", "now"]


class RegistryError(FeaturestreamError):
    """The registry refused an operation or could not be reached."""


def now() -> datetime:
    return datetime.now(UTC)


def _sqlite_engine(url: str) -> Engine:
    path = url.removeprefix("sqlite:///")
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60})

    # pysqlite's own transaction handling defers BEGIN; take control so BEGIN IMMEDIATE works.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        dbapi_conn.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("fs_immediate") else "BEGIN")

    return engine


class Registry:
    """A connection to one registry database; migrates it to the latest schema on open."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.engine = _sqlite_engine(url)
        elif url.startswith("postgresql"):
            self.engine = create_engine(
                url.replace("postgresql://", "postgresql+psycopg://", 1), pool_pre_ping=True
            )
        else:
            raise RegistryError(
                f"unsupported registry URL {url!r}; use sqlite:///path/registry.db or postgresql://user@host/db"
            )
        try:
            self.migrate()
        except OperationalError as exc:
            raise RegistryError(f"registry at {self.safe_url} is unreachable: {exc.orig}") from exc

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def write_lock(self, name: str = "registry") -> Iterator[Connection]:
        """A transaction no other writer of the same lock name runs concurrently with."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.info["fs_immediate"] = True
            try:
                with conn.begin():
                    if self.dialect == "postgresql":
                        key = zlib.crc32(f"featurestream:{name}".encode())
                        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
                    yield conn
            finally:
                conn.info.pop("fs_immediate", None)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def schema_version(self) -> int:
        with self.read() as conn:
            if not self.engine.dialect.has_table(conn, schema_migrations.name):
                return 0
            return int(
                conn.execute(
                    select(schema_migrations.c.version).order_by(schema_migrations.c.version.desc()).limit(1)
                ).scalar()
                or 0
            )

    def migrate(self) -> int:
        """Apply pending migrations; safe to race from several processes. Returns the version."""
        with self.write_lock("migrate") as conn:
            schema_migrations.create(conn, checkfirst=True)
            done = set(conn.execute(select(schema_migrations.c.version)).scalars())
            for version in sorted(MIGRATIONS):
                if version in done:
                    continue
                for step in MIGRATIONS[version]:
                    if isinstance(step, str):
                        conn.execute(text(step))
                    else:
                        step.create(conn, checkfirst=True)
                conn.execute(schema_migrations.insert().values(version=version, applied_at=now()))
        return LATEST

    def close(self) -> None:
        self.engine.dispose()
