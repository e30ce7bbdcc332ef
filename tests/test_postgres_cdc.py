"""PostgreSQL change source (connectors/postgres_cdc.py) against a real PostgreSQL with logical
replication (a private server, tests/postgres_private.py) and the test broker."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from connectors.kafka import partition_count
from connectors.pgoutput import UNAVAILABLE
from connectors.postgres_cdc import VERSION, CdcConfig, CdcError, PostgresChangeSource, parse_tables
from engine.errors import ServiceUnavailable
from tests import postgres_private
from tests.conftest import Services
from tests.postgres_private import PrivatePostgres
from tests.support import unique

private_postgres = postgres_private.private_postgres  # the session fixture, used here
ROOT = Path(__file__).resolve().parent.parent

Event = tuple[dict[str, Any], dict[str, Any] | None]  # (key, value or None for a tombstone)


class _Reader:
    """Everything in a topic's partitions so far, read incrementally by one consumer. (It reads
    until the broker has nothing more, rather than to a high watermark, which the embedded broker
    can report too low while batches are being written.)"""

    readers: dict[tuple[str, str], _Reader] = {}

    def __init__(self, kafka: str, topic: str) -> None:
        self.kafka, self.topic = kafka, topic
        self.consumer: Consumer | None = None
        self.got: list[Event] = []

    def read(self) -> list[Event]:
        if self.consumer is None:
            try:
                parts = partition_count(self.kafka, self.topic)
            except ServiceUnavailable:  # the source has not created it yet
                return []
            self.consumer = Consumer(
                {"bootstrap.servers": self.kafka, "group.id": unique("t"), "enable.auto.commit": False}
            )
            self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(parts)])
        for _ in range(5):  # a bounded read: callers poll again
            msgs = self.consumer.consume(500, 0.2)
            if not msgs:
                break
            for m in msgs:
                assert m.error() is None, m.error()
                value = m.value()
                self.got.append((json.loads(m.key()), None if value is None else json.loads(value)))
        return list(self.got)


def events(kafka: str, topic: str) -> list[Event]:
    reader = _Reader.readers.get((kafka, topic))
    if reader is None:
        reader = _Reader.readers[(kafka, topic)] = _Reader(kafka, topic)
    return reader.read()


def wait_events(
    kafka: str, topic: str, ok: Callable[[list[Event]], bool], timeout: float = 30
) -> list[Event]:
    deadline = time.monotonic() + timeout
    while True:
        got = events(kafka, topic)
        if ok(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{topic}: condition not met in {timeout}s; have {len(got)} event(s)")
        time.sleep(0.2)


def at_least(n: int) -> Callable[[list[Event]], bool]:
    return lambda got: len(got) >= n


@pytest.fixture(scope="module", autouse=True)
def _close_readers() -> Iterator[None]:
    yield
    for reader in _Reader.readers.values():
        if reader.consumer is not None:
            reader.consumer.close()
    _Reader.readers.clear()


class Names:
    """Unique table, slot, publication and prefix names, so tests share one server."""

    def __init__(self) -> None:
        tag = unique("t").replace("-", "_")
        self.table = f"orders_{tag}"
        self.slot = f"slot_{tag}"
        self.publication = f"pub_{tag}"
        self.prefix = f"pg_{tag}"
        self.topic = f"{self.prefix}.public.{self.table}"


@pytest.fixture
def names(private_postgres: PrivatePostgres) -> Iterator[Names]:
    n = Names()
    yield n
    with private_postgres.connect() as conn:  # a slot left behind would keep WAL forever
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active",
            (n.slot,),
        )


def confirmed(pg: PrivatePostgres, slot: str) -> int:
    """The slot's confirmed_flush_lsn as a number."""
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    assert row is not None, f"no slot {slot}"
    return int(row[0])


def make_table(pg: PrivatePostgres, table: str, full: bool = True) -> None:
    with pg.connect() as conn:
        conn.execute(
            f"CREATE TABLE {table} (id int PRIMARY KEY, big bigint, amount numeric(12, 2), "
            "note text, paid bool, at timestamptz)"
        )
        if full:
            conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")


class Running:
    """The change source on a thread of this process, stopped like SIGTERM does."""

    def __init__(self, config: CdcConfig) -> None:
        self.stop = threading.Event()
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.source = PostgresChangeSource(config, echo=self.lines.append)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.source.run(self.stop)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the change source did not stop"
        if self.error:
            raise self.error


def config(pg: PrivatePostgres, kafka: str, n: Names, **kw: Any) -> CdcConfig:
    return CdcConfig(
        dsn=pg.dsn,
        tables=[("public", n.table)],
        kafka_bootstrap_servers=kafka,
        slot=n.slot,
        publication=n.publication,
        topic_prefix=n.prefix,
        **kw,
    )


def strip_times(value: dict[str, Any]) -> dict[str, Any]:
    """The envelope without its clocks (checked separately)."""
    out = json.loads(json.dumps(value))
    assert isinstance(out.pop("ts_ms"), int)
    assert isinstance(out["source"].pop("ts_ms"), int)
    return out


def test_snapshot_then_changes_in_debezium_format(
    private_postgres: PrivatePostgres, services: Services, names: Names
) -> None:
    pg, kafka, t = private_postgres, services.kafka, names.table
    make_table(pg, t)
    with pg.connect() as conn:
        conn.execute(
            f"INSERT INTO {t} VALUES "
            "(1, 9007199254740993, 12.50, 'first', true, '2024-03-01 10:00:00.25+02'), "
            "(2, -5, 0.10, 'second', false, '2024-03-01 00:00:00+00'), (3, NULL, NULL, NULL, NULL, NULL)"
        )
    run = Running(config(pg, kafka, names))
    try:
        snap = wait_events(kafka, names.topic, at_least(3))
        assert [k for k, _ in snap] == [{"id": 1}, {"id": 2}, {"id": 3}]
        first = snap[0][1]
        assert first is not None
        lsn = first["source"]["lsn"]
        assert strip_times(first) == {
            "before": None,
            "after": {
                "id": 1,
                "big": 9007199254740993,
                "amount": "12.50",
                "note": "first",
                "paid": True,
                "at": "2024-03-01T08:00:00.25Z",
            },
            "source": {
                "version": VERSION,
                "connector": "postgresql",
                "name": names.prefix,
                "snapshot": "true",
                "db": "postgres",
                "sequence": json.dumps([None, str(lsn)]),
                "schema": "public",
                "table": t,
                "txId": first["source"]["txId"],
                "lsn": lsn,
                "xmin": None,
            },
            "op": "r",
            "transaction": None,
        }
        assert isinstance(lsn, int) and isinstance(first["source"]["txId"], int)
        assert [v["source"]["snapshot"] for _, v in snap if v] == ["true", "true", "last"]
        assert snap[2][1] and snap[2][1]["after"] == {
            "id": 3, "big": None, "amount": None, "note": None, "paid": None, "at": None,
        }  # fmt: skip

        with pg.connect() as conn:
            conn.execute(f"INSERT INTO {t} VALUES (4, 40, 4.00, 'four', true, now())")
            conn.execute(f"UPDATE {t} SET note = 'changed', amount = 13 WHERE id = 1")
            conn.execute(f"UPDATE {t} SET id = 20 WHERE id = 2")  # primary key change
            conn.execute(f"DELETE FROM {t} WHERE id = 3")
            with conn.transaction():  # bulk: one transaction
                conn.execute(f"INSERT INTO {t} (id, big) SELECT g, g FROM generate_series(100, 149) g")
                conn.execute(f"UPDATE {t} SET big = big * 2 WHERE id >= 100")
        got = wait_events(kafka, names.topic, at_least(3 + 1 + 1 + 3 + 2 + 100))
        time.sleep(0.5)  # nothing more may come
        events(kafka, names.topic)
        got = events(kafka, names.topic)
        stream = got[3:]
        assert len(stream) == 107, "exactly the changes"

        k, c = stream[0]
        assert k == {"id": 4} and c and c["op"] == "c" and c["before"] is None
        assert c["after"]["amount"] == "4.00" and c["source"]["snapshot"] == "false"

        k, u = stream[1]
        assert k == {"id": 1} and u and u["op"] == "u"
        assert u["before"] == snap[0][1]["after"]  # type: ignore[index]
        assert u["after"] == {**u["before"], "note": "changed", "amount": "13.00"}
        # the key change: delete of the old key, its tombstone, create of the new key
        (k1, d), (k2, tomb), (k3, c2) = stream[2:5]
        assert (k1, k2, k3) == ({"id": 2}, {"id": 2}, {"id": 20}) and tomb is None
        assert d and d["op"] == "d" and d["after"] is None and d["before"]["id"] == 2
        assert c2 and c2["op"] == "c" and c2["before"] is None and c2["after"] == {**d["before"], "id": 20}
        assert d["source"]["lsn"] == c2["source"]["lsn"] and d["source"]["txId"] == c2["source"]["txId"]
        (k, d3), (kt, tomb3) = stream[5:7]
        assert k == kt == {"id": 3} and tomb3 is None
        assert d3 and d3["op"] == "d" and d3["before"] == snap[2][1]["after"]  # type: ignore[index]
        bulk = stream[7:]
        assert [v["op"] for _, v in bulk if v] == ["c"] * 50 + ["u"] * 50
        assert len({v["source"]["txId"] for _, v in bulk if v}) == 1
        lsns = [v["source"]["lsn"] for _, v in bulk if v]
        assert lsns == sorted(lsns) and len(set(lsns)) == 100
        assert all(v["source"]["lsn"] > lsn for _, v in stream if v), (
            "streamed changes are newer than the snapshot"
        )
        for _, v in stream:  # sequence: [commit lsn of the transaction, lsn of the change]
            if v is not None:
                commit, at = json.loads(v["source"]["sequence"])
                assert int(at) == v["source"]["lsn"] and int(commit) > int(at)
        assert len({json.loads(v["source"]["sequence"])[0] for _, v in bulk if v}) == 1
        # the position is acknowledged to PostgreSQL while streaming (not only at a stop)
        newest = max(v["source"]["lsn"] for _, v in stream if v)
        deadline = time.monotonic() + 10
        while confirmed(pg, names.slot) <= newest:
            assert time.monotonic() < deadline, "the slot's confirmed_flush_lsn did not advance"
            time.sleep(0.1)
        # every event of the stream names its transaction's commit time and the source's settings
        assert {v["source"]["name"] for _, v in got if v} == {names.prefix}
    finally:
        run.close()
    assert any("snapshot" in line for line in run.lines)


class Writer:
    """Random single- and multi-row transactions on 20 keys, on a thread. Every write sets ``big``
    to a new sequence number, so the expected change events per key are known exactly."""

    def __init__(self, pg: PrivatePostgres, table: str, seed: int) -> None:
        self.pg, self.table = pg, table
        self.rng = __import__("random").Random(seed)
        self.rows: dict[int, int] = {}
        self.expected: dict[int, list[tuple[str, int]]] = defaultdict(list)
        self.seq = 0
        self.thread: threading.Thread | None = None

    def preload(self, n: int) -> None:
        """Rows that exist before the source starts: the snapshot's ``r`` events."""
        with self.pg.connect() as conn:
            for key in range(n):
                self.seq += 1
                conn.execute(f"INSERT INTO {self.table} (id, big) VALUES (%s, %s)", (key, self.seq))
                self.rows[key] = self.seq
                self.expected[key].append(("r", self.seq))

    def _one(self, conn: psycopg.Connection) -> None:
        key = self.rng.randrange(20)
        self.seq += 1
        if key not in self.rows:
            conn.execute(f"INSERT INTO {self.table} (id, big) VALUES (%s, %s)", (key, self.seq))
            self.expected[key].append(("c", self.seq))
            self.rows[key] = self.seq
        elif self.rng.random() < 0.25:
            conn.execute(f"DELETE FROM {self.table} WHERE id = %s", (key,))
            self.expected[key].append(("d", self.rows.pop(key)))
        else:
            conn.execute(f"UPDATE {self.table} SET big = %s WHERE id = %s", (self.seq, key))
            self.expected[key].append(("u", self.seq))
            self.rows[key] = self.seq

    def write(self, transactions: int, pause: float = 0.01) -> None:
        with self.pg.connect() as conn:
            for _ in range(transactions):
                with conn.transaction():
                    for _ in range(self.rng.choice((1, 1, 1, 5))):
                        self._one(conn)
                time.sleep(pause)

    def start(self, transactions: int) -> None:
        self.thread = threading.Thread(target=self.write, args=(transactions,), daemon=True)
        self.thread.start()

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(60)
        assert not self.thread.is_alive()

    def total(self) -> int:
        return sum(len(v) for v in self.expected.values())


def distinct_per_key(got: list[Event]) -> dict[int, list[dict[str, Any]]]:
    """Per key, the change events in Kafka order without replays. Asserts the replay contract:
    a replayed event is identical to the first (but for the processing time ``ts_ms``), first
    appearances are in strictly increasing lsn order, and each delete is followed by a tombstone."""
    seen: dict[tuple[int, int, str], dict[str, Any]] = {}
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    last: dict[int, Event | None] = {}
    for key, value in got:
        k = key["id"]
        if value is None:
            prev = last.get(k)
            assert prev is not None and prev[1] is not None and prev[1]["op"] == "d", (
                "tombstone after a delete"
            )
        else:
            ident = (k, value["source"]["lsn"], value["op"])
            if ident in seen:
                assert {**seen[ident], "ts_ms": 0} == {**value, "ts_ms": 0}, "a replay is the same event"
            else:
                assert not out[k] or out[k][-1]["source"]["lsn"] < value["source"]["lsn"], "lsn order per key"
                seen[ident] = value
                out[k].append(value)
        last[k] = (key, value)
    return out


def observed(per_key: dict[int, list[dict[str, Any]]]) -> dict[int, list[tuple[str, int]]]:
    return {
        k: [(v["op"], (v["after"] or v["before"])["big"]) for v in values] for k, values in per_key.items()
    }


def start_cli(pg_dsn: str, kafka: str, n: Names, tmp_path: Path, log: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "FEATURESTREAM_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "200",
    }
    cmd = [
        sys.executable, "-m", "featurestream.cli", "cdc", "postgres", "--dsn", pg_dsn,
        "--tables", f"public.{n.table}", "--slot", n.slot, "--publication", n.publication,
        "--topic-prefix", n.prefix,
    ]  # fmt: skip
    out = (tmp_path / log).open("wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_cli(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()


def wait_streaming(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "streaming from slot" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_kill_9_mid_stream_loses_nothing(
    private_postgres: PrivatePostgres,
    services: Services,
    names: Names,
    tmp_path: Path,
) -> None:
    pg, kafka = private_postgres, services.kafka
    make_table(pg, names.table)
    writer = Writer(pg, names.table, seed=7)
    writer.preload(10)
    proc = start_cli(pg.dsn, kafka, names, tmp_path, "first.log")
    try:
        wait_events(kafka, names.topic, at_least(10), timeout=60)
        writer.start(400)
        wait_events(kafka, names.topic, at_least(450))
        assert writer.thread is not None and writer.thread.is_alive()
        proc.kill()  # SIGKILL mid-stream: produced but unacknowledged changes are re-sent
        proc.wait(10)
        writer.join()
        proc = start_cli(pg.dsn, kafka, names, tmp_path, "second.log")
        wait_streaming(tmp_path / "second.log")
        total = writer.total()
        got = wait_events(
            kafka, names.topic, lambda g: sum(map(len, distinct_per_key(g).values())) >= total, timeout=60
        )
        assert observed(distinct_per_key(got)) == dict(writer.expected)
        stop_cli(proc, tmp_path / "second.log")
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "second.log").read_text()
    resent = int(log.rsplit("stopped: published ", 1)[1].split()[0])
    assert resent < writer.total(), "the restart resumed from the acknowledged position, not the start"
    assert "streaming from slot" in log and "snapshot" not in log.split("streaming")[0], log


def test_sigterm_restart_sends_no_duplicate(
    private_postgres: PrivatePostgres,
    services: Services,
    names: Names,
    tmp_path: Path,
) -> None:
    pg, kafka = private_postgres, services.kafka
    make_table(pg, names.table)
    secret = "hunter2-cdc-secret"
    dsn = pg.dsn.replace(f"{pg.user}@", f"{pg.user}:{secret}@")  # trust auth ignores it
    writer = Writer(pg, names.table, seed=11)
    writer.preload(5)
    proc = start_cli(dsn, kafka, names, tmp_path, "first.log")
    try:
        wait_events(kafka, names.topic, at_least(5), timeout=60)
        writer.start(300)
        wait_events(kafka, names.topic, at_least(100))
        assert writer.thread is not None and writer.thread.is_alive()
        stop_cli(proc, tmp_path / "first.log")  # mid-stream: the writer goes on
        writer.join()
        proc = start_cli(dsn, kafka, names, tmp_path, "second.log")
        wait_streaming(tmp_path / "second.log")
        total = writer.total()
        got = wait_events(
            kafka, names.topic, lambda g: len([v for _, v in g if v is not None]) >= total, timeout=60
        )
        time.sleep(1.0)  # a duplicate would come now
        stop_cli(proc, tmp_path / "second.log")
        got = events(kafka, names.topic)
        changes = [(k["id"], v["source"]["lsn"], v["op"]) for k, v in got if v is not None]
        assert len(changes) == len(set(changes)) == total, "no duplicate, nothing lost"
        assert observed(distinct_per_key(got)) == dict(writer.expected)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text()
    assert "SIGTERM" in logs and "acknowledged" in logs, logs
    assert secret not in logs


def test_default_replica_identity_gives_debeziums_partial_images(
    private_postgres: PrivatePostgres, services: Services, names: Names
) -> None:
    pg, kafka, t = private_postgres, services.kafka, names.table
    make_table(pg, t, full=False)
    with pg.connect() as conn:
        conn.execute(f"INSERT INTO {t} (id, note) VALUES (1, 'a'), (2, 'b')")
    run = Running(config(pg, kafka, names))
    try:
        wait_events(kafka, names.topic, at_least(2))
        with pg.connect() as conn:
            conn.execute(f"UPDATE {t} SET note = 'changed' WHERE id = 1")
            conn.execute(f"DELETE FROM {t} WHERE id = 2")
            conn.execute(f"UPDATE {t} SET id = 10 WHERE id = 1")
        got = wait_events(kafka, names.topic, at_least(2 + 1 + 2 + 3))
    finally:
        run.close()
    (_, u), (_, d), (_, tomb), (k4, d2), (_, _), (k6, c) = got[2:8]
    assert u and u["op"] == "u" and u["before"] is None and u["after"]["note"] == "changed"
    assert d and d["op"] == "d" and tomb is None
    assert d["before"] == {"id": 2, "big": None, "amount": None, "note": None, "paid": None, "at": None}
    # a key change is still a delete of the old key (key columns only) and a create of the new
    assert (
        k4 == {"id": 1}
        and d2
        and d2["op"] == "d"
        and d2["before"]["id"] == 1
        and d2["before"]["note"] is None
    )
    assert k6 == {"id": 10} and c and c["op"] == "c" and c["after"]["note"] == "changed"
    assert any("lacks REPLICA IDENTITY FULL" in line for line in run.lines)


def test_schemas_option_wraps_key_and_value(
    private_postgres: PrivatePostgres, services: Services, names: Names
) -> None:
    pg, kafka, t = private_postgres, services.kafka, names.table
    make_table(pg, t, full=False)
    with pg.connect() as conn:
        conn.execute(f"INSERT INTO {t} VALUES (1, 2, 3.5, 'x', true, '2024-01-01T00:00:00Z')")
    run = Running(config(pg, kafka, names, schemas=True, set_replica_identity=True))
    try:
        ((key, value),) = wait_events(kafka, names.topic, at_least(1))
    finally:
        run.close()
    assert key["payload"] == {"id": 1}
    assert key["schema"] == {
        "type": "struct",
        "fields": [{"type": "int32", "optional": False, "field": "id"}],
        "optional": False,
        "name": f"{names.prefix}.public.{t}.Key",
    }
    assert value is not None and value["payload"]["op"] == "r"
    assert value["payload"]["after"]["at"] == "2024-01-01T00:00:00Z"
    schema = value["schema"]
    assert schema["name"] == f"{names.prefix}.public.{t}.Envelope"
    assert [f["field"] for f in schema["fields"]] == [
        "before",
        "after",
        "source",
        "op",
        "ts_ms",
        "transaction",
    ]
    after = {f["field"]: f for f in schema["fields"][1]["fields"]}
    assert after["big"]["type"] == "int64" and after["amount"]["type"] == "string"
    assert after["at"]["name"] == "io.debezium.time.ZonedTimestamp" and after["paid"]["type"] == "boolean"
    assert any("set REPLICA IDENTITY FULL" in line for line in run.lines)
    with pg.connect() as conn:
        ident = conn.execute("SELECT relreplident FROM pg_class WHERE relname = %s", (t,)).fetchone()
    assert ident == ("f",)


def test_an_unfinished_snapshot_is_taken_again(
    private_postgres: PrivatePostgres, services: Services, names: Names
) -> None:
    pg, kafka, t = private_postgres, services.kafka, names.table
    make_table(pg, t)
    with pg.connect() as conn:
        conn.execute(f"INSERT INTO {t} (id) SELECT g FROM generate_series(1, 50) g")
    first = Running.__new__(Running)  # stopped before the snapshot's first row: as if it crashed
    first.stop = threading.Event()
    first.stop.set()
    first.lines = []
    PostgresChangeSource(config(pg, kafka, names), echo=first.lines.append).run(first.stop)
    assert any("stopped during the snapshot" in line for line in first.lines), first.lines
    assert confirmed(pg, names.slot) > 0, "the slot exists"
    with pg.connect() as conn:
        conn.execute(f"INSERT INTO {t} (id) VALUES (51)")
    run = Running(config(pg, kafka, names))
    try:
        got = wait_events(kafka, names.topic, at_least(51))
    finally:
        run.close()
    assert any("did not finish; starting over" in line for line in run.lines), run.lines
    assert sorted(k["id"] for k, _ in got) == list(range(1, 52))
    assert {v["op"] for _, v in got if v} == {"r"}


def test_bad_settings_are_named(private_postgres: PrivatePostgres, services: Services, names: Names) -> None:
    with pytest.raises(CdcError, match=r"tables: .*schema\.table"):
        parse_tables("a.b.c")
    with pytest.raises(CdcError, match="slot: 'Bad-Slot'"):
        CdcConfig(dsn="", tables=[("public", "t")], kafka_bootstrap_servers="", slot="Bad-Slot")
    missing = CdcConfig(
        dsn=private_postgres.dsn, tables=[("public", "nope")], kafka_bootstrap_servers=services.kafka
    )
    with pytest.raises(CdcError, match=r"tables: table public\.nope does not exist"):
        PostgresChangeSource(missing).run(threading.Event())
    secret = "pw-never-shown"
    bad = CdcConfig(
        dsn=f"postgresql://someone:{secret}@127.0.0.1:1/x",
        tables=[("public", "t")],
        kafka_bootstrap_servers=services.kafka,
    )
    with pytest.raises(CdcError, match="dsn: cannot connect") as exc:
        PostgresChangeSource(bad).run(threading.Event())
    assert secret not in str(exc.value)
    with private_postgres.connect() as conn:
        conn.execute(f"CREATE TABLE {names.table} (id int)")
    keyless = config(private_postgres, services.kafka, names)
    with pytest.raises(CdcError, match="has no primary key"):
        PostgresChangeSource(keyless).run(threading.Event())


def test_unchanged_toasted_value(private_postgres: PrivatePostgres, services: Services, names: Names) -> None:
    """A large value that an update leaves alone is not in the WAL's new row: with REPLICA
    IDENTITY FULL it comes from the old row image; without, it is Debezium's placeholder."""
    pg, kafka, t = private_postgres, services.kafka, names.table
    make_table(pg, t)
    rng = random.Random(3)  # incompressible, so stored out of line (TOAST)
    big = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(40_000))
    with pg.connect() as conn:
        conn.execute(f"INSERT INTO {t} (id, note) VALUES (1, %s)", (big,))
    run = Running(config(pg, kafka, names))
    try:
        wait_events(kafka, names.topic, at_least(1))
        with pg.connect() as conn:
            conn.execute(f"UPDATE {t} SET big = 1 WHERE id = 1")
            conn.execute(f"ALTER TABLE {t} REPLICA IDENTITY DEFAULT")
            conn.execute(f"UPDATE {t} SET big = 2 WHERE id = 1")
        got = wait_events(kafka, names.topic, at_least(3))
    finally:
        run.close()
    (_, full), (_, default) = got[1:3]
    assert full and full["after"]["note"] == big and full["after"]["big"] == 1
    assert default and default["after"]["note"] == UNAVAILABLE and default["after"]["big"] == 2
