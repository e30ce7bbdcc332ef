"""Benchmarks: end-to-end throughput and online read latency, on a private broker and Redis.

./run bench                      # 1M events, 10k entities, 3 windows x 4 aggregations
./run bench --events 200000      # quicker
./run bench soak --help          # lost/duplicated events under repeated kills (benchmarks/soak.py)
./run bench freshness            # producer wall clock -> readable online, at 1k/10k/50k events/s
./run bench serve                # feature server p50/p99 and requests/s (benchmarks/serve.py)
./run bench cdc                  # table view: Debezium changes/s to Redis + Delta (benchmarks/cdc.py)
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
from confluent_kafka import Producer

from connectors.kafka import ensure_topic
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.definitions import Aggregation, Entity, FeatureView
from featurestream.client import FeatureStore
from featurestream.local.services import EphemeralServices
from featurestream.synthetic import card_transactions
from pipelines.transactions import transactions


def bench_view(topic: str) -> FeatureView:
    """3 windows x 4 aggregations over the example card-transaction source, on ``topic``."""
    source = transactions.model_copy(update={"topic": topic})
    aggs = tuple(
        Aggregation(function=f, column=None if f == "count" else "amount", window=w)
        for w in ("10m", "1h", "1d")
        for f in ("count", "sum", "mean", "max")
    )
    return FeatureView(
        name="bench",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=source,
        aggregations=aggs,
        tile_size="1m",
        allowed_lateness="2m",
    )


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
    if sys.argv[1:2] == ["serve"]:
        from benchmarks.serve import main as serve

        sys.exit(serve(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reads", type=int, default=2_000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="featurestream-bench-")
    with EphemeralServices(work) as svc:
        topic = "bench-transactions"
        ensure_topic(svc.kafka_bootstrap_servers, topic, args.partitions)
        ensure_topic(svc.kafka_bootstrap_servers, f"{topic}.dlq", 1)
        view = bench_view(topic)
        now_ms = int(time.time() * 1000)
        t = time.perf_counter()
        keys = produce(svc.kafka_bootstrap_servers, topic, args.events, args.entities, now_ms)
        print(
            f"produced {args.events:,} events for {len(keys):,} entities in {time.perf_counter() - t:.1f} s"
        )

        runtime = RuntimeConfig(
            kafka_bootstrap_servers=svc.kafka_bootstrap_servers,
            redis_url=svc.redis_url,
            delta_uri=f"{work}/delta",
            stop_at_end=True,
        )
        flow = build_dataflow([view], runtime)
        t = time.perf_counter()
        run_dataflow(flow, workers=args.workers)
        elapsed = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"end to end (Kafka -> Redis + Delta), {args.partitions} partitions, {args.workers} worker(s): "
            f"{args.events / elapsed:,.0f} events/s ({elapsed:.2f} s); peak RSS {rss:,.0f} MiB"
        )

        store = FeatureStore([view], redis_url=svc.redis_url, delta_uri=f"{work}/delta")
        rng = np.random.default_rng(0)
        at = datetime.fromtimestamp(now_ms / 1000, UTC)
        feats = ["bench"]
        one = [[k] for k in rng.choice(keys, args.reads)]
        hundred = [list(rng.choice(keys, 100, replace=False)) for _ in range(args.reads // 4)]
        it1, it100 = iter(one * 2), iter(hundred * 2)
        p50, p99 = latency(lambda: store.get_online_features(feats, next(it1), as_of=at), args.reads)
        print(
            f"online read, 1 entity x {len(view.aggregations)} features: p50 {p50:.3f} ms, p99 {p99:.3f} ms"
        )
        p50, p99 = latency(lambda: store.get_online_features(feats, next(it100), as_of=at), args.reads // 4)
        print(
            f"online read, 100 entities x {len(view.aggregations)} features: "
            f"p50 {p50:.3f} ms, p99 {p99:.3f} ms"
        )


if __name__ == "__main__":
    main()
