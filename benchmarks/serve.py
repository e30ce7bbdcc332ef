"""Feature server latency and throughput, server and load generator on this machine.

A 50-feature view (5 windows x 10 aggregations) is computed into a private Redis from synthetic
card transactions; `featurestream serve` (one process, API keys on, every decision audited)
answers POST /features/online for 1 and for 100 random entities per request, from 1 and from 32
keep-alive connections. Requests cycle over 2,000 (1 entity) or 300 (100 entities) random entity
sets, so entities repeat and unchanged ones come from the server's cache of computed values; each
line says how many did (`--no-cache` turns it off). The load generator is a minimal HTTP/1.1
client on uvloop in this process (the server runs in its own), so that the client's cost stays
small next to the server's; each line gives both processes' CPU use.

./run bench serve                        # 200k events, 10k entities, 5 s per case
./run bench serve --seconds 2 --no-auth  # quicker, without keys and audit
./run bench serve --no-cache             # every entity recomputed (no reuse of unchanged values)

Targets: p99 <= 2 ms (1 entity, concurrency 1), p99 <= 8 ms (100 entities, concurrency 1),
>= 5,000 requests/s (1 entity, concurrency 32).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from connectors.kafka import ensure_topic
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.definitions import Aggregation, Entity, FeatureView, Window
from featurestream.local.processes import _free_port
from featurestream.local.services import EphemeralServices
from pipelines.transactions import transactions

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "from benchmarks.serve import serve_view\n\nviews = [serve_view({topic!r})]\n"
TARGETS = {(1, 1): ("p99", 2.0), (100, 1): ("p99", 8.0), (1, 32): ("rps", 5000.0)}


def serve_view(topic: str) -> FeatureView:
    """50 features: 5 windows x (count, 6 of amount, 3 of is_online)."""
    aggs = []
    for w in ("10m", "1h", "6h", "1d", Window.tumbling("1h")):
        aggs.append(Aggregation(function="count", window=w))
        aggs += [
            Aggregation(function=f, column="amount", window=w)
            for f in ("sum", "mean", "min", "max", "last", "stddev")
        ]
        aggs += [Aggregation(function=f, column="is_online", window=w) for f in ("sum", "mean", "max")]
    return FeatureView(
        name="serve_bench",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=transactions.model_copy(update={"topic": topic}),
        aggregations=tuple(aggs),
        tile_size="1m",
        allowed_lateness="2m",
    )


async def _client(port: int, requests: list[bytes], deadline: float, lat: list[float], codes: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < deadline:
            req = requests[i % len(requests)]
            i += 1
            start = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            at = head.lower().find(b"content-length:")
            size = int(head[at + 15 : head.index(b"\r\n", at)])
            await reader.readexactly(size)
            lat.append(time.perf_counter() - start)
            code = int(head[9:12])
            codes[code] = codes.get(code, 0) + 1
    finally:
        writer.close()


async def _load(
    port: int, requests: list[bytes], concurrency: int, seconds: float
) -> tuple[list[float], dict, float]:
    lat: list[float] = []
    codes: dict[int, int] = {}
    warm = time.perf_counter() + min(1.0, seconds / 4)
    await asyncio.gather(*[_client(port, requests, warm, [], {}) for _ in range(concurrency)])
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(
        *[
            _client(port, requests[k::concurrency] or requests, deadline, lat, codes)
            for k in range(concurrency)
        ]
    )
    return lat, codes, time.perf_counter() - start


def _request(body: dict, key: str | None) -> bytes:
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST /features/online HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="./run bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per case")
    ap.add_argument("--no-auth", action="store_true", help="serve without API keys (and audit)")
    ap.add_argument("--no-cache", action="store_true", help="recompute every entity (--read-cache-mib 0)")
    args = ap.parse_args(argv)
    import uvloop

    from benchmarks.__main__ import produce
    from registry.core import Registry
    from registry.keys import create_key

    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-serve-"))
    with EphemeralServices(work / "services") as svc:
        topic = "bench-serve"
        ensure_topic(svc.kafka_bootstrap_servers, topic, 2)
        ensure_topic(svc.kafka_bootstrap_servers, f"{topic}.dlq", 1)
        view = serve_view(topic)
        keys = produce(
            svc.kafka_bootstrap_servers, topic, args.events, args.entities, int(time.time() * 1000)
        )
        runtime = RuntimeConfig(
            kafka_bootstrap_servers=svc.kafka_bootstrap_servers,
            redis_url=svc.redis_url,
            delta_uri=str(work / "delta"),
            stop_at_end=True,
        )
        run_dataflow(build_dataflow([view], runtime), workers=1)
        print(
            f"computed {len(view.aggregations)} features for {len(keys):,} entities "
            f"from {args.events:,} events"
        )

        registry_url = f"sqlite:///{work / 'registry.db'}"
        key = None
        if not args.no_auth:
            reg = Registry(registry_url)
            key = create_key(reg, "bench", read=[view.name])[1]
            reg.close()
        pipeline = work / "bench_pipeline.py"
        pipeline.write_text(PIPELINE.format(topic=topic))
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": svc.kafka_bootstrap_servers,
            "FEATURESTREAM_REDIS_URL": svc.redis_url,
            "FEATURESTREAM_REGISTRY_URL": registry_url,
            "FEATURESTREAM_STATE_DIR": str(work / "state"),
        }
        cmd = [sys.executable, "-m", "featurestream.cli", "serve", str(pipeline), "--port", str(port)]
        if args.no_auth:
            cmd.append("--no-auth")
        if args.no_cache:
            cmd += ["--read-cache-mib", "0"]
        log = open(work / "server.log", "wb")
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(port, server, work / "server.log")
            rng = np.random.default_rng(0)
            print(
                f"server: {'API keys and audit on' if key else 'no auth'}, one process; "
                f"{os.cpu_count()} CPUs shared with the load generator"
            )
            for n in (1, 100):
                bodies = [
                    _request(
                        {"features": [view.name], "entities": {"user_id": list(rng.choice(keys, n))}}, key
                    )
                    for _ in range(2000 if n == 1 else 300)
                ]
                for conc in (1, 32):
                    before = _server_stats(port)
                    cpu0 = (_cpu(server.pid), _own_cpu())
                    lat, codes, elapsed = uvloop.run(_load(port, bodies, conc, args.seconds))
                    cpu1 = (_cpu(server.pid), _own_cpu())
                    after = _server_stats(port)
                    ms = np.asarray(lat) * 1e3
                    p50, p99, rps = np.percentile(ms, 50), np.percentile(ms, 99), len(ms) / elapsed
                    bad = {c: k for c, k in codes.items() if c != 200}
                    line = (
                        f"{n:>3} entit{'y ' if n == 1 else 'ies'} x {len(view.aggregations)} features, "
                        f"concurrency {conc:>2}: p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  {rps:8,.0f} req/s"
                    )
                    target = TARGETS.get((n, conc))
                    if target:
                        what, limit = target
                        ok = p99 <= limit if what == "p99" else rps >= limit
                        sign = "<=" if what == "p99" else ">="
                        line += f"   target {what} {sign} {limit:,g}: {'met' if ok else 'MISSED'}"
                    if bad:
                        line += f"   non-200 answers: {bad}"
                    busy = [(b - a) / elapsed for a, b in zip(cpu0, cpu1, strict=True)]
                    line += f"   CPU: server {busy[0]:.0%}, load generator {busy[1]:.0%}"
                    d = {k: after[k] - before[k] for k in after}
                    if d["batches"]:
                        hits = d["hit"] / max(d["hit"] + d["miss"], 1)
                        per = d["requests"] / d["batches"]
                        line += f"   ({per:.1f} requests per Redis read, {hits:.0%} of entities cached)"
                    print(line, flush=True)
        finally:
            server.terminate()
            server.wait(20)
            log.close()
    return 0


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _server_stats(port: int) -> dict[str, float]:
    """Batches, batched requests and cache hits/misses so far, from the server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {"batches": 0.0, "requests": 0.0, "hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "featurestream_server_read_batch_requests_count":
            out["batches"] = float(value)
        elif name == "featurestream_server_read_batch_requests_sum":
            out["requests"] = float(value)
        elif name.startswith("featurestream_server_read_cache_total{"):
            out["hit" if 'result="hit"' in name else "miss"] = float(value)
    return out


def _wait_ready(port: int, server: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within 60 s:\n{log.read_text(errors='replace')}")


if __name__ == "__main__":
    sys.exit(main())
