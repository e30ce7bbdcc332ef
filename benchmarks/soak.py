"""Soak: events spread round-robin over partitions while the worker is stopped again and again.

A producer publishes ``--events`` events of ``--entities`` entities, each entity in every one of
``--partitions`` partitions, out of order within the lateness. Meanwhile a worker process is
killed (``kill -9``, resuming from its recovery dir) at seeded random moments, at least
``--kills`` times and until every event is published. A bounded run then catches up. Online
values (Redis), Delta rows and a training set are compared with a numpy oracle of every event;
the exit status is 1 if anything is lost or duplicated. Runs on a private broker and Redis.

./run bench soak                                  # 5M events, 50 kills
./run bench soak --events 200000 --kills 10       # about a minute
./run bench soak --stop term                      # clean SIGTERM restarts, no recovery dir
./run bench soak --processes 2                    # `featurestream run -p 2`, the group killed
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from featurestream.local.services import EphemeralServices
from tests.chaos_helpers import Chaos, chaos_run, compare, make_events


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="./run bench soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--kills", type=int, default=50, help="minimum worker stops")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--stop", choices=("kill", "term"), default="kill", help="kill -9 or SIGTERM")
    ap.add_argument("--snapshot-seconds", type=int, default=1, help="recovery snapshot interval")
    ap.add_argument("--max-delay", type=float, default=3.0, help="longest run before a stop (seconds)")
    ap.add_argument(
        "--produce-seconds",
        type=float,
        default=None,
        help="spread publishing over this many seconds (default: kills x 1.5; 0: as fast as possible)",
    )
    ap.add_argument("--processes", type=int, default=1, help="worker processes (featurestream run -p N)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (worker logs, Delta)")
    args = ap.parse_args(argv)
    for name in ("events", "kills", "partitions", "entities", "processes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="featurestream-soak-"))
    recovery = args.stop == "kill"
    how = f"kill -9, snapshots every {args.snapshot_seconds} s" if recovery else "SIGTERM, no recovery"
    print(
        f"soak: {args.events:,} events, {args.entities:,} entities round-robin over {args.partitions} "
        f"partitions, {args.processes} worker process(es), at least {args.kills} stops ({how}); "
        f"work dir {work}"
    )
    with EphemeralServices(work / "services") as svc:
        t = time.perf_counter()
        events = make_events(args.events, args.entities, args.partitions, args.seed)
        chaos = Chaos(
            svc.kafka_bootstrap_servers,
            svc.redis_url,
            work,
            args.partitions,
            recovery,
            snapshot_seconds=args.snapshot_seconds,
            processes=args.processes,
        )
        print(f"generated events in {time.perf_counter() - t:.1f} s")
        produce_seconds = args.produce_seconds if args.produce_seconds is not None else 1.5 * args.kills
        outcome = chaos_run(
            chaos,
            events,
            stops=args.kills,
            seed=args.seed,
            max_delay=args.max_delay,
            produce_seconds=produce_seconds,
            say=lambda m: print(m, flush=True),
        )
        offered = f"{args.events / produce_seconds:,.0f} events/s" if produce_seconds else "at full speed"
        print(
            f"{outcome.stops} stops while publishing {offered}; the final bounded run then took "
            f"{outcome.final_seconds:.1f} s"
        )
        print(
            f"throughput under chaos (Kafka -> Redis + Delta, first start until everything is stored): "
            f"{args.events / outcome.seconds:,.0f} events/s ({outcome.seconds:.1f} s; at most the publishing "
            f"rate, see --produce-seconds 0)"
        )
        t = time.perf_counter()
        result = compare(chaos, events, outcome.produced)
        print(f"compared with the oracle in {time.perf_counter() - t:.1f} s")
    print(result.text())
    ok = result.delta_clean() and result.clean("training set") and result.clean("online")
    print("OK: nothing lost, nothing duplicated" if ok else f"FAILED: events lost or duplicated ({work})")
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
