"""Chaos harness shared by ``tests/test_chaos.py`` and ``benchmarks/soak.py``.

A producer thread publishes events whose entities are spread round-robin over every partition of
a topic (explicit partition numbers, out of order within the lateness), while a worker process
is stopped at seeded random moments (``kill -9`` with a recovery dir, or SIGTERM without one) and
restarted each time. A final bounded run then catches up, and the online values (Redis, through
:class:`FeatureStore`), the Delta rows and a training set are compared with a numpy oracle of
every produced event. Event times are unique, so ``last`` needs no tie-break.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from confluent_kafka import Producer

from engine.definitions import FeatureView
from featurestream.client import FeatureStore
from featurestream.local.processes import _free_port
from featurestream.runtime import load_views
from tests.support import create_topic, unique, worker_env

MIN = 60_000
TILE_MS = MIN
BASE = int(datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)
SPAN_MS = 80 * MIN  # events span at most this (longer only when there are more events than ms)
DISORDER_MS = 5 * MIN  # out of order by up to this, below the view's allowed lateness (10m)

# (feature name, function, window ms); every aggregation reads `amount` except count.
FEATURES: list[tuple[str, str, int]] = [
    ("count_2h", "count", 120 * MIN),
    ("sum_2h", "sum", 120 * MIN),
    ("min_2h", "min", 120 * MIN),
    ("max_2h", "max", 120 * MIN),
    ("last_2h", "last", 120 * MIN),
    ("mean_2h", "mean", 120 * MIN),
    ("count_10m", "count", 10 * MIN),
    ("sum_10m", "sum", 10 * MIN),
]

PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="chaos", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float")),
)
views = [FeatureView(
    name="chaos", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=tuple(
        Aggregation(function=f, column=None if f == "count" else "amount", window=f"{{w // 60000}}m", name=n)
        for n, f, w in {features}
    ),
    tile_size="1m", allowed_lateness="10m",
)]


def __getattr__(name):
    if name == "flow":
        from featurestream.runtime import dataflow
        return dataflow(*views)
    raise AttributeError(name)
"""


@dataclass
class Events:
    """Produced events in produce order: entity index, event time (ms, unique), amount, partition."""

    entity: np.ndarray
    ts: np.ndarray
    amount: np.ndarray
    partition: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.ts)

    def payloads(self, a: int, b: int) -> list[bytes]:
        """JSON values of events ``a`` to ``b``."""
        names = self.names
        return [
            f'{{"user_id":"{names[e]}","amount":{x},"ts":{t}}}'.encode()
            for e, x, t in zip(
                self.entity[a:b].tolist(), self.amount[a:b].tolist(), self.ts[a:b].tolist(), strict=True
            )
        ]


def make_events(n: int, entities: int, partitions: int, seed: int) -> Events:
    """Round-robin over partitions (so every entity is in all of them), disordered event times."""
    rng = np.random.default_rng(seed)
    step = max(1, SPAN_MS // max(n, 1))
    window = max(1.0, DISORDER_MS / step)
    order = np.argsort(np.arange(n) + rng.uniform(0, window, n), kind="stable")
    return Events(
        entity=rng.integers(0, entities, n),
        ts=BASE + step * order.astype(np.int64),
        amount=rng.integers(-4000, 4000, n) / 4,  # quarters: sums are exact in any order
        partition=np.arange(n) % partitions,
        names=[f"u{e:05d}" for e in range(entities)],
    )


class PacedProducer(threading.Thread):
    """Publishes ``events`` to their partitions, spread evenly over ``seconds``.

    ``produced`` collects each acknowledged ``partition << 40 | offset`` (8 bytes per event).
    """

    def __init__(self, bootstrap: str, topic: str, events: Events, seconds: float, chunk: int = 2_000):
        super().__init__(name="chaos-producer", daemon=True)
        self.bootstrap, self.topic, self.events = bootstrap, topic, events
        self.seconds, self.chunk = seconds, chunk
        self.produced = array("q")
        self.errors: list[str] = []
        self.undelivered = -1

    def _ack(self, err: object, msg: object) -> None:
        if err is not None:
            self.errors.append(str(err))
        else:
            self.produced.append(msg.partition() << 40 | msg.offset())  # type: ignore[attr-defined]

    def run(self) -> None:
        ev, n = self.events, len(self.events)
        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "acks": "all"})
        start = time.monotonic()
        parts = ev.partition.tolist()
        for a in range(0, n, self.chunk):
            for i, value in enumerate(ev.payloads(a, min(n, a + self.chunk)), a):
                while True:
                    try:
                        p.produce(self.topic, value=value, partition=parts[i], on_delivery=self._ack)
                        break
                    except BufferError:
                        p.poll(0.05)
            p.poll(0)
            wait = start + self.seconds * min(n, a + self.chunk) / n - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self.undelivered = p.flush(120)

    def finish(self) -> None:
        self.join()
        assert self.undelivered == 0 and not self.errors, (self.undelivered, self.errors[:3])
        assert len(self.produced) == len(self.events), "broker did not acknowledge every event"


@dataclass
class Chaos:
    """One chaos scenario: a topic, a pipeline file, a worker command and where it stores."""

    kafka: str
    redis_url: str
    work: Path
    partitions: int
    recovery: bool
    snapshot_seconds: int = 1
    processes: int = 1
    topic: str = field(init=False)
    prefix: str = field(init=False)
    pipeline: Path = field(init=False)
    view: FeatureView = field(init=False)
    logs: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.topic = create_topic(self.kafka, unique("chaos"), self.partitions)
        self.prefix = unique("chaos")
        self.pipeline = self.work / "chaos_pipeline.py"
        self.pipeline.write_text(PIPELINE.format(topic=self.topic, features=FEATURES))
        self.view = load_views(self.pipeline)[0]
        if self.recovery and self.processes == 1:  # `run -p N` makes its own partitions
            from bytewax.recovery import init_db_dir

            (self.work / "recovery").mkdir(parents=True, exist_ok=True)
            init_db_dir(self.work / "recovery", 1)

    def store(self) -> FeatureStore:
        return FeatureStore(
            [self.view],
            redis_url=self.redis_url,
            delta_uri=str(self.work / "delta"),
            redis_prefix=self.prefix,
        )

    def start(self, *, bounded: bool = False, metrics_port: int = 0) -> subprocess.Popen:
        """The worker: ``bytewax.run -r`` with recovery, else ``featurestream run`` (from the start);
        with several processes, ``featurestream run -p N`` (with ``--recovery-dir``), in its own
        process group so that a kill reaches every process."""
        env = worker_env(self.kafka, self.redis_url, self.work, self.prefix, metrics_port)
        env["FEATURESTREAM_DRIFT_INTERVAL_SECONDS"] = "0"
        if self.processes > 1:
            cmd = [
                sys.executable,
                "-m",
                "featurestream.cli",
                "run",
                str(self.pipeline),
                "-p",
                str(self.processes),
            ]
            if self.recovery:
                cmd += [
                    "--recovery-dir",
                    str(self.work / "recovery"),
                    "--snapshot-seconds",
                    str(self.snapshot_seconds),
                ]
            cmd += ["--bounded"] if bounded else []
        elif self.recovery:
            rec = str(self.work / "recovery")
            cmd = [sys.executable, "-m", "bytewax.run", f"{self.pipeline}:flow", "-r", rec]
            cmd += ["-s", str(self.snapshot_seconds), "-b", "0"]
            env["FEATURESTREAM_BOUNDED"] = "true" if bounded else "false"
        else:
            cmd = [sys.executable, "-m", "featurestream.cli", "run", str(self.pipeline)]
            cmd += ["--bounded"] if bounded else []
        log = self.work / f"worker-{len(self.logs):03d}.log"
        self.logs.append(log)
        with log.open("w") as out:  # the worker keeps its own copy of the descriptor
            return subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=self.processes > 1
            )

    def stop(self, worker: subprocess.Popen, sig: signal.Signals) -> None:
        """SIGKILL hits every process (the group); SIGTERM asks the launcher to stop cleanly."""
        if self.processes > 1 and sig == signal.SIGKILL:
            os.killpg(worker.pid, sig)
        else:
            worker.send_signal(sig)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs[-1].read_text().splitlines()[-lines:]) if self.logs else ""


def _free_ports(n: int) -> int:
    """A base port with ``n`` free ports from it (worker process ``i`` serves metrics on base + i)."""
    for _ in range(100):
        base = _free_port()
        if all(_bindable(base + i) for i in range(1, n)):
            return base
    raise AssertionError(f"no {n} consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_ready(chaos: Chaos, attempts: int = 3) -> subprocess.Popen:
    """A worker whose metrics endpoint answers. Ports are picked free but another process may take
    one before the worker binds it; that start is retried on other ports."""
    for attempt in range(attempts):
        port = _free_ports(chaos.processes)
        worker = chaos.start(metrics_port=port)
        try:
            wait_ready(worker, port, chaos.logs[-1])
            return worker
        except AssertionError:
            lost_port = "cannot serve metrics" in chaos.logs[-1].read_text()
            if worker.poll() is None:
                chaos.stop(worker, signal.SIGKILL)
                worker.wait(10)
            if not lost_port or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def wait_ready(worker: subprocess.Popen, port: int, log: Path, timeout: float = 90.0) -> None:
    """Until the worker's health endpoint answers (its flow is built and its signals handled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise AssertionError(f"worker exited with {worker.returncode} before it was ready:\n{tail}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # 503 still means the endpoint (and so the flow) is up
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"worker not ready within {timeout:.0f} s")


@dataclass
class Outcome:
    """How a chaos run went: stops made, seconds (all, and the final catch-up), what was produced."""

    stops: int
    seconds: float
    final_seconds: float
    produced: np.ndarray


def chaos_run(
    chaos: Chaos,
    events: Events,
    *,
    stops: int,
    seed: int,
    max_delay: float,
    produce_seconds: float,
    say: Callable[[str], None] = lambda _m: None,
) -> Outcome:
    """Produce while stopping the worker at least ``stops`` times (and until every event is
    published), then run it bounded to the end of the topic."""
    rng = np.random.default_rng(seed)
    sig = signal.SIGKILL if chaos.recovery else signal.SIGTERM
    producer = PacedProducer(chaos.kafka, chaos.topic, events, produce_seconds)
    start = time.monotonic()
    producer.start()
    i = 0
    while i < stops or producer.is_alive():
        worker = start_ready(chaos)
        try:
            time.sleep(float(rng.uniform(0.0, max_delay)))
            if worker.poll() is not None:
                raise AssertionError(f"worker exited with {worker.returncode} on its own\n{chaos.tail()}")
            chaos.stop(worker, sig)
            code = worker.wait(60)
        finally:
            if worker.poll() is None:
                chaos.stop(worker, signal.SIGKILL)
                worker.wait(10)
        want = -signal.SIGKILL if chaos.recovery else 0
        assert code == want, f"stop {i}: worker exit code {code}, expected {want}\n{chaos.tail()}"
        i += 1
        say(f"stop {i} ({sig.name}) after {time.monotonic() - start:.1f} s")
    producer.finish()
    final_start = time.monotonic()
    final = chaos.start(bounded=True)
    code = final.wait(3600)
    assert code == 0, f"final bounded run exited with {code}\n{chaos.tail()}"
    done = time.monotonic()
    return Outcome(i, done - start, done - final_start, np.frombuffer(producer.produced, np.int64))


# ---------------------------------------------------------------------------------------------
# Oracle and comparison.
# ---------------------------------------------------------------------------------------------


def oracle(events: Events, entities: int, at_ms: int) -> dict[str, list[float | int | None]]:
    """Each feature per entity as of ``at_ms``, from the produced events with numpy only.

    A sliding window of size ``w`` holds events at or before ``at_ms`` whose tile starts after
    ``at_ms - w``; count and sum of an empty window are 0, the others null.
    """
    out: dict[str, list[float | int | None]] = {}
    for name, fn, w in FEATURES:
        keep = (events.ts <= at_ms) & ((events.ts // TILE_MS) * TILE_MS > at_ms - w)
        ent, ts, amt = events.entity[keep], events.ts[keep], events.amount[keep]
        count = np.bincount(ent, minlength=entities)
        if fn == "count":
            out[name] = count.tolist()
            continue
        if fn == "sum":
            out[name] = np.bincount(ent, weights=amt, minlength=entities).tolist()
            continue
        order = np.lexsort((ts, ent))
        ent, amt = ent[order], amt[order]
        firsts = np.flatnonzero(np.concatenate(([True], ent[1:] != ent[:-1]))) if len(ent) else ent
        values = np.full(entities, np.nan)
        if len(ent):
            if fn == "min":
                values[ent[firsts]] = np.minimum.reduceat(amt, firsts)
            elif fn == "max":
                values[ent[firsts]] = np.maximum.reduceat(amt, firsts)
            elif fn == "last":
                values[ent[firsts]] = amt[np.concatenate((firsts[1:], [len(ent)])) - 1]
            elif fn == "mean":
                values[ent[firsts]] = np.add.reduceat(amt, firsts) / count[ent[firsts]]
        out[name] = [None if np.isnan(v) else float(v) for v in values]
    return out


def _differs(got: list, want: list) -> np.ndarray:
    g = np.array([np.nan if v is None else v for v in got], dtype=np.float64)
    w = np.array([np.nan if v is None else v for v in want], dtype=np.float64)
    same = np.isclose(g, w, rtol=1e-9, atol=1e-9) | (np.isnan(g) & np.isnan(w))
    return ~same


@dataclass
class Comparison:
    """Per store: events lost / duplicated (from the 2h count) and entities differing per feature."""

    events: int
    entities: int
    lost: dict[str, int] = field(default_factory=dict)
    duplicated: dict[str, int] = field(default_factory=dict)
    entities_lost: dict[str, int] = field(default_factory=dict)
    differing: dict[str, dict[str, int]] = field(default_factory=dict)
    delta: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, store: str, got: dict[str, list], want: dict[str, list], names: list[str]) -> None:
        g = np.asarray([0 if v is None else v for v in got["count_2h"]], np.int64)
        w = np.asarray(want["count_2h"], np.int64)
        self.lost[store] = int(np.maximum(w - g, 0).sum())
        self.duplicated[store] = int(np.maximum(g - w, 0).sum())
        self.entities_lost[store] = int((w > g).sum())
        self.differing[store] = {}
        self.examples[store] = []
        for name, *_ in FEATURES:
            bad = _differs(got[name], want[name])
            self.differing[store][name] = int(bad.sum())
            for i in np.flatnonzero(bad)[:2].tolist():
                self.examples[store].append(f"{names[i]} {name}: got {got[name][i]}, want {want[name][i]}")

    def clean(self, store: str) -> bool:
        return not self.lost[store] and not self.duplicated[store] and not any(self.differing[store].values())

    def delta_clean(self) -> bool:
        d = self.delta
        return d["rows"] == self.events and not (d["missing"] or d["duplicated"] or d["content"])

    def text(self) -> str:
        lines = [f"{self.events:,} events produced for {self.entities:,} entities"]
        d = self.delta
        lines.append(
            f"delta: {d['rows']:,} rows, {d['missing']:,} (partition, offset) missing, "
            f"{d['duplicated']:,} duplicated, {d['content']:,} rows with wrong content"
        )
        for store in self.lost:
            diff = {k: v for k, v in self.differing[store].items() if v}
            lines.append(
                f"{store}: {self.lost[store]:,} events lost ({self.entities_lost[store]:,} entities), "
                f"{self.duplicated[store]:,} duplicated; entities differing per feature: {diff or 'none'}"
            )
            lines += [f"  e.g. {e}" for e in self.examples[store][:6]]
        return "\n".join(lines)


def compare(chaos: Chaos, events: Events, produced: np.ndarray) -> Comparison:
    """Delta rows against the produced (partition, offset) pairs; online and training set values
    as of one tile after the newest event against the oracle."""
    entities = len(events.names)
    result = Comparison(len(events), entities)
    store = chaos.store()
    uri = store.offline.table_uri(chaos.view.name, chaos.view.version)
    table = store.offline.read(uri, columns=["entity", "event_ts", "amount", "_partition", "_offset"])
    stored = (
        table.to_pandas()
        if table is not None
        else pd.DataFrame({c: [] for c in ("entity", "event_ts", "amount", "_partition", "_offset")})
    )
    pairs = stored["_partition"].to_numpy(np.int64) << 40 | stored["_offset"].to_numpy(np.int64)
    want = np.unique(produced)
    uniq = np.unique(pairs)
    ts = stored["event_ts"].to_numpy("datetime64[ms]").astype(np.int64)
    by_ts = np.argsort(events.ts)
    pos = np.searchsorted(events.ts[by_ts], ts)
    found = (pos < len(events)) & (events.ts[by_ts][np.minimum(pos, len(events) - 1)] == ts)
    idx = by_ts[np.minimum(pos, len(events) - 1)]
    names = np.asarray(events.names, dtype=object)
    right = (
        found
        & (names[events.entity[idx]] == stored["entity"].to_numpy())
        & (events.amount[idx] == stored["amount"].to_numpy())
    )
    result.delta = {
        "rows": len(pairs),
        "missing": len(np.setdiff1d(want, uniq)),
        "duplicated": int(len(pairs) - len(uniq) + len(np.setdiff1d(uniq, want))),
        "content": int((~right).sum()),
    }
    at_ms = (int(events.ts.max()) // TILE_MS + 1) * TILE_MS
    at = datetime.fromtimestamp(at_ms / 1000, UTC)
    expected = oracle(events, entities, at_ms)
    feats = [f"chaos:{n}" for n, *_ in FEATURES]
    online: dict[str, list] = {n: [] for n, *_ in FEATURES}
    for a in range(0, entities, 1_000):
        got = store.get_online_features(feats, events.names[a : a + 1_000], as_of=at)
        for n, *_ in FEATURES:
            online[n] += got.values[f"chaos:{n}"]
    frame = pd.DataFrame({"user_id": events.names, "event_timestamp": pd.Timestamp(at)})
    training = store.get_training_set(frame, feats).to_pandas()
    offline = {
        n: [None if isinstance(v, float) and np.isnan(v) else v for v in training[f"chaos:{n}"]]
        for n, *_ in FEATURES
    }
    result.add("training set", offline, expected, events.names)
    result.add("online", online, expected, events.names)
    return result
