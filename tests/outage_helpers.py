"""Shared by the outage tests: a restartable private Redis with a password, a steady event feed,
a worker subprocess with its health endpoint, and the exact check of both stores."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Producer

from connectors.delta_store import DeltaOfflineStore
from engine.definitions import FeatureView
from featurestream.client import FeatureStore
from featurestream.local.processes import HOST, _free_port, _redis_bin
from tests.support import read_topic

T0 = 1_700_000_000_000
USERS = 40
PASSWORD = "pw-Xq7-never-logged"


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


class PrivateRedis:
    """A redis-server of one test: password required, every write in an fsynced append-only file,
    so it can be shut down and started again on the same port with its data."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@{HOST}:{self.port}/0"

    def start(self) -> PrivateRedis:
        cmd = [_redis_bin(), "--port", str(self.port), "--bind", HOST, "--requirepass", PASSWORD,
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--dir", str(self.dir),
               "--daemonize", "no"]  # fmt: skip
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(f"redis-server on port {self.port}", self._answers, 15, 0.05)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (self.dir / "redis.log").read_text()
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def wipe(self) -> None:
        """Drop the stopped server's files, so that it starts again empty (as without persistence)."""
        assert self.proc is None
        for path in self.dir.iterdir():
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def stop(self) -> None:
        """A real outage: the server exits (SIGTERM: clean shutdown, append-only file synced)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None


class Feed:
    """Publishes events for USERS users at a steady rate from a thread until stopped."""

    def __init__(self, bootstrap: str, topic: str, per_tick: int = 5, tick: float = 0.1) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
        self.topic = topic
        self.per_tick = per_tick
        self.tick = tick
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feed", daemon=True)

    def start(self) -> Feed:
        self._thread.start()
        return self

    def send(self, n: int) -> None:
        for _ in range(n):
            i = self.sent
            event = {"user_id": f"u{i % USERS}", "amount": float(i), "ts": T0 + i * 1000}
            self.producer.produce(self.topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
            self.sent += 1
        self.producer.poll(0)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            self.send(self.per_tick)

    def stop(self) -> int:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        assert self.producer.flush(120) == 0, "broker did not acknowledge every event"
        return self.sent


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)


@dataclass
class Worker:
    """``featurestream run`` in a subprocess; its output goes to a file (read with :meth:`output`)."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    @classmethod
    def start(cls, pipeline: Path, env: dict[str, str], log: Path, *args: str) -> Worker:
        port = int(env["FEATURESTREAM_METRICS_PORT"])
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "featurestream.cli", "run", str(pipeline), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(proc, log, port)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> tuple[int, str]:
        return get(f"http://127.0.0.1:{self.port}/healthz")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), f"worker exited with {self.proc.returncode}:\n{self.output()[-4000:]}"

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (the worker must exit within ``timeout``)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not exit within {timeout}s of SIGTERM") from None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


def watch_outage(worker: Worker, seconds: float, store: str, view: str) -> list[tuple[int, str]]:
    """Poll ``/healthz`` for ``seconds`` while the worker must stay up; the answers seen.

    Asserts that the worker lived throughout and that ``/healthz`` answered 503 naming ``store``
    and ``view`` at some point.
    """
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        worker.assert_alive()
        seen.append(worker.health())
        time.sleep(0.5)
    worker.assert_alive()
    failing = [body for code, body in seen if code == 503]
    assert failing, f"/healthz never answered 503 during the {store} outage: {seen[-3:]}"
    named = [
        b
        for b in failing
        if any(k.startswith(f"{store}:{view}") for k in json.loads(b).get("writer_errors", {}))
    ]
    assert named, f"no 503 answer names {store}:{view}: {failing[-3:]}"
    return seen


def stored_everything(
    view: FeatureView, redis_url: str, delta_root: Path, prefix: str, expected: int
) -> Callable[[], bool]:
    """A check: Delta holds ``expected`` rows and Redis counts ``expected`` events over all users."""
    offline = DeltaOfflineStore(str(delta_root))
    uri = offline.table_uri(view.name, view.version)
    store = FeatureStore([view], redis_url=redis_url, delta_uri=str(delta_root), redis_prefix=prefix)
    users = [f"u{i}" for i in range(USERS)]

    def check() -> bool:
        try:
            table = offline.read(uri, columns=["_offset"])
            online = store.get_online_features(["pay:events_count_1d"], users, as_of=_far())
        except Exception:  # a store still coming back
            return False
        rows = 0 if table is None else table.num_rows
        return rows == expected and sum(online.values["pay:events_count_1d"]) == expected

    return check


def _far() -> datetime:
    return datetime.fromtimestamp((T0 + 10_000_000) / 1000, UTC)


def assert_exact(view: FeatureView, bootstrap: str, redis_url: str, delta_root: Path, prefix: str) -> int:
    """Redis and Delta hold exactly the topic's events, once each; returns how many."""
    events = [json.loads(m.value()) for m in read_topic(bootstrap, view.source.topic)]
    offline = DeltaOfflineStore(str(delta_root))
    stored = offline.read(offline.table_uri(view.name, view.version))
    assert stored is not None
    pairs = list(
        zip(stored.column("_partition").to_pylist(), stored.column("_offset").to_pylist(), strict=True)
    )
    assert len(pairs) == len(set(pairs)), "an event is stored twice in Delta"
    assert len(pairs) == len(events), (len(pairs), len(events))
    assert sorted(stored.column("amount").to_pylist()) == sorted(e["amount"] for e in events)

    store = FeatureStore([view], redis_url=redis_url, delta_uri=str(delta_root), redis_prefix=prefix)
    users = [f"u{i}" for i in range(USERS)]
    online = store.get_online_features(["pay"], users, as_of=_far())
    mine = {u: [e for e in events if e["user_id"] == u] for u in users}
    assert online.values["pay:events_count_1d"] == [len(mine[u]) for u in users]
    assert online.values["pay:amount_sum_1d"] == [sum(e["amount"] for e in mine[u]) or 0 for u in users]
    assert online.values["pay:amount_last_1d"] == [
        max(((e["ts"], e["amount"]) for e in mine[u]), default=(0, None))[1] for u in users
    ]
    return len(events)
