"""Point-in-time training sets at scale: entity rows per second and peak memory.

./run bench training                 # 10M entity rows x 3 views x 10 features
./run bench training --rows 1000000  # quicker

The event history is synthetic and written straight into the Delta offline store (each view's
event table, and its tile table from the same partials the stream computes), not through Kafka
and the stream: this measures reads, not ingestion. The training set is streamed to a Parquet
file chunk by chunk, as ``featurestream training-set`` does.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.delta_store import DeltaOfflineStore, event_schema
from connectors.delta_tiles import append_tiles, tile_table, tiles_uri
from engine import training_kernels
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from engine.reads import point_in_time_values
from engine.tiles import TileLayout, partials_from_events
from featurestream.training import CHUNK_ROWS, write_training_set
from featurestream.training_partitions import PARTITION_EVENTS

DAY = 86_400_000
END = int(datetime(2026, 1, 31, tzinfo=UTC).timestamp() * 1000)


def bench_view(i: int) -> FeatureView:
    """10 features over two columns: sliding 1h and 1d, hopping 1d every 1h; 5 minute tiles."""
    day, hour, hop = Window.sliding("1d"), Window.sliding("1h"), Window.hopping("1d", "1h")
    feats = [
        ("count", None, hour),
        ("sum", "amount", hour),
        ("mean", "amount", day),
        ("min", "amount", day),
        ("max", "amount", day),
        ("last", "amount", day),
        ("stddev", "amount", day),
        ("sum", "qty", hop),
        ("count", None, day),
        ("variance", "qty", day),
    ]
    return FeatureView(
        name=f"bench{i}",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name=f"bench{i}",
            topic=f"bench{i}",
            timestamp_field="ts",
            fields=(
                Field(name="user_id", dtype="str"),
                Field(name="amount", dtype="float"),
                Field(name="qty", dtype="float", nullable=True),
            ),
        ),
        aggregations=tuple(
            Aggregation(function=f, column=c, window=w, name=f"f{k}_{f}") for k, (f, c, w) in enumerate(feats)
        ),
        tile_size="5m",
    )


def _ids(n_entities: int) -> pa.Array:
    return pa.array([f"user{i:07d}" for i in range(n_entities)], pa.string())


def write_history(store: DeltaOfflineStore, view: FeatureView, events: int, entities: int, days: int) -> None:
    """Synthetic events into the view's event table and its tiles into its tile table."""
    rng = np.random.default_rng(abs(hash(view.name)) % 2**32)
    ids = _ids(entities)
    chunk = 2_000_000
    uri = store.table_uri(view.name, view.version)
    layout = TileLayout.of(view)
    for start in range(0, events, chunk):
        n = min(chunk, events - start)
        ent = rng.integers(0, entities, n)
        ts = END - rng.integers(0, days * DAY, n)
        amount = np.round(rng.gamma(2.0, 30.0, n), 2)
        qty = rng.integers(1, 10, n).astype(np.float64)
        qty[rng.random(n) < 0.1] = np.nan
        ts_arr = pa.array(ts, pa.timestamp("ms", tz="UTC"))
        table = pa.table(
            {
                "entity": ids.take(pa.array(ent)),
                "event_ts": ts_arr,
                "amount": pa.array(amount),
                "qty": pa.array(qty, mask=np.isnan(qty)),
                "_topic": pa.array(np.full(n, view.source.topic)),
                "_partition": pa.array((ent % 4).astype(np.int32)),
                "_offset": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "date": pc.cast(ts_arr, pa.date32()),
            },
            schema=event_schema(view.columns),
        )
        store.append(uri, table, f"{view.name}:{view.version}")
        tile = ts // layout.tile_ms
        keys, rows = partials_from_events(layout, (ent << 32) | tile, tile, ts, [amount, qty])
        append_tiles(
            store,
            tiles_uri(store, view.name, view.version),
            tile_table(layout, ids.take(pa.array(keys >> 32)), rows),
        )


def entity_rows(rows: int, entities: int, days: int) -> pa.Table:
    rng = np.random.default_rng(1)
    at = END - rng.integers(0, days * DAY, rows)
    return pa.table(
        {
            "user_id": _ids(entities + entities // 20).take(
                pa.array(rng.integers(0, entities + entities // 20, rows))
            ),
            "event_timestamp": pa.array(at, pa.timestamp("ms", tz="UTC")),
        }
    )


def reset_peak() -> None:
    """Reset the process's peak RSS (Linux: ``/proc/self/clear_refs``); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib() -> float:
    """Peak RSS since :func:`reset_peak` (VmHWM), or of the whole process where not on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cold_compile_s() -> float:
    """Seconds a process with an empty numba cache takes to compile the training kernels."""
    with tempfile.TemporaryDirectory() as cache:
        code = "from engine.training_kernels import warm; print(warm())"
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return float(done.stdout.split()[-1])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000, help="entity rows in the training set")
    ap.add_argument("--events", type=int, default=4_000_000, help="stored events per view")
    ap.add_argument("--entities", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=14, help="event history span")
    ap.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS)
    ap.add_argument(
        "--partition-events", type=int, default=PARTITION_EVENTS, help="stored events indexed at once"
    )
    ap.add_argument("--compare-rows", type=int, default=20_000, help="rows also read by the events path")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="featurestream-bench-training-")
    store = DeltaOfflineStore(os.path.join(work, "delta"))
    views = [bench_view(i) for i in range(3)]
    t = time.perf_counter()
    # In a child process, so this process's peak memory is the training set's alone.
    child = multiprocessing.get_context("fork").Process(
        target=lambda: [write_history(store, v, args.events, args.entities, args.days) for v in views]
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the synthetic history failed (exit code {child.exitcode})")
    print(
        f"wrote {args.events:,} events per view x {len(views)} views ({args.entities:,} entities, "
        f"{args.days} days) and their tiles to Delta in {time.perf_counter() - t:.1f} s (not through Kafka)"
    )
    print(
        f"kernels: compiled from scratch in {cold_compile_s():.1f} s (a fresh process, empty cache); "
        f"here {training_kernels.warm():.1f} s (numba's on-disk cache); neither is timed below"
    )
    table = entity_rows(args.rows, args.entities, args.days)
    wanted = {v.name: list(v.aggregations) for v in views}
    out = os.path.join(work, "training.parquet")
    reset_peak()  # the peak of the training set alone, not of writing the synthetic history
    cpu0, t0 = time.process_time(), time.perf_counter()
    written = write_training_set(
        store,
        {v.name: v for v in views},
        wanted,
        table,
        "event_timestamp",
        out,
        args.chunk_rows,  # type: ignore[arg-type]
        partition_events=args.partition_events,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = peak_mib()
    features = sum(len(a) for a in wanted.values())
    print(
        f"training set: {written:,} rows x {features} features in {wall:.1f} s wall, {cpu:.1f} s CPU: "
        f"{written / wall:,.0f} rows/s ({written / cpu:,.0f} rows per CPU second); peak RSS {peak:,.0f} MiB"
    )
    groups = pq.ParquetFile(out).metadata.num_row_groups
    print(f"output {groups} row groups, {os.path.getsize(out) / 2**20:,.0f} MiB")
    if args.compare_rows:
        small = table.slice(0, args.compare_rows)
        view = views[0]
        events = store.read(store.table_uri(view.name, view.version))
        assert events is not None
        ids = small.column("user_id").to_pylist()
        at = small.column("event_timestamp").cast(pa.int64()).to_numpy()
        t1 = time.perf_counter()
        point_in_time_values(view, events, ids, at, list(view.aggregations))
        old = time.perf_counter() - t1
        print(f"events path (engine.reads), one view: {args.compare_rows / old:,.0f} rows/s")
    shutil.rmtree(work, ignore_errors=True)
    return 0
