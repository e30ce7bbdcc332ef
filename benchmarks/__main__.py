"""Benchmarks: end-to-end throughput and online read latency, on a private broker and Redis.

./run bench                      # 1M events, 10k entities, 3 windows x 4 aggregations, -p 1 and -p 2
./run bench --events 200000      # quicker
./run bench --processes 1 -w 2   # one process with two worker threads
./run bench soak --help          # lost/duplicated events under repeated kills (benchmarks/soak.py)
./run bench freshness            # producer wall clock -> readable online, at 1k/10k/50k events/s
./run bench serve                # feature server p50/p99 and requests/s (benchmarks/serve.py)
./run bench cdc                  # table view: Debezium changes/s to Redis + Delta (benchmarks/cdc.py)
./run bench training             # point-in-time training set rows/s (benchmarks/training.py)
./run bench long-windows         # online reads of 90-day windows (benchmarks/long_windows.py)
./run bench state                # tile state alone: CPU per batch, bytes per tile (state_memory.py)

The throughput case produces the events first, then runs ``featurestream run --bounded -p N -w W``
as its own process tree for each N, on an empty Redis and Delta: the throughput is the events over
the slowest process's dataflow time (from its run summary: imports and start-up excluded), the peak
RSS is the largest single process of that tree (the worker's own, not this process's producer),
and a run counts only if it exited 0 with every event in Delta and every entity in Redis. CPU
seconds (the whole tree) and the load average stand beside each figure: on a shared machine the
wall-clock figures are noisy, the CPU seconds much less so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
from confluent_kafka import Producer

from benchmarks.views import bench_view
from connectors.delta_store import DeltaOfflineStore
from connectors.kafka import ensure_topic
from connectors.redis_store import RedisOnlineStore
from featurestream.client import FeatureStore
from featurestream.local.services import EphemeralServices
from featurestream.synthetic import card_transactions

TOPIC = "bench-transactions"
PIPELINE = f"""
from benchmarks.views import bench_view

views = [bench_view({TOPIC!r})]
"""
_SUMMARY = re.compile(r"([\d,]+) events read from \S+ in ([\d.,]+) s")


def produce(bootstrap: str, topic: str, events: int, entities: int, end_ms: int) -> list[str]:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10_000})
    keys: set[bytes] = set()
    for i, ev in enumerate(card_transactions(events, entities, end_ms=end_ms, span_ms=6 * 3_600_000), 1):
        p.produce(topic, key=ev.key, value=ev.value)
        keys.add(ev.key)
        if i % 20_000 == 0:
            p.poll(0)
    p.flush(120)
    return sorted(k.decode() for k in keys)


def latency(fn, n: int) -> tuple[float, float]:
    for _ in range(min(50, n)):
        fn()
    samples = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        samples[i] = time.perf_counter() - t
    return float(np.percentile(samples, 50) * 1e3), float(np.percentile(samples, 99) * 1e3)


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def run_worker(
    work: Path, env: dict[str, str], processes: int, workers: int
) -> tuple[int, float, float, float, str]:
    """``featurestream run --bounded`` as its own process tree; returns (exit code, dataflow
    seconds of the slowest process, peak RSS MiB of the largest process, CPU seconds of the tree,
    its output)."""
    command = [sys.executable, "-m", "featurestream.cli", "run", str(work / "bench.py"), "--bounded"]
    command += ["-p", str(processes), "-w", str(workers)]
    out = (work / f"worker-p{processes}.log").open("w+")
    proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of the whole tree (descendants reaped)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read()
    out.close()
    seconds = [float(t.replace(",", "")) for _, t in _SUMMARY.findall(text)]
    return (
        proc.returncode,
        max(seconds) if seconds else float("nan"),
        usage.ru_maxrss / 1024,
        usage.ru_utime + usage.ru_stime,
        text,
    )


def stored(svc: EphemeralServices, delta_uri: str, keys: list[str]) -> tuple[int, int]:
    """(events in the Delta table, entities with a value in Redis) of the bench view."""
    from deltalake import DeltaTable

    view = bench_view(TOPIC)
    table = DeltaOfflineStore(delta_uri).table_uri(view.name, view.version)
    rows = DeltaTable(table).to_pyarrow_dataset().count_rows()
    ns = RedisOnlineStore.namespace_of("fs", view.name, view.version)
    client = redis.Redis.from_url(svc.redis_url)
    present = 0
    for i in range(0, len(keys), 1000):
        present += sum(1 for v in client.mget([ns + k for k in keys[i : i + 1000]]) if v)
    return rows, present


def main() -> None:
    if sys.argv[1:2] == ["soak"]:
        from benchmarks.soak import main as soak

        sys.exit(soak(sys.argv[2:]))
    if sys.argv[1:2] == ["freshness"]:
        from benchmarks.freshness import main as freshness

        sys.exit(freshness(sys.argv[2:]))
    if sys.argv[1:2] == ["cdc"]:
        from benchmarks.cdc import main as cdc

        sys.exit(cdc(sys.argv[2:]))
    if sys.argv[1:2] == ["training"]:
        from benchmarks.training import main as training

        sys.exit(training(sys.argv[2:]))
    if sys.argv[1:2] == ["long-windows"]:
        from benchmarks.long_windows import main as long_windows

        sys.exit(long_windows(sys.argv[2:]))
    if sys.argv[1:2] == ["state"]:
        from benchmarks.state_memory import main as state

        sys.exit(state(sys.argv[2:]))
    if sys.argv[1:2] == ["serve"]:
        from benchmarks.serve import main as serve

        sys.exit(serve(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument(
        "--processes",
        default="1,2",
        help="worker process counts to run (featurestream run -p), comma-separated; each run starts empty",
    )
    ap.add_argument(
        "-w",
        "--workers",
        type=int,
        default=1,
        help="worker threads per process (featurestream run -w): each thread takes a share of the "
        "source partitions and entity shards, but the threads share one interpreter lock, so for "
        "this Python-heavy dataflow more processes (-p), not more threads, add CPU",
    )
    ap.add_argument("--reads", type=int, default=2_000)
    args = ap.parse_args()
    counts = [int(p) for p in args.processes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-"))
    (work / "bench.py").write_text(PIPELINE)
    print(f"{os.cpu_count()} cores; {load()}; work dir {work}", flush=True)
    with EphemeralServices(work / "services") as svc:
        ensure_topic(svc.kafka_bootstrap_servers, TOPIC, args.partitions)
        ensure_topic(svc.kafka_bootstrap_servers, f"{TOPIC}.dlq", 1)
        view = bench_view(TOPIC)
        now_ms = int(time.time() * 1000)
        t = time.perf_counter()
        keys = produce(svc.kafka_bootstrap_servers, TOPIC, args.events, args.entities, now_ms)
        print(
            f"produced {args.events:,} events for {len(keys):,} entities in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        repo = str(Path(__file__).resolve().parent.parent)
        base_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
            "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": svc.kafka_bootstrap_servers,
            "FEATURESTREAM_REDIS_URL": svc.redis_url,
            "FEATURESTREAM_METRICS_PORT": "0",
            "FEATURESTREAM_DRIFT_INTERVAL_SECONDS": "0",
        }
        rates: dict[int, float] = {}
        delta_uri = ""
        for n in counts:
            redis.Redis.from_url(svc.redis_url).flushall()
            delta_uri = str(work / f"delta-p{n}")
            env = {
                **base_env,
                "FEATURESTREAM_DELTA_URI": delta_uri,
                "FEATURESTREAM_STATE_DIR": str(work / f"state-p{n}"),
            }
            code, seconds, rss, cpu, text = run_worker(work, env, n, args.workers)
            rows, present = stored(svc, delta_uri, keys) if code == 0 else (0, 0)
            clean = code == 0 and rows == args.events and present == len(keys)
            what = (
                f"{args.events / seconds:,.0f} events/s ({seconds:.2f} s)"
                if clean
                else f"NOT COUNTED (exit {code}, {rows:,} of {args.events:,} rows in Delta, "
                f"{present:,} of {len(keys):,} entities in Redis; see {work}/worker-p{n}.log)"
            )
            if clean:
                rates[n] = args.events / seconds
            print(
                f"-p {n} -w {args.workers}, {args.partitions} partitions (Kafka -> Redis + Delta): {what}; "
                f"worker peak RSS {rss:,.0f} MiB; CPU {cpu:.1f} s; {load()}",
                flush=True,
            )
            if not clean:
                print(text[-2000:], flush=True)
        if 1 in rates and len(rates) > 1:
            print(
                ", ".join(f"-p {n} / -p 1: {rates[n] / rates[1]:.2f}x" for n in sorted(rates) if n != 1),
                flush=True,
            )

        store = FeatureStore([view], redis_url=svc.redis_url, delta_uri=delta_uri)
        raw = redis.Redis.from_url(svc.redis_url)
        ns = RedisOnlineStore.namespace_of("fs", view.name, view.version)
        rng = np.random.default_rng(0)
        at = datetime.fromtimestamp(now_ms / 1000, UTC)
        feats = ["bench"]
        for size, reps in ((1, args.reads), (100, max(1, args.reads // 4))):
            batches = [list(rng.choice(keys, size, replace=False)) for _ in range(reps)]
            it = iter(batches * 2)
            cpu0 = time.process_time()
            p50, p99 = latency(lambda it=it: store.get_online_features(feats, next(it), as_of=at), reps)
            cpu_read = time.process_time() - cpu0
            it = iter([[ns + k for k in b] for b in batches] * 2)
            r50, r99 = latency(lambda it=it: raw.mget(next(it)), reps)
            print(
                f"online read, {size} entit{'y' if size == 1 else 'ies'} x {len(view.aggregations)} "
                f"features: p50 {p50:.3f} ms, p99 {p99:.3f} ms (raw Redis MGET of the same keys: "
                f"p50 {r50:.3f} ms, p99 {r99:.3f} ms); reader CPU {cpu_read:.1f} s; {load()}",
                flush=True,
            )


if __name__ == "__main__":
    main()
