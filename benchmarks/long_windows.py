"""Online reads of 90-day windows: latency, tile rows read and bytes kept per entity.

A view with sliding windows of 10 minutes, 1 hour, 1 day, 30 days and 90 days (count, sum, mean,
max: 20 features) over card transactions spread over 91 days, computed by one worker process
(``featurestream run --bounded``) into a private Redis and Delta. The 30- and 90-day windows read
coarse tiles (1 hour and 1 day, engine.levels). Then, as of the newest event: the online read's
p50/p99 for 1 and 100 entities through ``FeatureStore.get_online_features`` beside a raw Redis MGET
of the same keys, the tile rows each read combines, and the Redis bytes per entity by level.

./run bench long-windows                            # 200k events, 2k entities, 91 days
./run bench long-windows --events 1000000 --entities 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis
from confluent_kafka import Producer

from benchmarks.__main__ import latency, load, run_worker
from connectors.kafka import ensure_topic
from connectors.redis_store import RedisOnlineStore
from engine.definitions import Aggregation, Entity, FeatureView
from engine.levels import level_namespace, window_ranges
from featurestream.client import FeatureStore
from featurestream.local.services import EphemeralServices
from featurestream.synthetic import card_transactions
from pipelines.transactions import transactions

TOPIC = "bench-long-windows"
DAY = 86_400_000
WINDOWS = ("10m", "1h", "1d", "30d", "90d")


def long_view(topic: str) -> FeatureView:
    """5 sliding windows from 10 minutes to 90 days x 4 aggregations, 1-minute tiles."""
    aggs = tuple(
        Aggregation(function=f, column=None if f == "count" else "amount", window=w)
        for w in WINDOWS
        for f in ("count", "sum", "mean", "max")
    )
    return FeatureView(
        name="long",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=transactions.model_copy(update={"topic": topic}),
        aggregations=aggs,
        tile_size="1m",
        allowed_lateness="2m",
    )


PIPELINE = f"""
from benchmarks.long_windows import long_view

views = [long_view({TOPIC!r})]
"""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--entities", type=int, default=2_000)
    ap.add_argument("--days", type=int, default=91)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--reads", type=int, default=2_000)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-long-"))
    (work / "bench.py").write_text(PIPELINE)
    print(f"{os.cpu_count()} cores; {load()}; work dir {work}", flush=True)
    view = long_view(TOPIC)
    with EphemeralServices(work / "services") as svc:
        ensure_topic(svc.kafka_bootstrap_servers, TOPIC, args.partitions)
        ensure_topic(svc.kafka_bootstrap_servers, f"{TOPIC}.dlq", 1)
        end_ms = int(time.time() * 1000)
        p = Producer({"bootstrap.servers": svc.kafka_bootstrap_servers, "linger.ms": 50})
        keys: set[bytes] = set()
        span = args.days * DAY
        for i, ev in enumerate(card_transactions(args.events, args.entities, end_ms=end_ms, span_ms=span), 1):
            p.produce(TOPIC, key=ev.key, value=ev.value)
            keys.add(ev.key)
            if i % 20_000 == 0:
                p.poll(0)
        p.flush(120)
        ids = sorted(k.decode() for k in keys)
        print(f"produced {args.events:,} events for {len(ids):,} entities over {args.days} days", flush=True)
        repo = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(x for x in (repo, os.environ.get("PYTHONPATH")) if x),
            "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": svc.kafka_bootstrap_servers,
            "FEATURESTREAM_REDIS_URL": svc.redis_url,
            "FEATURESTREAM_METRICS_PORT": "0",
            "FEATURESTREAM_DRIFT_INTERVAL_SECONDS": "0",
            "FEATURESTREAM_DELTA_URI": str(work / "delta"),
            "FEATURESTREAM_STATE_DIR": str(work / "state"),
        }
        code, seconds, rss, cpu, text = run_worker(work, env, 1, 1)
        if code != 0:
            print(text[-3000:], flush=True)
            return 1
        print(
            f"worker: {args.events / seconds:,.0f} events/s ({seconds:.2f} s), peak RSS {rss:,.0f} MiB, "
            f"CPU {cpu:.1f} s, levels {[r // 1000 for r in view.tile_levels_ms]} s; {load()}",
            flush=True,
        )
        ns = RedisOnlineStore.namespace_of("fs", view.name, view.version)
        spaces = [ns, *(level_namespace(ns, r) for r in view.tile_levels_ms[1:])]
        raw = redis.Redis.from_url(svc.redis_url)
        width = 8 * (3 + 7 * len(view.columns))
        for space, r in zip(spaces, view.tile_levels_ms, strict=True):
            sizes = np.array([raw.strlen(space + k) for k in ids])
            print(
                f"Redis tiles of {r // 1000} s: mean {sizes.mean() / width:.1f} rows "
                f"({sizes.mean():,.0f} B) per entity, max {sizes.max() / width:.0f} rows",
                flush=True,
            )
        newest = end_ms
        for a in view.aggregations[::4]:
            rows = sum(hi - lo + 1 for _, lo, hi in window_ranges(view, a, newest))
            print(f"window {a.window.size}: at most {rows} tile rows per entity per read", flush=True)
        store = FeatureStore([view], redis_url=svc.redis_url, delta_uri=str(work / "delta"))
        at = datetime.fromtimestamp(newest / 1000, UTC)
        rng = np.random.default_rng(0)
        for size, reps in ((1, args.reads), (100, max(1, args.reads // 4))):
            batches = [list(rng.choice(ids, size, replace=False)) for _ in range(reps)]
            it = iter(batches * 2)
            p50, p99 = latency(lambda it=it: store.get_online_features(["long"], next(it), as_of=at), reps)
            it = iter([[s + k for s in spaces for k in b] for b in batches] * 2)
            r50, r99 = latency(lambda it=it: raw.mget(next(it)), reps)
            print(
                f"online read, {size} entit{'y' if size == 1 else 'ies'} x {len(view.aggregations)} features "
                f"(90 days of history): p50 {p50:.3f} ms, p99 {p99:.3f} ms (raw MGET of the same keys: "
                f"p50 {r50:.3f} ms, p99 {r99:.3f} ms); {load()}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
