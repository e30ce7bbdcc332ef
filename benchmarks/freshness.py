"""Freshness measured from outside: from a producer's wall clock to the value being readable.

A worker process (``featurestream run``, continuous) computes a view with ``last(sent)`` per
user. A load process publishes events for ``--entities`` users at a steady rate and, every
``--probe-ms`` milliseconds, a probe event for one of 50 probe users whose ``sent`` field is the
wall-clock time just before it is produced. A reader polls ``get_online_features`` for the probe
users every ``--poll-ms``; when a probe's value changes to a newer ``sent``, the time since
``sent`` is one freshness sample (so the figure includes the producer's batching, Kafka, the
worker and Redis, at the reader's polling resolution).

Each rate gets its own broker, Redis and worker: the embedded broker (Tansu, memory storage)
answers more slowly the more it holds, so a rate measured after another would pay for it.
Load, reader and worker are separate processes, so none holds another's GIL; with 2 cores they
still share the CPU, which is why every line reports the CPU seconds each process used and the
load average.

Stages (from the worker's own histograms, mean and bucket-interpolated p50/p99):
``broker`` Kafka timestamp -> read by the worker (producer ack, broker, fetch), ``worker`` read ->
Redis acknowledged (decode, tiles, hand-off, write), ``redis`` the write call alone.

``--bare`` swaps the worker for a bare confluent-kafka consumer with the worker's consumer
settings, timing produce -> consumed: what the broker alone allows at that rate.

./run bench freshness                          # 1k, 10k and 50k events/s, 10 s each
./run bench freshness --rates 1000 --seconds 5 # shorter
./run bench freshness --bare                   # the broker's own bound, same rates
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from connectors.kafka import ensure_topic
from featurestream.local.services import EphemeralServices

PROBES = 50
PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="fresh", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="sent", dtype="float")),
)
views = [FeatureView(
    name="fresh", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=(
        Aggregation(function="last", column="sent", window="1h"),
        Aggregation(function="count", window="1h"),
    ),
    tile_size="1m", allowed_lateness="1m",
)]
"""
TOPIC = "fresh"


def load(bootstrap: str, rate: int, entities: int, probe_ms: float, stop: Any, sent: Any) -> None:
    """Publish ``rate`` events/s (load plus probes) until ``stop`` is set; runs in its own process."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "1"})

    def produce(key: bytes, value: bytes) -> None:
        while True:  # a full client queue (the broker lags): wait for it instead of dying
            try:
                producer.produce(TOPIC, key=key, value=value)
                return
            except BufferError:
                producer.poll(0.01)

    rng = np.random.default_rng(1)
    start = time.monotonic()
    next_probe, probe, count = start, 0, 0
    while not stop.is_set():
        now = time.monotonic()
        due = int((now - start) * rate) - count
        if due > 0:
            ms = int(time.time() * 1000)
            for u in rng.integers(0, entities, due).tolist():
                produce(b"u%d" % u, b'{"user_id":"u%d","sent":0.0,"ts":%d}' % (u, ms))
            count += due
            sent.value = count
        if now >= next_probe:
            user = f"probe{probe % PROBES}"
            t = time.time()
            produce(user.encode(), json.dumps({"user_id": user, "sent": t, "ts": int(t * 1000)}).encode())
            probe += 1
            next_probe += probe_ms / 1000
        producer.poll(0)
        time.sleep(0.002)
    producer.flush(30)


def read_online(redis_url: str, delta_uri: str, pipeline: Path, seconds: float, poll_s: float) -> np.ndarray:
    """Freshness samples (seconds) seen by a reader polling the probe users for ``seconds``."""
    from featurestream.client import FeatureStore
    from featurestream.runtime import load_views

    store = FeatureStore(load_views(pipeline), redis_url=redis_url, delta_uri=delta_uri)
    users = [f"probe{i}" for i in range(PROBES)]
    seen = [0.0] * PROBES
    samples: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        values = store.get_online_features(["fresh:sent_last_1h"], users).values["fresh:sent_last_1h"]
        now = time.time()
        for i, v in enumerate(values):
            if v is not None and v > seen[i]:
                if seen[i] > 0:  # the first value seen may predate this measurement
                    samples.append(now - v)
                seen[i] = v
        time.sleep(poll_s)
    return np.asarray(samples)


def read_bare(bootstrap: str, seconds: float) -> np.ndarray:
    """Produce -> consumed latency (seconds) of the probes, by a bare consumer of every
    partition with the worker's consumer settings, reading from the topic's current end."""
    from confluent_kafka import OFFSET_END, Consumer
    from confluent_kafka import TopicPartition as TP

    from connectors.kafka import _reader_config, partition_count

    consumer = Consumer(_reader_config(bootstrap, TOPIC, None))
    consumer.assign([TP(TOPIC, p, OFFSET_END) for p in range(partition_count(bootstrap, TOPIC))])
    samples: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for m in consumer.consume(20_000, 0.0):
            if m.error() is None and (m.key() or b"").startswith(b"probe"):
                samples.append(time.time() - json.loads(m.value())["sent"])
        time.sleep(0.005)  # the worker's poll_timeout after an empty read
    consumer.close()
    return np.asarray(samples)


def scrape(port: int) -> dict[str, float]:
    """The worker's Prometheus text as {series with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def stage(before: dict[str, float], after: dict[str, float], metric: str, labels: str = "") -> str:
    """Mean and bucket-interpolated p50/p99 (ms) of a histogram's observations between scrapes."""
    pat = re.compile(rf"^{metric}_bucket\{{(.*)\}}$")
    le_pat = re.compile(r'le="([^"]+)"')
    buckets: dict[float, float] = {}
    for key, value in after.items():
        m = pat.match(key)
        if m and labels in m.group(1):
            le = float(le_pat.search(m.group(1)).group(1))  # type: ignore[union-attr]
            buckets[le] = buckets.get(le, 0.0) + value - before.get(key, 0.0)
    total = sum(
        v - before.get(k, 0.0) for k, v in after.items() if k.startswith(f"{metric}_sum") and labels in k
    )
    n = buckets.get(float("inf"), 0.0)
    if not n:
        return "-"
    edges = sorted(buckets)

    def q(p: float) -> float:
        lo, prev = 0.0, 0.0
        for le in edges:
            if buckets[le] >= p * n:
                if le == float("inf"):
                    return lo * 1000
                frac = (p * n - prev) / max(buckets[le] - prev, 1e-9)
                return (lo + frac * (le - lo)) * 1000
            lo, prev = le, buckets[le]
        return lo * 1000

    return f"mean {total / n * 1000:.1f} p50~{q(0.5):.0f} p99~{q(0.99):.0f}"


def warm_up(worker: subprocess.Popen[bytes], port: int, work: Path) -> dict[str, float]:
    """Wait until the worker serves metrics and wrote a probe; returns the first scrape."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"worker exited with {worker.returncode}; see {work / 'worker.log'}")
        try:
            metrics = scrape(port)
        except OSError:
            metrics = {}
        if any(k.startswith("featurestream_batch_latency_seconds_count") and v for k, v in metrics.items()):
            return metrics
        time.sleep(0.2)
    raise SystemExit(f"the worker wrote nothing within 120 s; see {work / 'worker.log'}")


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def run_rate(rate: int, args: argparse.Namespace, work: Path) -> str:
    """Measure one rate on fresh services; returns the report line."""
    from featurestream.local.processes import _free_port

    ctx = mp.get_context("spawn")
    with EphemeralServices(work / "services") as svc:
        bootstrap = svc.kafka_bootstrap_servers
        ensure_topic(bootstrap, TOPIC, args.partitions)
        ensure_topic(bootstrap, f"{TOPIC}.dlq", 1)
        pipeline = work / "fresh.py"
        pipeline.write_text(PIPELINE.format(topic=TOPIC))
        port = _free_port()
        worker = None
        if not args.bare:
            env = {
                **os.environ,
                "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "FEATURESTREAM_REDIS_URL": svc.redis_url,
                "FEATURESTREAM_DELTA_URI": str(work / "delta"),
                "FEATURESTREAM_STATE_DIR": str(work / "state"),
                "FEATURESTREAM_METRICS_PORT": str(port),
                "FEATURESTREAM_DRIFT_INTERVAL_SECONDS": "0",
            }
            log = (work / "worker.log").open("a")
            worker = subprocess.Popen(
                [sys.executable, "-m", "featurestream.cli", "run", str(pipeline)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stop, sent = ctx.Event(), ctx.Value("q", 0)
        loader = ctx.Process(target=load, args=(bootstrap, rate, args.entities, args.probe_ms, stop, sent))
        loader.start()
        try:
            procs = {"broker": psutil.Process(svc.pids["kafka"]), "redis": psutil.Process(svc.pids["redis"])}
            procs["load"] = psutil.Process(loader.pid)
            if worker is not None:
                procs["worker"] = psutil.Process(worker.pid)
                before = warm_up(worker, port, work)
                read_online(svc.redis_url, str(work / "delta"), pipeline, 3.0, 0.01)  # caught up
            else:
                time.sleep(2.0)
            cpu0 = {k: cpu(p) for k, p in procs.items()}
            me0, t, sent0 = time.process_time(), time.monotonic(), sent.value
            if worker is not None:
                samples = read_online(
                    svc.redis_url, str(work / "delta"), pipeline, args.seconds, args.poll_ms / 1000
                )
            else:
                samples = read_bare(bootstrap, args.seconds)
            took = time.monotonic() - t
            achieved = (sent.value - sent0) / took
            used = {k: cpu(p) - cpu0[k] for k, p in procs.items()}
            used["reader"] = time.process_time() - me0
            stages = ""
            if worker is not None:
                after = scrape(port)
                worker_ms = stage(before, after, "featurestream_batch_latency_seconds")
                redis_ms = stage(before, after, "featurestream_store_write_seconds", 'store="redis"')
                kafka_ms = stage(before, after, "featurestream_feature_freshness_seconds")
                stages = (
                    f"\n    stages ms: worker (read -> Redis ack) {worker_ms}; redis write {redis_ms}; "
                    f"Kafka timestamp -> Redis ack {kafka_ms}"
                )
        finally:
            stop.set()
            loader.join(60)
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    worker.kill()
                log.close()
    if not len(samples):
        raise SystemExit(f"no probe became readable at {rate:,} events/s; see {work / 'worker.log'}")
    ms = samples * 1000
    p50, p99 = np.percentile(ms, [50, 99])
    what = "bare consumer produce->consumed" if args.bare else "freshness"
    cpus = ", ".join(f"{k} {v:.1f}" for k, v in used.items())
    return (
        f"{rate:>7,} events/s (achieved {achieved:,.0f}): {what} p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
        f"max {ms.max():.1f} ms ({len(ms)} probes)\n    CPU s over {took:.0f} s: {cpus}; "
        f"load average {os.getloadavg()[0]:.2f}{stages}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="./run bench freshness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rates", default="1000,10000,50000", help="events/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per rate")
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--probe-ms", type=float, default=10.0)
    ap.add_argument("--poll-ms", type=float, default=1.0, help="the reader's pause between reads")
    ap.add_argument("--bare", action="store_true", help="a bare Kafka consumer instead of the worker")
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="featurestream-fresh-"))
    print(
        f"freshness{' (bare consumer)' if args.bare else ''}: {args.partitions} partitions, "
        f"{args.entities:,} users, a probe every {args.probe_ms} ms, {args.seconds:.0f} s per rate, "
        f"fresh services per rate; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for rate in rates:
        print(run_rate(rate, args, work / str(rate)), flush=True)
    print(f"measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; worker logs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
