"""Table-view throughput: Debezium change events -> one worker process -> Redis + Delta.

Change events of an ``orders`` table (``id`` primary key, ``customer_id``, ``amount`` as a decimal
string, ``status``, ``updated_at``), in the envelope ``featurestream cdc postgres`` writes (with
``REPLICA IDENTITY FULL`` before images, a tombstone after each delete), are generated straight
into a topic: no database is needed for the figure. The stream is a valid change log of a table
of ``--rows`` primary keys: a create takes a key not in the table, updates and deletes take one
that is. Ops are drawn with the ``--mix`` weights; once every key is in the table a drawn create
becomes an update, so the printed mix is the one measured. Updates move a fifth of the rows to
another customer.

Every change is in the topic (the producer flushed) before the worker starts, so production never
bounds the figure. Then one worker process (spawned, so its memory is its own) runs a table view
(count, sum, mean, min, max, count_distinct of status per customer) over the topic, bounded. The
figure is changes per second from the start of the dataflow to its end, sinks drained (Kafka ->
Redis + Delta); the worker's CPU seconds (every thread) are over the same span, so imports and
start-up are excluded from both, as in the event benchmark. Peak RSS is the worker process's.
Online values of sampled customers are checked against the generator's final table.

./run bench cdc                                  # 1M changes, 100k rows, 10k customers
./run bench cdc --changes 200000 --partitions 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from confluent_kafka import Producer

from connectors.kafka import ensure_topic
from engine.definitions import Entity, Field
from engine.table_definitions import CdcSource, TableFeature, TableView
from featurestream.client import FeatureStore
from featurestream.local.services import EphemeralServices

STATUSES = ("open", "paid", "shipped", "cancelled")
BASE_MS = 1_760_000_000_000


def bench_view(topic: str) -> TableView:
    source = CdcSource(
        name="orders",
        topic=topic,
        primary_key=("id",),
        fields=(
            Field(name="id", dtype="int"),
            Field(name="customer_id", dtype="str", nullable=True),
            Field(name="amount", dtype="float", nullable=True),
            Field(name="status", dtype="str", nullable=True),
            Field(name="updated_at", dtype="str", nullable=True),
        ),
    )
    return TableView(
        name="bench_customer_orders",
        entity=Entity(name="customer", join_keys=("customer_id",)),
        source=source,
        features=(
            TableFeature(function="count"),
            TableFeature(function="sum", column="amount"),
            TableFeature(function="mean", column="amount"),
            TableFeature(function="min", column="amount"),
            TableFeature(function="max", column="amount"),
            TableFeature(function="count_distinct", column="status"),
        ),
    )


class _Keys:
    """A set with O(1) random choice and removal."""

    def __init__(self, items: list[int] | None = None) -> None:
        self.items = list(items or [])
        self.at = {k: i for i, k in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, k: int) -> None:
        self.at[k] = len(self.items)
        self.items.append(k)

    def pop_random(self, rng: random.Random) -> int:
        i = rng.randrange(len(self.items))
        k, last = self.items[i], self.items[-1]
        self.items[i], self.at[last] = last, i
        self.items.pop()
        del self.at[k]
        return k

    def choice(self, rng: random.Random) -> int:
        return self.items[rng.randrange(len(self.items))]


def generate(
    bootstrap: str, topic: str, changes: int, rows: int, entities: int, mix: tuple[float, float, float]
) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    """Publish ``changes`` change events; the final table and the count of each op."""
    rng = random.Random(42)
    enc = msgspec.json.Encoder()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10_000,
                  "queue.buffering.max.messages": 1_000_000, "compression.type": "lz4"})  # fmt: skip
    table: dict[int, dict[str, Any]] = {}
    free, live = _Keys(list(range(rows))), _Keys()
    counts = {"c": 0, "u": 0, "d": 0}
    lsn = 0x1000000
    cum = (mix[0], mix[0] + mix[1])

    def row(pk: int, ts: int) -> dict[str, Any]:
        return {
            "id": pk,
            "customer_id": f"cust_{rng.randrange(entities):06d}",
            "amount": f"{rng.randrange(1, 1_000_000) / 100:.2f}",
            "status": STATUSES[rng.randrange(4)],
            "updated_at": datetime.fromtimestamp(ts / 1000, UTC).isoformat().replace("+00:00", "Z"),
        }

    for i in range(changes):
        ts = BASE_MS + i
        lsn += 56 + rng.randrange(64)
        draw = rng.random()
        op = "c" if draw < cum[0] else "u" if draw < cum[1] else "d"
        if op == "c" and not free:
            op = "u"
        if op != "c" and not live:
            op = "c"
        if op == "c":
            pk = free.pop_random(rng)
            live.add(pk)
            before, after = None, row(pk, ts)
        elif op == "u":
            pk = live.choice(rng)
            before = table[pk]
            after = dict(
                before, amount=f"{rng.randrange(1, 1_000_000) / 100:.2f}", status=STATUSES[rng.randrange(4)]
            )
            after["updated_at"] = row(pk, ts)["updated_at"]
            if rng.random() < 0.2:
                after["customer_id"] = f"cust_{rng.randrange(entities):06d}"
        else:
            pk = live.pop_random(rng)
            free.add(pk)
            before, after = table[pk], None
        counts[op] += 1
        envelope = {
            "before": before,
            "after": after,
            "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "bench", "ts_ms": ts,
                       "snapshot": "false", "db": "shop", "sequence": f'["{lsn}","{lsn}"]',
                       "schema": "public", "table": "orders", "txId": 1000 + i, "lsn": lsn, "xmin": None},
            "op": op,
            "ts_ms": ts + 3,
            "transaction": None,
        }  # fmt: skip
        key = b'{"id":%d}' % pk
        while True:
            try:
                p.produce(topic, key=key, value=enc.encode(envelope))
                if op == "d":
                    p.produce(topic, key=key, value=None)
                    del table[pk]
                else:
                    table[pk] = after  # type: ignore[assignment]
                break
            except BufferError:
                p.poll(0.05)
        if i % 20_000 == 0:
            p.poll(0)
    left = p.flush(300)
    if left:
        raise SystemExit(f"the broker did not take {left} message(s)")
    return table, counts


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return use.ru_utime + use.ru_stime


def _worker(view_json: str, runtime_json: str, out: Any) -> None:
    """The worker process: run the view bounded; report the dataflow's elapsed seconds, the CPU
    seconds (every thread) over the same span and the peak RSS (MiB)."""
    import deltalake  # noqa: F401  (imported on first use otherwise: start-up, not throughput)

    with contextlib.suppress(ImportError):  # pyarrow imports it on its first list conversion
        import pandas  # noqa: F401

    from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow

    view = TableView.model_validate_json(view_json)
    runtime = RuntimeConfig.model_validate_json(runtime_json)
    flow = build_dataflow([view], runtime)
    cpu, t = _cpu(), time.perf_counter()
    run_dataflow(flow, workers=1)
    elapsed, cpu = time.perf_counter() - t, _cpu() - cpu
    out.put((elapsed, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def oracle(rows: list[dict[str, Any]]) -> list[Any]:
    amounts = [float(r["amount"]) for r in rows]
    return [
        len(rows),
        math.fsum(amounts),
        math.fsum(amounts) / len(amounts) if amounts else None,
        min(amounts) if amounts else None,
        max(amounts) if amounts else None,
        len({r["status"] for r in rows}),
    ]


def check(store: FeatureStore, view: TableView, table: dict[int, dict[str, Any]], entities: int) -> int:
    """Online values of 200 sampled customers against the final table; returns the number checked."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in table.values():
        by.setdefault(r["customer_id"], []).append(r)
    sample = sorted(random.Random(1).sample([f"cust_{i:06d}" for i in range(entities)], min(200, entities)))
    got = store.get_online_features([view.name], sample).values
    names = [f"{view.name}:{n}" for n in view.feature_names]
    for i, cust in enumerate(sample):
        want = oracle(by.get(cust, []))
        have = [got[n][i] for n in names]
        if want[0] == 0:
            want = [0, 0.0, None, None, None, 0]
        ok = all(
            (h == w) if not isinstance(w, float) else (h is not None and math.isclose(h, w, rel_tol=1e-9))
            for h, w in zip(have, want, strict=True)
        )
        if not ok:
            raise SystemExit(f"wrong online value for {cust}: {have} != {want}")
    return len(sample)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="./run bench cdc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--changes", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=100_000, help="primary keys of the table")
    ap.add_argument("--entities", type=int, default=10_000, help="customers")
    ap.add_argument("--mix", default="0.6,0.3,0.1", help="weights of creates, updates, deletes")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=20_000)
    args = ap.parse_args(argv)
    weights = [float(w) for w in args.mix.split(",")]
    if len(weights) != 3 or min(weights) < 0 or not sum(weights):
        raise SystemExit("--mix: give three non-negative weights: creates,updates,deletes")
    mix = tuple(w / sum(weights) for w in weights)
    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-cdc-"))
    print(f"cdc bench: {args.changes:,} changes, {args.rows:,} rows, {args.entities:,} customers, "
          f"{args.partitions} partitions; {os.cpu_count()} cores; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    with EphemeralServices(work / "services") as svc:
        topic = "bench.public.orders"
        ensure_topic(svc.kafka_bootstrap_servers, topic, args.partitions)
        ensure_topic(svc.kafka_bootstrap_servers, f"{topic}.dlq", 1)
        view = bench_view(topic)
        t = time.perf_counter()
        table, counts = generate(
            svc.kafka_bootstrap_servers,
            topic,
            args.changes,
            args.rows,
            args.entities,
            mix,  # type: ignore[arg-type]
        )
        print(
            f"produced {args.changes:,} changes (c {counts['c']:,}, u {counts['u']:,}, d {counts['d']:,}; "
            f"+{counts['d']:,} tombstones) in {time.perf_counter() - t:.1f} s; "
            f"{len(table):,} rows at the end; all in the topic before the worker starts",
            flush=True,
        )
        from engine.dataflow import RuntimeConfig

        runtime = RuntimeConfig(
            kafka_bootstrap_servers=svc.kafka_bootstrap_servers,
            redis_url=svc.redis_url,
            delta_uri=str(work / "delta"),
            stop_at_end=True,
            batch_size=args.batch_size,
        )
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(view.model_dump_json(), runtime.model_dump_json(), out))
        proc.start()
        elapsed, cpu, rss = out.get()
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"the worker exited with {proc.exitcode}")
        print(
            f"end to end (Kafka -> Redis + Delta), {args.partitions} partitions, 1 worker process: "
            f"{args.changes / elapsed:,.0f} changes/s ({elapsed:.2f} s); worker CPU {cpu:.1f} s "
            f"({cpu / args.changes * 1e6:.1f} µs per change); peak RSS {rss:,.0f} MiB; load average "
            f"{os.getloadavg()[0]:.2f}"
        )
        store = FeatureStore([view], redis_url=svc.redis_url, delta_uri=str(work / "delta"))
        print(
            f"online values of {check(store, view, table, args.entities)} sampled customers match the table"
        )
    print(f"measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
