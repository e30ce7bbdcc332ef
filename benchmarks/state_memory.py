"""Tile state micro benchmark: CPU per batch and bytes per live (entity, tile) of TileState alone.

./run bench state                                   # 1M events, 10k entities over 6 h, 1-day retention
./run bench state --span-hours 24 --retention-hours 2   # event time runs past retention: eviction
./run bench state --shards 32                       # split each batch over 32 states, as the worker does

Events follow the throughput benchmark's shape (featurestream.synthetic.card_transactions: skewed
users, 20 s jitter, some late events) for the bench view's layout (one column, 1-minute tiles),
and reach the state in source batches of ``--batch`` events with ascending offsets, as the
dataflow delivers them. Two passes over the same events: the first times ``TileState.apply`` (CPU
seconds per batch, eviction included) and reads the process's RSS before and after; the second
counts the state's Python allocations with tracemalloc (which would slow the first). Both divide
by the live tiles at the end. ``--impl module:Class`` measures another implementation of the same
interface (e.g. a saved copy of an older one).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import resource
import time
import tracemalloc
import zlib

import numpy as np

from benchmarks.views import bench_view
from engine.tiles import TileLayout

MIB = 1 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_events(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entity ids, timestamps ms, amounts) in roughly event-time order."""
    rng = np.random.default_rng(7)
    n, span = args.events, int(args.span_hours * 3_600_000)
    weights = rng.lognormal(0.0, 0.8, args.entities)
    users = rng.choice(args.entities, size=n, p=weights / weights.sum())
    end = 1_700_000_000_000
    ts = end - span + (np.arange(n, dtype=np.int64) * span) // n - rng.integers(0, 20_001, n)
    late = rng.random(n) < args.late_rate
    ts = np.where(late, ts - 15 * 60_000 - rng.integers(0, 15 * 60_000, n), ts)
    return users.astype(np.int64), ts, np.round(rng.lognormal(3.0, 0.6, n), 2)


def batches(args: argparse.Namespace, users, ts, amount, names: list[str]):
    """Each source batch split into per-shard (keys, codes, ts, columns, offsets), as engine.shards does."""
    shard_of = np.array([zlib.crc32(k.encode()) % args.shards for k in names], dtype=np.int64)
    out = []
    for a in range(0, len(users), args.batch):
        u, t, x = users[a : a + args.batch], ts[a : a + args.batch], amount[a : a + args.batch]
        off = np.arange(a, a + len(u), dtype=np.int64)
        sh = shard_of[u]
        parts = []
        for s in np.unique(sh).tolist():
            idx = np.flatnonzero(sh == s)
            used, codes = np.unique(u[idx], return_inverse=True)
            parts.append((s, [names[i] for i in used.tolist()], codes, t[idx], [x[idx]], off[idx]))
        out.append(parts)
    return out


def load(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def run(cls, layout: TileLayout, args: argparse.Namespace, work) -> tuple[list, np.ndarray]:
    states = [cls(layout, int(args.retention_hours * 3_600_000)) for _ in range(args.shards)]
    cpu = np.empty(len(work))
    for i, parts in enumerate(work):
        c = time.process_time()
        for s, keys, codes, t, cols, off in parts:
            states[s].apply(keys, codes, t, cols, 0, off)
        cpu[i] = time.process_time() - c
    return states, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=20_000)
    ap.add_argument("--span-hours", type=float, default=6.0)
    ap.add_argument("--retention-hours", type=float, default=24.0)
    ap.add_argument("--late-rate", type=float, default=0.01)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--impl", default="engine.state:TileState")
    ap.add_argument(
        "--compare",
        metavar="MODULE:CLASS",
        help="then time this implementation and --impl alternately on the same batches (--repeat "
        "times each): the steadier comparison on a shared machine",
    )
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    cls = load(args.impl)
    layout = TileLayout.of(bench_view("bench"))
    users, ts, amount = make_events(args)
    names = [f"user_{i}" for i in range(args.entities)]
    work = batches(args, users, ts, amount, names)
    gc.collect()
    base = rss()
    print(
        f"{args.impl}; {args.events:,} events, {args.entities:,} entities over {args.span_hours:g} h, "
        f"retention {args.retention_hours:g} h, batches of {args.batch:,}, {args.shards} shard(s); "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    states, cpu = run(cls, layout, args, work)
    gc.collect()
    grown = rss() - base
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    live = sum(s.n for s in states)
    print(
        f"apply CPU: {cpu.sum():.3f} s total, {cpu.mean() * 1e3:.2f} ms mean / "
        f"{np.median(cpu) * 1e3:.2f} ms median per batch of {args.batch:,} ({len(cpu)} batches); "
        f"{cpu.sum() / args.events * 1e6:.2f} us per event",
        flush=True,
    )
    c = time.process_time()
    snaps = [copy.deepcopy(s) for s in states]
    print(f"snapshot (copy.deepcopy of every state): {time.process_time() - c:.3f} CPU s", flush=True)
    del snaps
    c = time.process_time()
    for s in states:
        s.resync()
    print(f"resync (every entity's live tiles): {time.process_time() - c:.3f} CPU s", flush=True)
    print(
        f"live tiles {live:,}; RSS grew {grown / MIB:,.1f} MiB = {grown / live:,.0f} B per live tile "
        f"(peak {peak / MIB:,.1f} MiB over the baseline); row values {layout.row_bytes} B",
        flush=True,
    )
    del states
    gc.collect()
    tracemalloc.start()
    states, _ = run(cls, layout, args, work)
    gc.collect()
    held, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(s.n for s in states) == live
    print(
        f"tracemalloc: state holds {held / MIB:,.1f} MiB = {held / live:,.0f} B per live tile "
        f"(traced peak {top / MIB:,.1f} MiB)",
        flush=True,
    )
    if args.compare:
        del states
        totals: dict[str, list[float]] = {args.impl: [], args.compare: []}
        for _ in range(args.repeat):
            for spec in totals:
                gc.collect()
                totals[spec].append(float(run(load(spec), layout, args, work)[1].sum()))
        for spec, t in totals.items():
            print(
                f"{spec}: apply CPU min {min(t):.3f} s, median {np.median(t):.3f} s over {len(t)} runs "
                f"({min(t) / len(work) * 1e3:.2f} ms a batch at best); load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    return 0
