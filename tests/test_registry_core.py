"""Registry database: migrations are idempotent and safe to race, errors are clear."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from sqlalchemy import inspect

from registry.core import Registry, RegistryError
from registry.schema import LATEST, metadata
from tests.registry_fixtures import *  # noqa: F403


def test_open_migrates_to_latest(registry: Registry) -> None:
    assert registry.schema_version() == LATEST
    tables = set(inspect(registry.engine).get_table_names())
    assert {t.name for t in metadata.sorted_tables} <= tables


def _open(url: str) -> int:
    reg = Registry(url)
    try:
        return reg.schema_version()
    finally:
        reg.close()


def test_concurrent_opens_migrate_once(registry_url: str) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        assert pool.map(_open, [registry_url] * 8) == [LATEST] * 8
    reg = Registry(registry_url)
    with reg.read() as conn:
        rows = conn.exec_driver_sql("SELECT version FROM fs_schema_migrations").fetchall()
    reg.close()
    assert sorted(r[0] for r in rows) == list(range(1, LATEST + 1))


def test_unreachable_and_unsupported_urls_are_named() -> None:
    with pytest.raises(RegistryError, match="unreachable"):
        Registry("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(RegistryError, match="unsupported registry URL"):
        Registry("mysql://x/y")
