"""`featurestream run -p 2`: several worker processes lose nothing, at shutdown and after kills.

Events are spread round-robin over 4 partitions (explicit partition numbers, not keys), so every
entity's events are in every partition and both processes write every store: the online tiles
(Redis), the accepted rows (Delta, one table that both processes create and append to) and the
Bytewax recovery partitions they share. Every test compares the stores with an oracle of every
produced event: Delta holds each (partition, offset) once, the online count and sum per entity
are exact.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import redis
from confluent_kafka import Producer

from connectors.delta_store import DeltaOfflineStore
from engine.dataflow import RuntimeConfig
from engine.definitions import FeatureView
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.support import pay_pipeline, unique, worker_env

CLI = [sys.executable, "-m", "featurestream.cli"]
T0 = 1_700_000_000_000
PARTITIONS = 4
ENTITIES = 499  # coprime with PARTITIONS: every entity has events in every partition


def _event(i: int) -> bytes:
    return json.dumps({"user_id": f"u{i % ENTITIES}", "amount": float(i % 997), "ts": T0 + i * 10}).encode()


def _publish(kafka: str, topic: str, start: int, stop: int) -> None:
    """Events ``start..stop``, event i to partition i % PARTITIONS (round-robin, no key)."""
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 20, "acks": "all"})
    for i in range(start, stop):
        p.produce(topic, partition=i % PARTITIONS, value=_event(i))
        if i % 10_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0, "broker did not acknowledge every event"


class PacedPublisher(threading.Thread):
    """Publishes events 0, 1, ... in chunks, one chunk every ``pause`` seconds, until finished,
    while workers run, stop and die."""

    def __init__(self, kafka: str, topic: str, chunk: int = 1_000, pause: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.args = (kafka, topic, chunk, pause)
        self.published = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        kafka, topic, chunk, pause = self.args
        try:
            while not self.stopping.is_set() and self.published < 2_000_000:
                _publish(kafka, topic, self.published, self.published + chunk)
                self.published += chunk
                self.stopping.wait(pause)
        except BaseException as exc:  # re-raised by finish()
            self.error = exc

    def finish(self) -> int:
        """Stop publishing; returns how many events were published."""
        self.stopping.set()
        self.join(120)
        assert not self.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error
        return self.published


class Run:
    """One topic, one pipeline file, and where a run stores (own Delta root and Redis prefix)."""

    def __init__(self, services: Services, tmp_path: Path, topic: str) -> None:
        self.services = services
        self.tmp_path = tmp_path
        self.topic = topic
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.pipeline = tmp_path / "mp_pipeline.py"
        self.pipeline.write_text(pay_pipeline(topic, ("count", "sum"), name="mp"))
        self.view: FeatureView = load_views(self.pipeline)[0]
        self.prefix = unique("mp")
        self.env = worker_env(services.kafka, services.redis_url, tmp_path, self.prefix)
        self.offline = DeltaOfflineStore(str(tmp_path / "delta"))
        self.uri = self.offline.table_uri(self.view.name, self.view.version)
        self.log_path = tmp_path / "run.log"

    def command(self, *extra: str) -> list[str]:
        return [*CLI, "run", str(self.pipeline), "-p", "2", *extra]

    @contextmanager
    def started(self, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
        """A continuous run in its own process group (so the whole group can be killed)."""
        self.log_path = self.tmp_path / f"run-{time.monotonic_ns()}.log"
        log = self.log_path.open("wb")
        proc = subprocess.Popen(
            self.command(*extra), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            log.close()

    def log(self) -> str:
        """The output of the last run :meth:`started`."""
        return self.log_path.read_text(errors="replace")

    def rows(self) -> pa.Table:
        table = self.offline.read(self.uri, columns=["entity", "_partition", "_offset"])
        assert table is not None, f"no Delta table at {self.uri}"
        return table

    def online(self, entities: list[str]) -> tuple[list[int], list[float]]:
        store = FeatureStore(
            [self.view],
            redis_url=self.services.redis_url,
            delta_uri=str(self.tmp_path / "delta"),
            redis_prefix=self.prefix,
        )
        at = datetime.fromtimestamp((T0 + 86_000_000) / 1000, UTC)
        got = store.get_online_features(["mp"], entities, as_of=at)
        return got.values["mp:events_count_1d"], got.values["mp:amount_sum_1d"]


def _oracle(n: int) -> tuple[list[str], list[int], list[float]]:
    counts = [0] * ENTITIES
    sums = [0.0] * ENTITIES
    for i in range(n):
        counts[i % ENTITIES] += 1
        sums[i % ENTITIES] += float(i % 997)
    return [f"u{e}" for e in range(ENTITIES)], counts, sums


def _assert_exact(run: Run, n: int) -> None:
    """Delta holds every event once; online count and sum per entity equal the oracle."""
    rows = run.rows()
    pairs = set(zip(rows.column("_partition").to_pylist(), rows.column("_offset").to_pylist(), strict=True))
    assert rows.num_rows == len(pairs), f"{rows.num_rows - len(pairs)} Delta rows stored twice"
    expected = {(i % PARTITIONS, i // PARTITIONS) for i in range(n)}
    assert pairs == expected, (
        f"Delta misses {len(expected - pairs)} events, has {len(pairs - expected)} extra"
    )
    entities, counts, sums = _oracle(n)
    got_counts, got_sums = run.online(entities)
    wrong = [e for e, a, b in zip(entities, got_counts, counts, strict=True) if a != b]
    assert not wrong, f"online count wrong for {len(wrong)} entities, e.g. {wrong[:5]}"
    assert got_sums == sums


def test_bounded_two_processes_store_every_event_every_time(
    services: Services, topic, tmp_path: Path
) -> None:
    """Three bounded `-p 2` runs over 100k events (more than one batch per partition): each exits 0
    with every event in both stores."""
    n = 100_000
    assert n // PARTITIONS > RuntimeConfig.model_fields["batch_size"].default
    name = topic(partitions=PARTITIONS)
    _publish(services.kafka, name, 0, n)
    for attempt in range(3):
        run = Run(services, tmp_path / f"run{attempt}", name)
        proc = subprocess.run(
            run.command("--bounded"), env=run.env, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, f"run {attempt}:\n{proc.stdout}\n{proc.stderr}"
        _assert_exact(run, n)
        # Each process reports what it read; together, every event once.
        counts = re.findall(r"worker process \d: mp \(\w+\): ([\d,]+) events read", proc.stdout)
        assert len(counts) == 2 and sum(int(c.replace(",", "")) for c in counts) == n, proc.stdout


@pytest.mark.parametrize("stop", ["sigterm-to-run", "ctrl-c-to-group"])
def test_stop_stores_everything_read_then_a_rerun_completes(
    services: Services, topic, tmp_path: Path, stop: str
) -> None:
    """SIGTERM to `featurestream run`, or SIGINT to every process (Ctrl-C), mid-stream: exit 0,
    and both stores hold exactly the events read (the same ones); a bounded rerun then stores the
    rest, nothing twice."""
    name = topic(partitions=PARTITIONS)
    run = Run(services, tmp_path, name)
    publisher = PacedPublisher(services.kafka, name)
    client = redis.Redis.from_url(services.redis_url)
    with run.started() as proc:
        publisher.start()
        deadline = time.monotonic() + 90
        while not any(client.scan_iter(match=f"{run.prefix}:*", count=1000)):
            assert proc.poll() is None, run.log()
            assert time.monotonic() < deadline, "the run stored nothing in 90 s"
            time.sleep(0.2)
        time.sleep(1.0)
        if stop == "sigterm-to-run":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(90) == 0, run.log()
        log = run.log()
    client.close()

    n = publisher.finish()
    rows = run.rows()
    assert 0 < rows.num_rows < n, "stop while events still arrive"
    by_partition: dict[int, list[int]] = {}
    for part, offset in zip(
        rows.column("_partition").to_pylist(), rows.column("_offset").to_pylist(), strict=True
    ):
        by_partition.setdefault(part, []).append(offset)
    for part, offsets in by_partition.items():  # what was read of a partition is a prefix of it
        assert sorted(offsets) == list(range(len(offsets))), f"partition {part}: gaps or repeats\n{log}"
    entities = [f"u{e}" for e in range(ENTITIES)]
    stored = pc.value_counts(rows.column("entity")).to_pylist()
    offline_counts = {d["values"]: d["counts"] for d in stored}
    online_counts, _ = run.online(entities)
    assert online_counts == [offline_counts.get(e, 0) for e in entities], "online and offline disagree"

    rerun = subprocess.run(run.command("--bounded"), env=run.env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    _assert_exact(run, n)


def test_sigterm_while_the_processes_start_exits_0(services: Services, topic, tmp_path: Path) -> None:
    """A stop asked before the dataflow runs is kept: every process ends cleanly, none is left."""
    name = topic(partitions=PARTITIONS)
    _publish(services.kafka, name, 0, 1_000)
    run = Run(services, tmp_path, name)
    with run.started() as proc:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, run.log()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(90) == 0, run.log()
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, 0)
            raise AssertionError(f"processes left running after the launcher exited\n{run.log()}")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _wait_for_progress(run: Run, proc: subprocess.Popen[bytes], above: int, seed: int) -> None:
    """Until the run stores new events (u0's online count passes ``above``)."""
    deadline = time.monotonic() + 90
    while run.online(["u0"])[0][0] <= above:
        assert proc.poll() is None, f"seed {seed}: run ended early\n{run.log()}"
        assert time.monotonic() < deadline, f"seed {seed}: no progress in 90 s\n{run.log()}"
        time.sleep(0.1)


def test_recovery_dir_survives_kill_9_of_a_process_or_the_group(
    services: Services, topic, tmp_path: Path
) -> None:
    """`-p 2 --recovery-dir`: SIGKILL the whole group three times and one worker process once, at
    random moments while events arrive; a bounded resume then stores every event exactly once."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = topic(partitions=PARTITIONS)
    run = Run(services, tmp_path, name)
    recovery = ["--recovery-dir", str(tmp_path / "recovery"), "--snapshot-seconds", "1"]
    publisher = PacedPublisher(services.kafka, name)
    publisher.start()
    try:
        for kill in ("group", "one process", "group", "group"):
            stored = run.online(["u0"])[0][0]
            with run.started(*recovery) as proc:
                _wait_for_progress(run, proc, stored, seed)
                time.sleep(rng.uniform(0.0, 2.0))
                assert publisher.is_alive(), f"seed {seed}: kill while events arrive"
                if kill == "group":
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                    continue
                workers = _children(proc.pid)
                assert len(workers) == 2, f"seed {seed}: expected 2 worker processes, found {workers}"
                os.kill(rng.choice(workers), signal.SIGKILL)
                code = proc.wait(90)
                log = run.log()
                assert code != 0, f"seed {seed}: a killed worker must fail the run\n{log}"
                assert "was killed by SIGKILL" in log, f"seed {seed}: the failing process is not named\n{log}"
                with suppress(ProcessLookupError):  # the launcher stopped the other process too
                    os.killpg(proc.pid, 0)
                    raise AssertionError(f"seed {seed}: processes left running after the launcher exited")
    finally:
        n = publisher.finish()
    final = subprocess.run(
        run.command("--bounded", *recovery), env=run.env, capture_output=True, text=True, timeout=240
    )
    assert final.returncode == 0, f"seed {seed}\n{final.stdout}\n{final.stderr}"
    assert any((tmp_path / "recovery").glob("part-*.sqlite3"))
    _assert_exact(run, n)
