"""The background store writer against real stores: an outage is backpressure and retry, an error
retrying cannot fix stops it with a logged message, a stop request gives up after the grace."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import redis
from deltalake import write_deltalake

from connectors.redis_store import RedisOnlineStore
from engine.errors import ServiceUnavailable, StoreError
from engine.writer import BackgroundWriter, Backoff, is_transient, new_run
from tests.conftest import Services
from tests.outage_helpers import PASSWORD, PrivateRedis, wait_for
from tests.support import unique

FAST = Backoff(first=0.01, cap=0.2)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_run() -> None:
    new_run()  # each test is its own dataflow run: no writer error surfaced yet


def _pusher(url: str, key: str):
    """A write to a real Redis; ``ping`` first, so that an outage raises the store's own error."""
    store = RedisOnlineStore(url, socket_timeout=1)

    def write(items: list[int]) -> None:
        store.ping()
        store.client.rpush(key, *items)

    return write, store.client


def test_outage_blocks_submit_then_everything_is_written_in_order(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "engine.writer")
    write, client = _pusher(private_redis.url, "w")
    w: BackgroundWriter[int] = BackgroundWriter(write, depth=1, name="redis store of view v", backoff=FAST)
    w.submit([0])
    w.drain()
    private_redis.stop()
    w.submit([1])  # taken by the writer thread, which retries it
    time.sleep(0.5)
    w.submit([2])  # waits in the queue (depth 1)
    blocked = threading.Thread(target=w.submit, args=([3],))
    blocked.start()
    time.sleep(1.0)
    assert blocked.is_alive(), "submit must block while the store is down and the queue is full"
    assert w.error is None
    private_redis.start()
    blocked.join(15)
    assert not blocked.is_alive()
    w.drain()
    assert [int(x) for x in client.lrange("w", 0, -1)] == [0, 1, 2, 3]  # nothing lost, nothing twice
    w.close()
    text = caplog.text
    assert "redis store of view v: write failed" in text and "retrying with backoff" in text
    assert "written again after" in text
    assert PASSWORD not in text and "redis://:***@" in text


def test_an_error_retrying_cannot_fix_stops_the_writer_with_a_logged_message(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(services.redis_url)
    key = unique("wrongtype")
    client.set(key, "a string, not a list")
    calls = []

    def write(items: list[int]) -> None:
        calls.append(items)
        client.rpush(key, *items)  # WRONGTYPE: the data does not fit the store

    w: BackgroundWriter[int] = BackgroundWriter(write, name="redis store of view v", backoff=FAST)
    w.submit([1])
    with pytest.raises(StoreError, match=r"retrying cannot fix it: ResponseError: WRONGTYPE"):
        w.drain()
    assert len(calls) == 1
    assert "redis store of view v: write failed and retrying cannot fix it" in caplog.text
    with pytest.raises(StoreError):
        w.submit([2])  # the dataflow stops at its next call
    w.close()  # raised once already: a second raise while the dataflow unwinds would abort it
    client.delete(key)


def test_a_stop_request_gives_up_on_a_failing_store_after_the_grace(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    write, _ = _pusher(private_redis.url, "g")
    stop = threading.Event()
    name = "redis store of view v (version 1)"
    w: BackgroundWriter[int] = BackgroundWriter(write, name=name, stop=stop, grace=0.5, backoff=FAST)
    private_redis.stop()
    w.submit([1])
    time.sleep(1.0)
    assert w.error is None, "without a stop request a failing store is retried, never abandoned"
    stop.set()
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable) as err:
        w.drain()
    assert time.monotonic() - start < 2.5
    message = str(err.value)
    assert name in message and "replayed on restart" in message and "redis://:***@" in message
    assert PASSWORD not in message and PASSWORD not in caplog.text
    assert any(r.levelno == logging.ERROR and "replayed on restart" in r.getMessage() for r in caplog.records)
    w.finish()
    w.close()


def test_shutdown_alone_bounds_the_wait_and_raises_only_the_first_error(private_redis: PrivateRedis) -> None:
    """finish() (a sink closing, maybe while the dataflow unwinds from another error) gets the
    grace even without a stop request, and only the first writer error of the run is raised."""
    write, _ = _pusher(private_redis.url, "f")
    private_redis.stop()
    first: BackgroundWriter[int] = BackgroundWriter(write, grace=0.3, backoff=FAST)
    second: BackgroundWriter[int] = BackgroundWriter(write, grace=0.3, backoff=FAST)
    with pytest.raises(ServiceUnavailable):
        first.finish([1])
    second.finish([2])  # would abort the process if raised during the unwinding
    assert isinstance(second.error, ServiceUnavailable)
    first.close()
    second.close()


def test_backoff_doubles_up_to_the_cap() -> None:
    b = Backoff(first=0.1, cap=5.0)
    for attempt, full in [(1, 0.1), (2, 0.2), (3, 0.4), (6, 3.2), (7, 5.0), (60, 5.0)]:
        delays = [b.delay(attempt) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays), (attempt, min(delays), max(delays))


def test_transient_errors_are_the_ones_a_returning_store_can_fix(tmp_path: Path, services: Services) -> None:
    def raised(fn) -> BaseException:
        try:
            fn()
        except BaseException as exc:
            return exc
        raise AssertionError("expected an error")

    closed = redis.Redis(port=PrivateRedis(tmp_path / "unused").port, socket_connect_timeout=1)
    down = raised(closed.ping)
    assert isinstance(down, redis.ConnectionError) and is_transient(down)

    def wrapped() -> None:
        try:
            closed.rpush("k", 1)
        except redis.RedisError as exc:
            raise StoreError("online write failed") from exc

    assert is_transient(raised(wrapped))  # the cause chain decides

    client = redis.Redis.from_url(services.redis_url)
    key = unique("t")
    client.set(key, "x")
    assert not is_transient(raised(lambda: client.rpush(key, 1)))  # WRONGTYPE
    client.delete(key)

    table = tmp_path / "delta"
    write_deltalake(str(table), pa.table({"a": [1]}))
    mismatch = raised(lambda: write_deltalake(str(table), pa.table({"a": ["x"]}), mode="append"))
    assert not is_transient(mismatch)  # a schema mismatch: the data does not fit the table
    log_dir = table / "_delta_log"
    log_dir.rename(table / "away")
    log_dir.write_text("")
    unreachable = raised(lambda: write_deltalake(str(table), pa.table({"a": [2]}), mode="append"))
    assert isinstance(unreachable, OSError) and is_transient(unreachable)
    assert not is_transient(raised(lambda: [][1]))  # a programming error


def test_health_names_the_failing_store_without_secrets_and_recovers(private_redis: PrivateRedis) -> None:
    from engine.observe import Health

    health = Health()
    store = RedisOnlineStore(private_redis.url, socket_timeout=1)
    private_redis.stop()
    err = wait_for("a Redis error", lambda: _error(store.ping), 5)
    health.writer_failed("redis:clicks:abc", err)
    report = health.report()
    assert report["status"] == "failing"
    assert list(report["writer_errors"]) == ["redis:clicks:abc"]
    assert "redis://:***@" in report["writer_errors"]["redis:clicks:abc"]
    assert PASSWORD not in str(report)
    health.writer_ok("redis:clicks:abc")
    assert health.report()["status"] == "ok"


def _error(fn) -> BaseException | None:
    try:
        fn()
    except Exception as exc:
        return exc
    return None
