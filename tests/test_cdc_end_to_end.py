"""The CDC path end to end: PostgreSQL -> ``featurestream cdc postgres`` (a subprocess) -> the
test broker -> ``featurestream run`` (a subprocess, with a recovery dir) -> Redis and Delta.

Writes go to a real table in phases (snapshot, inserts, updates that move rows between
customers, deletes, one bulk transaction with a primary-key change, then random writers while
the change source and later the worker are killed with SIGKILL and restarted). After each phase
the online values must equal an oracle computed by SQL over the table at that moment; at the
end, a training set at each phase's last commit time (to the millisecond, the boundary included)
must equal that phase's oracle, and one a millisecond before the bulk transaction's commit the
oracle of the phase before it (a transaction is seen whole or not at all).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from connectors.kafka import ensure_topic
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests import postgres_private
from tests.conftest import Services
from tests.postgres_private import PrivatePostgres
from tests.support import unique, worker_env

private_postgres = postgres_private.private_postgres  # the session fixture, used here
ROOT = Path(__file__).resolve().parent.parent
CUSTOMERS = [f"c{i:02d}" for i in range(12)]
STATUSES = ["open", "paid", "shipped", "cancelled"]
CUSTOMER_FEATURES = ("rows_count", "amount_sum", "amount_mean", "amount_min", "amount_max",
                     "status_count_distinct")  # fmt: skip

PIPELINE = """
from featurestream import CdcSource, Entity, Field, TableFeature, TableView

orders = CdcSource(
    name="orders", topic="{topic}", primary_key=("id",),
    fields=(
        Field(name="id", dtype="int"),
        Field(name="customer_id", dtype="str", nullable=True),
        Field(name="amount", dtype="float", nullable=True),
        Field(name="status", dtype="str", nullable=True),
        Field(name="updated_at", dtype="str", nullable=True),
    ),
)
views = [
    TableView(
        name="e2e_customer", entity=Entity(name="customer", join_keys=("customer_id",)), source=orders,
        features=(
            TableFeature(function="count"),
            TableFeature(function="sum", column="amount"),
            TableFeature(function="mean", column="amount"),
            TableFeature(function="min", column="amount"),
            TableFeature(function="max", column="amount"),
            TableFeature(function="count_distinct", column="status"),
        ),
    ),
    TableView(
        name="e2e_order", entity=Entity(name="order", join_keys=("id",)), source=orders,
        features=(
            TableFeature(function="latest", column="status"),
            TableFeature(function="latest", column="amount"),
            TableFeature(function="latest", column="updated_at"),
        ),
    ),
]
"""


class Table:
    """The orders table and writes to it; ``ids`` holds every id ever used."""

    def __init__(self, pg: PrivatePostgres, name: str, seed: int) -> None:
        self.pg, self.name = pg, name
        self.rng = random.Random(seed)
        self.next_id = 1
        self.ids: set[int] = set()
        with pg.connect() as conn:
            conn.execute(
                f"CREATE TABLE {name} (id int PRIMARY KEY, customer_id text, amount numeric(12, 2), "
                "status text, updated_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
            conn.execute(f"ALTER TABLE {name} REPLICA IDENTITY FULL")

    def _row(self) -> tuple[Any, ...]:
        rng = self.rng
        cust = None if rng.random() < 0.05 else rng.choice(CUSTOMERS)
        amount = None if rng.random() < 0.05 else f"{rng.randint(1, 99_999) / 100:.2f}"
        status = None if rng.random() < 0.05 else rng.choice(STATUSES)
        pk, self.next_id = self.next_id, self.next_id + 1
        self.ids.add(pk)
        return pk, cust, amount, status

    def live(self, conn: psycopg.Connection) -> list[int]:
        return [r[0] for r in conn.execute(f"SELECT id FROM {self.name} ORDER BY id").fetchall()]

    def insert(self, conn: psycopg.Connection) -> None:
        conn.execute(f"INSERT INTO {self.name} (id, customer_id, amount, status) VALUES (%s, %s, %s, %s)",
                     self._row())  # fmt: skip

    def update(self, conn: psycopg.Connection, pk: int) -> None:
        rng, t = self.rng, self.name
        kind = rng.random()
        if kind < 0.3:  # move the row to another customer (or to none)
            cust = None if rng.random() < 0.1 else rng.choice(CUSTOMERS)
            conn.execute(f"UPDATE {t} SET customer_id = %s, updated_at = clock_timestamp() WHERE id = %s",
                         (cust, pk))  # fmt: skip
        elif kind < 0.6:
            amount = None if rng.random() < 0.1 else f"{rng.randint(1, 99_999) / 100:.2f}"
            conn.execute(f"UPDATE {t} SET amount = %s, updated_at = clock_timestamp() WHERE id = %s",
                         (amount, pk))  # fmt: skip
        elif kind < 0.85:
            conn.execute(f"UPDATE {t} SET status = %s, updated_at = clock_timestamp() WHERE id = %s",
                         (rng.choice([*STATUSES, None]), pk))  # fmt: skip
        else:  # everything at once, twice in one transaction
            with conn.transaction():
                for _ in range(2):
                    _, cust, amount, status = self._row()
                    conn.execute(
                        f"UPDATE {t} SET customer_id = %s, amount = %s, status = %s, "
                        "updated_at = clock_timestamp() WHERE id = %s",
                        (cust, amount, status, pk),
                    )

    def random_writes(self, n: int, pause: float = 0.0) -> None:
        """``n`` autocommitted transactions: 40% inserts, 45% updates, 15% deletes."""
        with self.pg.connect() as conn:
            live = self.live(conn)
            for _ in range(n):
                kind = self.rng.random()
                if kind < 0.4 or len(live) < 10:
                    self.insert(conn)
                    live.append(self.next_id - 1)
                elif kind < 0.85:
                    self.update(conn, self.rng.choice(live))
                else:
                    pk = live.pop(self.rng.randrange(len(live)))
                    conn.execute(f"DELETE FROM {self.name} WHERE id = %s", (pk,))
                if pause:
                    time.sleep(pause)

    def oracle(self) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
        """The features of customers and orders, recomputed by SQL over the table now."""
        with self.pg.connect() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = conn.execute(
                "SELECT customer_id, count(*), coalesce(sum(amount), 0)::float8, avg(amount)::float8, "
                "min(amount)::float8, max(amount)::float8, count(DISTINCT status) "
                f"FROM {self.name} WHERE customer_id IS NOT NULL GROUP BY customer_id"
            ).fetchall()
            orders = conn.execute(
                f"SELECT id, status, amount::float8, updated_at FROM {self.name}"
            ).fetchall()
        per_customer = {c: dict.fromkeys(CUSTOMER_FEATURES) for c in CUSTOMERS}
        for c in CUSTOMERS:
            per_customer[c].update(rows_count=0, amount_sum=0.0, status_count_distinct=0)
        for cust, *values in rows:
            per_customer[cust] = dict(zip(CUSTOMER_FEATURES, values, strict=True))
        per_order = {pk: {"status": None, "amount": None, "updated_at": None} for pk in self.ids}
        for pk, status, amount, at in orders:
            per_order[pk] = {"status": status, "amount": amount, "updated_at": at}
        return per_customer, per_order


def same(got: Any, want: Any) -> bool:
    """Equal, floats to 1e-9 relative (PostgreSQL sums decimals exactly; the engine sums floats)."""
    if isinstance(want, float) and isinstance(got, float):
        return got == pytest.approx(want, rel=1e-9, abs=1e-9)
    return got == want


def online_diff(store: FeatureStore, want_c: dict[str, dict[str, Any]], want_o: dict[int, dict]) -> list:
    got = store.get_online_features(["e2e_customer"], CUSTOMERS).values
    diff: list[Any] = []
    for i, c in enumerate(CUSTOMERS):
        row = {f: got[f"e2e_customer:{f}"][i] for f in CUSTOMER_FEATURES}
        if not all(same(row[f], want_c[c][f]) for f in CUSTOMER_FEATURES):
            diff.append((c, row, want_c[c]))
    pks = sorted(want_o)
    got = store.get_online_features(["e2e_order"], [{"id": pk} for pk in pks]).values
    for i, pk in enumerate(pks):
        at = got["e2e_order:updated_at"][i]
        row = {
            "status": got["e2e_order:status"][i],
            "amount": got["e2e_order:amount"][i],
            "updated_at": None if at is None else datetime.fromisoformat(at),
        }
        if not all(same(row[k], v) for k, v in want_o[pk].items()):
            diff.append((pk, row, want_o[pk]))
    return diff


def settle(store: FeatureStore, table: Table, procs: dict[str, subprocess.Popen], logs: Path,
           phase: str, timeout: float = 30) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Wait until Redis equals the SQL oracle of the table now; the customers' oracle."""
    want_c, want_o = table.oracle()
    deadline = time.monotonic() + timeout
    while True:
        diff = online_diff(store, want_c, want_o)
        if not diff:
            return want_c
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited in {phase}: " + (logs / f"{name}.log").read_text()
        if time.monotonic() > deadline:
            tails = "".join((logs / f"{n}.log").read_text()[-2000:] for n in procs)
            raise AssertionError(f"{phase}: Redis != SQL after {timeout}s: {diff[:5]}\n{tails}")
        time.sleep(0.2)


class Procs:
    """The change source and the worker as subprocesses, with their logs in ``dir``."""

    def __init__(self, pg: PrivatePostgres, services: Services, tmp: Path, table: str, prefix: str) -> None:
        self.dir = tmp
        self.env = {
            **worker_env(services.kafka, services.redis_url, tmp, prefix),
            "FEATURESTREAM_DRIFT_INTERVAL_SECONDS": "0",
            "COLUMNS": "200",
        }
        self.tag = unique("e2e").replace("-", "_")
        self.cdc_cmd = [
            sys.executable, "-m", "featurestream.cli", "cdc", "postgres", "--dsn", pg.dsn,
            "--tables", f"public.{table}", "--slot", f"slot_{self.tag}", "--publication", f"pub_{self.tag}",
            "--topic-prefix", self.tag, "--partitions", "3",
        ]  # fmt: skip
        self.topic = f"{self.tag}.public.{table}"
        self.pipeline = tmp / "orders_e2e.py"
        self.pipeline.write_text(PIPELINE.format(topic=self.topic))
        self.worker_cmd = [
            sys.executable, "-m", "featurestream.cli", "run", str(self.pipeline),
            "--recovery-dir", str(tmp / "recovery"), "--snapshot-seconds", "0.5",
        ]  # fmt: skip
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        cmd = self.cdc_cmd if name == "cdc" else self.worker_cmd
        log = (self.dir / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def kill(self, name: str) -> None:
        proc = self.running[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_log(self, name: str, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        log = self.dir / f"{name}.log"
        while log.read_text().count(text) < count:
            assert self.running[name].poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def procs(private_postgres: PrivatePostgres, services: Services, tmp_path: Path) -> Iterator[Procs]:
    table = f"orders_{unique('t').replace('-', '_')}"
    p = Procs(private_postgres, services, tmp_path, table, unique("e2e"))
    p.table = Table(private_postgres, table, seed=5)  # type: ignore[attr-defined]
    yield p
    p.stop()
    with private_postgres.connect() as conn:  # a slot left behind would keep WAL forever
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active",
            (f"slot_{p.tag}",),
        )


def test_postgres_to_redis_and_delta_through_kills(procs: Procs, services: Services) -> None:
    table: Table = procs.table  # type: ignore[attr-defined]
    pg = table.pg
    with pg.connect() as conn:  # phase 0: rows that exist before the change source starts
        for _ in range(150):
            table.insert(conn)
    ensure_topic(services.kafka, procs.topic, 3)  # so the worker sees three partitions at start
    procs.start("cdc")
    procs.start("worker")
    views = load_views(procs.pipeline)
    store = FeatureStore(views, redis_url=services.redis_url, delta_uri=str(procs.dir / "delta"),
                         redis_prefix=procs.env["FEATURESTREAM_REDIS_PREFIX"])  # fmt: skip
    phases: list[tuple[str, int, dict[str, dict[str, Any]]]] = []  # (name, WAL position, oracle)

    def done(phase: str) -> None:
        want = settle(store, table, procs.running, procs.dir, phase)
        with pg.connect() as conn:  # where the next WAL record goes: the next phase's first change
            wal = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()[0]  # type: ignore[index]
        phases.append((phase, int(wal), want))

    procs.wait_log("cdc", "streaming from slot")
    done("snapshot")

    with pg.connect() as conn:
        for _ in range(150):
            table.insert(conn)
    done("inserts")

    with pg.connect() as conn:
        live = table.live(conn)
        for pk in table.rng.choices(live, k=200):
            table.update(conn, pk)
    done("updates")

    with pg.connect() as conn:
        live = table.live(conn)
        for pk in table.rng.sample(live, 60):
            conn.execute(f"DELETE FROM {table.name} WHERE id = %s", (pk,))
    done("deletes")

    t = table.name
    with pg.connect() as conn, conn.transaction():  # one bulk transaction of every kind of change
        for _ in range(300):
            table.insert(conn)
        conn.execute(f"UPDATE {t} SET customer_id = 'c0' || (id % 3)::text, amount = amount + 1 "
                     "WHERE id % 7 = 0")  # fmt: skip
        conn.execute(f"DELETE FROM {t} WHERE id % 11 = 0")
        conn.execute(f"UPDATE {t} SET id = id + 100000 WHERE id % 13 = 0")  # primary-key changes
        table.ids |= {pk + 100_000 for pk in table.ids if pk % 13 == 0}
        for _ in range(50):
            table.update(conn, table.rng.choice(table.live(conn)))
    done("bulk transaction")

    # the change source killed mid-phase: unacknowledged transactions are sent again
    writer = threading.Thread(target=table.random_writes, args=(300, 0.005))
    writer.start()
    time.sleep(0.6)
    assert writer.is_alive(), "the writer finished before the kill; slow it down"
    procs.kill("cdc")
    time.sleep(0.3)
    procs.start("cdc")
    writer.join()
    procs.wait_log("cdc", "streaming from slot", count=2)
    done("change source killed")

    # the worker killed mid-phase: it resumes from its last snapshot in the recovery dir
    writer = threading.Thread(target=table.random_writes, args=(300, 0.005))
    writer.start()
    time.sleep(1.2)
    assert writer.is_alive(), "the writer finished before the kill; slow it down"
    assert any((procs.dir / "recovery").glob("part-*")), "no recovery snapshot before the kill"
    procs.kill("worker")
    procs.start("worker")
    writer.join()
    done("worker killed")

    # still equal a moment later: nothing arrives twice after settling
    time.sleep(1.0)
    want_c, want_o = table.oracle()
    assert online_diff(store, want_c, want_o) == []
    procs.stop()  # SIGTERM: the worker writes what it buffered to Delta, then exits
    assert procs.running["worker"].returncode == 0, (procs.dir / "worker.log").read_text()

    # each phase's time is its last commit's (the newest change before its WAL position), to the ms
    log = DeltaTable(store.offline.table_uri(views[0].name, views[0].version)).to_pyarrow_table()
    lsn = log["lsn"].to_pylist()
    ts = pc.cast(log["event_ts"], pa.timestamp("ms", "UTC")).cast(pa.int64()).to_pylist()
    at = [max(t for t, pos in zip(ts, lsn, strict=True) if pos < wal) for _, wal, _ in phases]
    # every phase, point in time, from Delta; and a millisecond before the bulk transaction's
    # commit, the table as before it (a transaction is seen whole or not at all)
    bulk = next(i for i, p in enumerate(phases) if p[0] == "bulk transaction")
    checks = [(name, t, want) for (name, _, want), t in zip(phases, at, strict=True)]
    checks.append(("before the bulk commit", at[bulk] - 1, phases[bulk - 1][2]))
    assert len({t for _, t, _ in checks}) == len(checks), "two phases in one millisecond"
    entity_df = pa.table(
        {
            "customer_id": [c for _ in checks for c in CUSTOMERS],
            "event_timestamp": pa.array([t for _, t, _ in checks for _ in CUSTOMERS], pa.int64()).cast(
                pa.timestamp("ms", "UTC")
            ),
        }
    )
    training = store.get_training_set(entity_df, ["e2e_customer"]).to_pylist()
    i = 0
    for phase, t, want in checks:
        for c in CUSTOMERS:
            got = {f: training[i][f"e2e_customer:{f}"] for f in CUSTOMER_FEATURES}
            assert all(same(got[f], want[c][f]) for f in CUSTOMER_FEATURES), (phase, t, c, got, want[c])
            i += 1
    # the killed change source re-sent what it had not acknowledged: the log holds those
    # changes twice (at new offsets), and neither Redis nor the training sets counted them twice
    changes = list(zip(log["pk"].to_pylist(), log["position"].to_pylist(), strict=True))
    assert len(set(changes)) < len(changes), "no change was re-sent: the kill was not mid-stream"
