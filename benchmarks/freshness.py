"""Freshness measured from outside: from a producer's wall clock to the value being readable.

A worker process (``featurestream run``, continuous) computes a view with ``last(sent)`` per
user. A producer publishes load events for ``--entities`` users at a steady rate and, every
``--probe-ms`` milliseconds, a probe event for one of 50 probe users whose ``sent`` field is the
wall-clock time just before it is produced. A reader polls ``get_online_features`` for the probe
users in a tight loop; when a probe's value changes to a newer ``sent``, the time since ``sent``
is one freshness sample (so the figure includes the producer's batching, Kafka, the worker and
Redis, at the reader's polling resolution). Runs on a private broker and Redis.

./run bench freshness                          # 1k, 10k and 50k events/s, 10 s each
./run bench freshness --rates 10000 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

from connectors.kafka import ensure_topic
from featurestream.client import FeatureStore
from featurestream.local.services import EphemeralServices
from featurestream.runtime import load_views

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


class Load(threading.Thread):
    """Publishes ``rate`` events/s (load plus probes) until stopped."""

    def __init__(self, bootstrap: str, topic: str, rate: int, entities: int, probe_ms: float) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "1"})
        self.topic = topic
        self.rate = rate
        self.entities = entities
        self.probe_s = probe_ms / 1000
        self.stop_event = threading.Event()
        self.sent = 0

    def _produce(self, key: bytes, value: bytes | str) -> None:
        while True:  # a full client queue (the broker lags): wait for it instead of dying
            try:
                self.producer.produce(self.topic, key=key, value=value)
                return
            except BufferError:
                self.producer.poll(0.01)

    def run(self) -> None:
        rng = np.random.default_rng(1)
        start = time.monotonic()
        next_probe = start
        probe = 0
        tick = 0.002
        while not self.stop_event.is_set():
            now = time.monotonic()
            due = int((now - start) * self.rate) - self.sent
            if due > 0:
                users = rng.integers(0, self.entities, due)
                ms = int(time.time() * 1000)
                for u in users.tolist():
                    self._produce(f"u{u}".encode(), json.dumps({"user_id": f"u{u}", "sent": 0.0, "ts": ms}))
                self.sent += due
            if now >= next_probe:
                user = f"probe{probe % PROBES}"
                sent = time.time()
                value = json.dumps({"user_id": user, "sent": sent, "ts": int(sent * 1000)}).encode()
                self._produce(user.encode(), value)
                probe += 1
                next_probe += self.probe_s
            self.producer.poll(0)
            time.sleep(tick)
        self.producer.flush(30)


def measure(store: FeatureStore, seconds: float) -> np.ndarray:
    """Freshness samples (seconds) seen by a reader polling the probe users for ``seconds``."""
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
    return np.asarray(samples)


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
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="featurestream-fresh-"))
    print(
        f"freshness: {args.partitions} partitions, {args.entities:,} users, a probe every "
        f"{args.probe_ms} ms, {args.seconds:.0f} s per rate; {os.cpu_count()} cores"
    )
    with EphemeralServices(work / "services") as svc:
        topic = "fresh"
        ensure_topic(svc.kafka_bootstrap_servers, topic, args.partitions)
        ensure_topic(svc.kafka_bootstrap_servers, f"{topic}.dlq", 1)
        pipeline = work / "fresh.py"
        pipeline.write_text(PIPELINE.format(topic=topic))
        view = load_views(pipeline)[0]
        env = {
            **os.environ,
            "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": svc.kafka_bootstrap_servers,
            "FEATURESTREAM_REDIS_URL": svc.redis_url,
            "FEATURESTREAM_DELTA_URI": str(work / "delta"),
            "FEATURESTREAM_STATE_DIR": str(work / "state"),
            "FEATURESTREAM_METRICS_PORT": "0",
            "FEATURESTREAM_DRIFT_INTERVAL_SECONDS": "0",
        }
        log = (work / "worker.log").open("w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "featurestream.cli", "run", str(pipeline)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        store = FeatureStore([view], redis_url=svc.redis_url, delta_uri=str(work / "delta"))
        rows = []
        try:
            for rate in rates:
                load = Load(svc.kafka_bootstrap_servers, topic, rate, args.entities, args.probe_ms)
                load.start()
                measure(store, 3.0)  # warm up: worker started, caught up at this rate
                if worker.poll() is not None:
                    raise SystemExit(f"worker exited with {worker.returncode}; see {work / 'worker.log'}")
                t = time.monotonic()
                before = load.sent
                samples = measure(store, args.seconds)
                achieved = (load.sent - before) / (time.monotonic() - t)
                load.stop_event.set()
                load.join()
                if not len(samples):
                    raise SystemExit(
                        f"no probe became readable at {rate:,} events/s; see {work / 'worker.log'}"
                    )
                ms = samples * 1000
                rows.append((rate, achieved, len(ms), *np.percentile(ms, [50, 99]), ms.max()))
                print(
                    f"{rate:>7,} events/s (achieved {achieved:,.0f}): freshness p50 {rows[-1][3]:.1f} ms, "
                    f"p99 {rows[-1][4]:.1f} ms, max {rows[-1][5]:.1f} ms ({len(ms)} probes)",
                    flush=True,
                )
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
            log.close()
    print(f"measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; worker log in {work / 'worker.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
