"""Store and broker outages while a worker runs: backpressure and retry, never a crash or a skip.

Each test runs ``featurestream run`` as a subprocess against real services, takes one of them
away mid-stream and brings it back, then checks that Redis and Delta hold exactly the topic's
events. The Redis is a private one with a password in its URL, so every answer and log line can
be checked for leaks.

The scenarios (the long outages: Redis and Delta 30 s, the broker 20 s; a stop during an outage;
an error retrying cannot fix) run at the same time, each with its own worker, topic and Redis (the
broker one on its own broker), so that the module takes about as long as the longest one; each is
still reported as its own test.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from featurestream.local.ephemeral import EphemeralServices
from featurestream.local.processes import _free_port
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.outage_helpers import (
    PASSWORD,
    Feed,
    PrivateRedis,
    Worker,
    assert_exact,
    stored_everything,
    wait_for,
    watch_outage,
)
from tests.support import create_topic, pay_pipeline, unique, worker_env

GRACE = 10.0  # engine.writer.STOP_GRACE_SECONDS


def _setup(tmp_path: Path, topic: str) -> tuple[Path, object]:
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pay_pipeline(topic))
    return pipeline, load_views(pipeline)[0]


def _healthy(worker: Worker) -> bool:
    worker.assert_alive()
    return worker.health()[0] == 200


def _no_secret(text: str) -> None:
    assert PASSWORD not in text, "the Redis password leaked"


def _redis_outage(services: Services, tmp_path: Path, empty: bool = False) -> None:
    """Redis stops for 30 s, then returns with its data, or (``empty``) without it: the worker
    must then rebuild every entity it holds from state."""
    name = create_topic(services.kafka, unique("events"), 2)
    pipeline, view = _setup(tmp_path, name)
    redis_server = PrivateRedis(tmp_path / "redis").start()
    prefix = unique("out")
    env = worker_env(services.kafka, redis_server.url, tmp_path, prefix, _free_port())
    feed = Feed(services.kafka, name).start()
    worker = Worker.start(pipeline, env, tmp_path / "worker.log")
    try:
        wait_for("a healthy worker", lambda: _healthy(worker), 60)
        time.sleep(2)
        redis_server.stop()
        seen = watch_outage(worker, 30, "redis", "pay")
        if empty:
            redis_server.wipe()
        redis_server.start()
        wait_for("/healthz 200 after Redis returned", lambda: _healthy(worker), 30)
        time.sleep(1)
        sent = feed.stop()
        wait_for(
            "every event in Redis and Delta",
            stored_everything(view, redis_server.url, tmp_path / "delta", prefix, sent),
            60,
        )
        worker.assert_alive()
        assert worker.stop() == 0
        out = worker.output()
        for _, body in seen:
            _no_secret(body)
        _no_secret(out)
        assert "redis store of view pay" in out and "retrying" in out, out[-3000:]
        assert "worker exiting: stop requested" in out, out[-3000:]
        if empty:
            assert "lost its data" in out, out[-3000:]
        assert assert_exact(view, services.kafka, redis_server.url, tmp_path / "delta", prefix) == sent
    finally:
        feed.stop()
        worker.kill()
        redis_server.stop()


def _delta_outage(services: Services, tmp_path: Path) -> None:
    """The Delta table's log becomes an unwritable path (a file where its directory was) for 30 s.

    chmod would not do: the suite may run as root, which ignores permissions.
    """
    name = create_topic(services.kafka, unique("events"), 2)
    pipeline, view = _setup(tmp_path, name)
    redis_server = PrivateRedis(tmp_path / "redis").start()
    prefix = unique("out")
    env = worker_env(services.kafka, redis_server.url, tmp_path, prefix, _free_port())
    feed = Feed(services.kafka, name).start()
    worker = Worker.start(pipeline, env, tmp_path / "worker.log")
    log_dir = tmp_path / "delta" / f"{view.name}__{view.version}" / "_delta_log"
    away = log_dir.with_name("_delta_log.away")
    try:
        wait_for("a healthy worker", lambda: _healthy(worker), 60)
        wait_for("the first Delta commit", log_dir.is_dir, 30)
        log_dir.rename(away)
        log_dir.write_text("not a directory")
        seen = watch_outage(worker, 30, "delta", "pay")
        log_dir.unlink()
        away.rename(log_dir)
        wait_for("/healthz 200 after Delta returned", lambda: _healthy(worker), 30)
        sent = feed.stop()
        wait_for(
            "every event in Redis and Delta",
            stored_everything(view, redis_server.url, tmp_path / "delta", prefix, sent),
            60,
        )
        assert worker.stop() == 0
        out = worker.output()
        for _, body in seen:
            _no_secret(body)
        _no_secret(out)
        assert "delta store of view pay" in out and "retrying" in out, out[-3000:]
        assert "worker exiting: stop requested" in out, out[-3000:]
        assert assert_exact(view, services.kafka, redis_server.url, tmp_path / "delta", prefix) == sent
    finally:
        if away.exists():
            if log_dir.is_file():
                log_dir.unlink()
            away.rename(log_dir)
        feed.stop()
        worker.kill()
        redis_server.stop()


def _broker_outage(services: Services, tmp_path: Path) -> None:
    """A private broker (memory storage, so it is paused rather than restarted) stops answering."""
    with EphemeralServices(tmp_path / "services") as eps:
        name = create_topic(eps.kafka_bootstrap_servers, unique("pay"), 2)
        pipeline, view = _setup(tmp_path, name)
        prefix = unique("out")
        env = worker_env(eps.kafka_bootstrap_servers, eps.redis_url, tmp_path, prefix, _free_port())
        feed = Feed(eps.kafka_bootstrap_servers, name)
        feed.send(300)
        worker = Worker.start(pipeline, env, tmp_path / "worker.log")
        broker = eps.pids["kafka"]
        try:
            wait_for(
                "the first events stored",
                stored_everything(view, eps.redis_url, tmp_path / "delta", prefix, 300),
                60,
            )
            os.kill(broker, signal.SIGSTOP)
            try:
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    worker.assert_alive()
                    time.sleep(0.5)
            finally:
                os.kill(broker, signal.SIGCONT)
            feed.send(300)
            sent = feed.stop()
            wait_for(
                "every event in Redis and Delta",
                stored_everything(view, eps.redis_url, tmp_path / "delta", prefix, sent),
                90,
            )
            assert worker.stop() == 0
            assert "worker exiting: stop requested" in worker.output()
            assert assert_exact(view, eps.kafka_bootstrap_servers, eps.redis_url, tmp_path / "delta", prefix)
        finally:
            os.kill(broker, signal.SIGCONT)
            feed.stop()
            worker.kill()


def _stop_during_redis_outage(services: Services, tmp_path: Path) -> None:
    """A stop asked while Redis is down exits after the grace, naming the store; a resumed bounded
    run ends exact."""
    name = create_topic(services.kafka, unique("events"), 2)
    pipeline, view = _setup(tmp_path, name)
    redis_server = PrivateRedis(tmp_path / "redis").start()
    prefix = unique("out")
    env = worker_env(services.kafka, redis_server.url, tmp_path, prefix, _free_port())
    recovery = ["--recovery-dir", str(tmp_path / "recovery"), "--snapshot-seconds", "1"]
    feed = Feed(services.kafka, name)
    feed.send(200)
    worker = Worker.start(pipeline, env, tmp_path / "worker.log", *recovery)
    try:
        wait_for(
            "the first events stored",
            stored_everything(view, redis_server.url, tmp_path / "delta", prefix, 200),
            60,
        )
        redis_server.stop()
        feed.send(200)
        feed.producer.flush(30)

        def failing() -> bool:
            worker.assert_alive()
            code, body = worker.health()
            return code == 503 and any(k.startswith("redis:pay") for k in json.loads(body)["writer_errors"])

        wait_for("/healthz 503 naming redis", failing, 30)
        start = time.monotonic()
        code = worker.stop(timeout=GRACE + 20)  # one SIGTERM (a second one exits at once)
        took = time.monotonic() - start
        out = worker.output()
        assert code != 0, out[-3000:]
        assert took < GRACE + 15, (took, out[-3000:])
        _no_secret(out)
        lines = [line for line in out.splitlines() if "replayed on restart" in line]
        assert any("redis store of view pay" in line for line in lines), out[-3000:]
        assert "worker exiting on an error: ServiceUnavailable: redis store of view pay" in out
    finally:
        worker.kill()

    # Redis returns with its data; a bounded run resumes from the last snapshot and ends exact.
    redis_server.start()
    try:
        resumed = Worker.start(
            pipeline, {**env, "FEATURESTREAM_BOUNDED": "true"}, tmp_path / "resumed.log", *recovery
        )
        try:
            assert resumed.proc.wait(120) == 0, resumed.output()[-3000:]
        finally:
            resumed.kill()
        _no_secret(resumed.output())
        sent = feed.stop()
        assert assert_exact(view, services.kafka, redis_server.url, tmp_path / "delta", prefix) == sent
    finally:
        redis_server.stop()


def _unfixable_error(services: Services, tmp_path: Path) -> None:
    """A Delta table of another schema where the view's table belongs: not an outage, a mismatch."""
    name = create_topic(services.kafka, unique("events"), 1)
    pipeline, view = _setup(tmp_path, name)
    uri = tmp_path / "delta" / f"{view.name}__{view.version}"
    write_deltalake(str(uri), pa.table({"entity": ["x"], "unrelated": [1]}))
    redis_server = PrivateRedis(tmp_path / "redis").start()
    env = worker_env(services.kafka, redis_server.url, tmp_path, unique("out"), _free_port())
    Feed(services.kafka, name).send(50)
    worker = Worker.start(pipeline, env, tmp_path / "worker.log")
    try:
        code = worker.proc.wait(60)
    finally:
        worker.kill()
        redis_server.stop()
    out = worker.output()
    assert code > 0, (code, out[-3000:])  # an exit with a code, not an abort by a signal
    _no_secret(out)
    assert f"delta store of view pay (version {view.version}): write failed and retrying cannot fix it" in out
    assert "worker exiting on an error: StoreError: delta store of view pay" in out, out[-3000:]


_SCENARIOS: dict[str, Callable[[Services, Path], None]] = {
    "redis": _redis_outage,
    "delta": _delta_outage,
    "broker": _broker_outage,
    "redis_empty": lambda services, tmp_path: _redis_outage(services, tmp_path, empty=True),
    "stop_during_redis": _stop_during_redis_outage,
    "unfixable": _unfixable_error,
}
_SCENARIO_OF = {  # test -> its scenario
    "test_redis_outage_is_survived_and_stores_end_exact": "redis",
    "test_redis_back_empty_after_an_outage_is_rebuilt_and_stores_end_exact": "redis_empty",
    "test_delta_outage_is_survived_and_delta_ends_exact": "delta",
    "test_broker_outage_is_survived_and_stores_end_exact": "broker",
    "test_stop_during_redis_outage_exits_after_the_grace_and_resumes": "stop_during_redis",
    "test_an_error_retrying_cannot_fix_stops_the_worker_with_its_cause": "unfixable",
}


@pytest.fixture(scope="module")
def outages(
    request: pytest.FixtureRequest, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """The selected tests' scenarios, started together in threads; each test awaits its own."""
    wanted = [_SCENARIO_OF[item.name] for item in request.session.items if item.module is request.module]
    with ThreadPoolExecutor(max(1, len(wanted)), thread_name_prefix="outage") as pool:
        yield {
            name: pool.submit(_SCENARIOS[name], services, tmp_path_factory.mktemp(f"{name}_outage"))
            for name in wanted
        }


def test_redis_outage_is_survived_and_stores_end_exact(outages: dict[str, Future]) -> None:
    outages["redis"].result(timeout=300)


def test_redis_back_empty_after_an_outage_is_rebuilt_and_stores_end_exact(
    outages: dict[str, Future],
) -> None:
    outages["redis_empty"].result(timeout=300)


def test_delta_outage_is_survived_and_delta_ends_exact(outages: dict[str, Future]) -> None:
    outages["delta"].result(timeout=300)


def test_broker_outage_is_survived_and_stores_end_exact(outages: dict[str, Future]) -> None:
    outages["broker"].result(timeout=300)


def test_stop_during_redis_outage_exits_after_the_grace_and_resumes(outages: dict[str, Future]) -> None:
    outages["stop_during_redis"].result(timeout=300)


def test_an_error_retrying_cannot_fix_stops_the_worker_with_its_cause(outages: dict[str, Future]) -> None:
    outages["unfixable"].result(timeout=300)
