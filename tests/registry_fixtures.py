"""Registry fixtures: every registry test runs on SQLite and on a real PostgreSQL server.

PostgreSQL comes from ``FEATURESTREAM_TEST_POSTGRES`` (default: the local server on
127.0.0.1:5432, user postgres); each test gets a fresh database, dropped afterwards.
Import the fixtures into a test module with ``from tests.registry_fixtures import *``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from registry.core import Registry

__all__ = ["pg_admin_url", "registry", "registry_url"]

PG_ADMIN = os.environ.get("FEATURESTREAM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(
            f"PostgreSQL is needed for the shared-registry tests and did not answer at {PG_ADMIN}: {exc}. "
            "Start it (Debian: `apt-get install postgresql` then "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) "
            "or point FEATURESTREAM_TEST_POSTGRES at a server where this user may CREATE DATABASE."
        )
    return PG_ADMIN


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of a fresh, empty registry database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    name = f"fs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    reg = Registry(registry_url)
    yield reg
    reg.close()
