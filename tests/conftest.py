"""Fixtures: real Kafka (Tansu or a configured cluster), real Redis, Delta in a temp dir.

By default the suite starts its own broker and redis-server (torn down at the end), so it needs
nothing running and never touches other data. ``FEATURESTREAM_TEST_KAFKA`` /
``FEATURESTREAM_TEST_REDIS`` point it at existing servers instead.
"""

from __future__ import annotations

import compileall
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from engine.dataflow import RuntimeConfig
from featurestream.local.ephemeral import EphemeralServices
from tests.support import create_topic, make_runtime, unique

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the project once: the suite starts hundreds of worker and CLI subprocesses,
    and with ``PYTHONDONTWRITEBYTECODE`` set each one would compile every project module again.
    A module edited later is simply compiled from source again (its cache is out of date)."""
    for package in ("featurestream", "engine", "connectors", "registry", "pipelines"):
        compileall.compile_dir(ROOT / package, quiet=1)


@dataclass(frozen=True)
class Services:
    kafka: str
    redis_url: str


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    kafka = os.environ.get("FEATURESTREAM_TEST_KAFKA")
    redis_url = os.environ.get("FEATURESTREAM_TEST_REDIS")
    if kafka and redis_url:
        yield Services(kafka, redis_url)
        return
    with EphemeralServices(tmp_path_factory.mktemp("services")) as eps:
        yield Services(kafka or eps.kafka_bootstrap_servers, redis_url or eps.redis_url)


@pytest.fixture
def topic(services: Services) -> Callable[..., str]:
    """``topic(partitions=1)`` creates a fresh topic (and its .dlq) and returns its name."""

    def make(partitions: int = 1, prefix: str = "events") -> str:
        return create_topic(services.kafka, unique(prefix), partitions)

    return make


@pytest.fixture
def runtime(services: Services, tmp_path: Path) -> RuntimeConfig:
    """A runtime isolated to this test: own Redis key prefix, own Delta root, bounded run."""
    return make_runtime(services.kafka, services.redis_url, tmp_path, "test")


@pytest.fixture
def redis_client(services: Services) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(services.redis_url)
    yield client
    client.close()
