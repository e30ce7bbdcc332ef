"""PostgreSQL change source: logical replication (``pgoutput``) to Debezium-format Kafka events.

For setups without Kafka Connect (Debezium stays the production path, see docker/). It reads a
publication through a logical replication slot and writes, per table, to the topic
``<prefix>.<schema>.<table>`` what Debezium's PostgreSQL connector writes there: the key is the
primary key as JSON (``{"id": 1}``), the value the envelope ``before``, ``after``, ``source``
(``version``, ``connector``, ``name``, ``ts_ms``, ``snapshot``, ``db``, ``sequence``, ``schema``,
``table``, ``txId``, ``lsn``, ``xmin``), ``op`` (``r`` snapshot read, ``c``, ``u``, ``d``), ``ts_ms``
(processing time) and ``transaction``. A delete is followed by a tombstone (the key with a null
value); an update of the primary key is a delete (and tombstone) of the old key and a create of
the new one, at the same lsn. By default the JSON is ``schemas.enable=false`` style;
``schemas=True`` wraps key and value in Kafka Connect's ``{"schema": ..., "payload": ...}``.
``source.sequence`` is ``["<commit lsn of the transaction>", "<lsn>"]``: Debezium writes the
previous commit's LSN first; this source writes its own transaction's, which orders events
exactly as the stream does and stays identical when an event is re-sent. Snapshot events carry
``snapshot: "true"`` (``"last"`` on the very last one) and the snapshot's ``xmin`` as ``txId``.

Replication client: psycopg 3 (the project's driver) does not implement the replication
protocol, so the stream is read with psycopg2's ``LogicalReplicationConnection``
(``psycopg2-binary``), the maintained, long-standing client of it; catalog queries and the
snapshot use psycopg 3.

Start: on first run the slot is created with an exported snapshot; the rows of every table are
read in that snapshot (``op: r``) and published before streaming starts from the slot's
consistent point, so each change is either in the snapshot or in the stream, never both or
neither. A state record (compacted topic ``<prefix>.cdc-state``, key = slot name) says whether the
snapshot of the slot finished; a slot whose snapshot did not finish (a crash) is dropped and the
whole start is done again.

Delivery guarantee: at-least-once publishing, in order per key. The producer is idempotent with
``acks=all``; the position acknowledged to PostgreSQL (``flush_lsn``) is the end of the newest
transaction whose messages, and those of every transaction before it, Kafka has acknowledged
(delivery reports). After a clean stop (SIGTERM/SIGINT: the current transaction is finished and
everything flushed and acknowledged) a restart sends no duplicate. After a crash, the
transactions after the acknowledged position are sent again, with identical keys and envelopes
(but the top-level ``ts_ms``, the processing time); a crash during the snapshot re-does it. Every
event's ``source.lsn`` is the WAL position of its change and strictly increases per key across
the snapshot and the stream (snapshot rows carry the slot's ``restart_lsn`` at creation, below
every streamed change; row locks order the changes of one key by WAL position), so a consumer
that ignores a change whose ``source.lsn`` is not newer than the one it applied for that key
(``d`` and ``c`` of a primary-key change share an lsn but have different keys) applies each change
exactly once in effect.

Old row images: with ``REPLICA IDENTITY FULL`` updates and deletes carry the whole old row in
``before``. Without it (PostgreSQL's default) an update has ``before: null`` and a delete's
``before`` holds only the key columns (others null), as with Debezium. ``set_replica_identity``
sets FULL on the tables (needs table ownership); otherwise a warning says how. An unchanged
TOASTed value that an update's new row does not carry is taken from the full old row; without
one it is ``"__debezium_unavailable_value"``, as with Debezium.
Truncates are not published (Debezium's default ``skipped.operations=t``).
"""

from __future__ import annotations

import json
import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Producer
from psycopg import sql
from psycopg.adapt import Loader

from connectors import pgoutput as pgo
from connectors.cdc_config import CdcConfig, CdcError, format_lsn, parse_lsn, parse_tables
from connectors.cdc_state import ensure_state_topic, read_state, state_topic
from connectors.debezium_format import VERSION, CdcTable, envelope, message_key
from connectors.kafka import ensure_topic, make_producer
from connectors.pg_catalog import prepare
from engine.redact import redact_text

__all__ = ["VERSION", "CdcConfig", "CdcError", "PostgresChangeSource", "format_lsn", "parse_tables"]

log = logging.getLogger(__name__)


@dataclass
class _Tx:
    pending: int = 0
    end_lsn: int | None = None


class PostgresChangeSource:
    """Publishes the changes of ``config.tables`` to Kafka until ``stop`` is set (see module doc)."""

    def __init__(self, config: CdcConfig, echo: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.echo = echo or (lambda line: log.info("%s", line))
        self._tables: dict[tuple[str, str], CdcTable] = {}
        self._relations: dict[int, pgo.Relation] = {}
        self._txs: deque[_Tx] = deque()
        self._failure: str | None = None
        self.acked_lsn = 0
        self.published = 0
        self._db = ""
        self._producer: Producer | None = None

    def _say(self, text: str) -> None:
        self.echo(redact_text(text))

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.config.dsn, autocommit=True, options="-c TimeZone=UTC")
        except psycopg.Error as exc:
            raise CdcError(f"dsn: cannot connect to PostgreSQL: {redact_text(str(exc))}") from None

    # --- Kafka ------------------------------------------------------------------------------

    def _make_producer(self) -> Producer:
        return make_producer(
            self.config.kafka_bootstrap_servers,
            self.config.kafka_config,
            {
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 20,
                # The Java client's partitioner, so keys land where Debezium would put them.
                "partitioner": "murmur2_random",
            },
        )

    def _send(self, topic: str, key: bytes, value: bytes | None, tx: _Tx, count: bool = True) -> None:
        assert self._producer is not None
        tx.pending += 1

        def done(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._failure = self._failure or f"Kafka did not accept an event for {topic}: {err.str()}"
            else:
                tx.pending -= 1
                self.published += count

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=done)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)
        self._producer.poll(0)

    def _advance(self) -> None:
        if self._failure:
            raise CdcError(self._failure + "; nothing after the acknowledged position is lost: restart")
        while self._txs and self._txs[0].end_lsn is not None and self._txs[0].pending == 0:
            self.acked_lsn = max(self.acked_lsn, self._txs.popleft().end_lsn or 0)

    def _drain(self, timeout: float = 60.0) -> None:
        """Wait until Kafka acknowledged everything produced (raises on a delivery failure)."""
        assert self._producer is not None
        left = self._producer.flush(timeout)
        self._advance()
        if left:
            raise CdcError(f"Kafka did not acknowledge {left} event(s) within {timeout:.0f}s")

    def _write_state(self, status: str, **extra: Any) -> None:
        tx = _Tx()
        body = json.dumps({"slot": self.config.slot, "status": status, **extra}).encode()
        self._send(state_topic(self.config), self.config.slot.encode(), body, tx, count=False)
        self._drain()

    # --- events -----------------------------------------------------------------------------

    def _envelope(self, table: CdcTable, op: str, before: Any, after: Any, **position: Any) -> bytes:
        return envelope(
            table,
            op,
            before,
            after,
            server_name=self.config.topic_prefix,
            db=self._db,
            schemas=self.config.schemas,
            **position,
        )

    def _key(self, table: CdcTable, row: dict[str, Any]) -> bytes:
        return message_key(table, row, self.config.schemas)

    def _row(
        self, table: CdcTable, values: list[Any], relation: pgo.Relation | None = None
    ) -> dict[str, Any]:
        cols = relation.columns if relation is not None else table.columns
        return {c.name: pgo.convert(c, v) for c, v in zip(cols, values, strict=True)}

    # --- snapshot ---------------------------------------------------------------------------

    def _snapshot(self, snapshot_name: str, lsn: int, stop: threading.Event) -> bool:
        """Publish every row of every table as ``op: r``, read in the slot's exported snapshot."""
        tx = _Tx()
        with self._connect() as conn:
            conn.autocommit = False
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
            xmin = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()
            tx_id = int(xmin[0]) if xmin else None
            ts_ms = int(time.time() * 1000)
            last: tuple[str, bytes, bytes] | None = None  # held back: the very last one is "last"
            for table in self._tables.values():
                for col in table.columns:  # values as their output function's text, as pgoutput sends
                    conn.adapters.register_loader(col.type_oid, _AsText)
                cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns)
                query = sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier(table.schema, table.name))
                n = 0
                with conn.cursor(name=f"fs_cdc_{n}_{table.name}"[:60]) as cur:
                    cur.itersize = 2000
                    for values in cur.execute(query):
                        if stop.is_set():
                            return False
                        if last is not None:
                            self._send(*last, tx)
                        row = self._row(table, list(values))
                        value = self._envelope(
                            table,
                            "r",
                            None,
                            row,
                            lsn=lsn,
                            ts_ms=ts_ms,
                            tx_id=tx_id,
                            snapshot="true",
                            commit=None,
                        )
                        last = (table.topic, self._key(table, row), value)
                        n += 1
                self._say(f"snapshot: {table.schema}.{table.name}: {n} row(s)")
            if last is not None:
                topic, key, value = last
                self._send(topic, key, value.replace(b'"snapshot":"true"', b'"snapshot":"last"', 1), tx)
            conn.commit()
        self._drain(timeout=300)
        return True

    # --- stream -----------------------------------------------------------------------------

    def _on_change(self, ch: pgo.Change, begin: pgo.Begin, lsn: int, commit: int, tx: _Tx) -> None:
        rel = self._relations[ch.rel_id]
        table = self._tables.get((rel.schema, rel.table))
        if table is None:  # a table of the publication that was not asked for
            return
        new = self._row(table, ch.new, rel) if ch.new is not None else None
        old = None
        if ch.old is not None:
            old = self._row(table, ch.old, rel)
            if new is not None:  # an unchanged TOASTed value is in the old row image, if full
                for name, value in new.items():
                    if value is pgo.UNAVAILABLE and old.get(name) is not pgo.UNAVAILABLE:
                        new[name] = old[name]
            if ch.old_kind == "K":  # key columns only: the others are unknown
                keyed = {c.name for c in rel.columns if c.key}
                old = {k: (v if k in keyed else None) for k, v in old.items()}

        def emit(op: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
            row = after if after is not None else before
            assert row is not None
            key = self._key(table, row)
            value = self._envelope(
                table,
                op,
                before,
                after,
                lsn=lsn,
                ts_ms=begin.commit_ms,
                tx_id=begin.xid,
                snapshot="false",
                commit=commit,
            )
            self._send(table.topic, key, value, tx)
            if op == "d":
                self._send(table.topic, key, None, tx)

        if ch.op == "I":
            emit("c", None, new)
        elif ch.op == "D":
            emit("d", old, None)
        else:
            assert new is not None
            if old is not None and any(old[k] != new[k] for k in table.key):
                emit("d", old, None)  # the primary key changed: Debezium's delete + create
                emit("c", None, new)
            else:
                emit("u", old if ch.old_kind == "O" else None, new)

    def run(self, stop: threading.Event) -> None:
        """Set up, snapshot on first start, then stream until ``stop`` is set; on the way out, the
        current transaction is finished, Kafka flushed and the position acknowledged."""
        import psycopg2
        import psycopg2.extras

        with self._connect() as conn:
            self._db, self._tables = prepare(conn, self.config, self._say)
            kafka, extra = self.config.kafka_bootstrap_servers, self.config.kafka_config
            for t in self._tables.values():
                ensure_topic(kafka, t.topic, self.config.partitions, config=extra)
            ensure_state_topic(self.config)
            slot = conn.execute(
                "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s", (self.config.slot,)
            ).fetchone()
            if slot is not None and (slot[0] != "pgoutput" or slot[1] != self._db):
                raise CdcError(
                    f"slot: replication slot {self.config.slot!r} exists for plugin {slot[0]} in "
                    f"database {slot[1]}; pass --slot with another name"
                )
            state = read_state(self.config) if slot is not None else None
            if slot is not None and (state is None or state.get("status") != "done"):
                self._say(f"slot {self.config.slot}: its snapshot did not finish; starting over")
                conn.execute("SELECT pg_drop_replication_slot(%s)", (self.config.slot,))
                slot = None
        try:
            repl = psycopg2.connect(
                self.config.dsn,
                connection_factory=psycopg2.extras.LogicalReplicationConnection,
                options="-c TimeZone=UTC",
            )
        except psycopg2.Error as exc:
            raise CdcError(f"dsn: cannot open a replication connection: {redact_text(str(exc))}") from None
        try:
            self._producer = self._make_producer()
            cur = repl.cursor()
            if slot is None:
                self._write_state("snapshotting")
                cur.execute(f"CREATE_REPLICATION_SLOT {self.config.slot} LOGICAL pgoutput EXPORT_SNAPSHOT")
                _, consistent, snap_name, _ = cur.fetchone()
                with self._connect() as conn:
                    restart = conn.execute(
                        "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                        (self.config.slot,),
                    ).fetchone()
                snap_lsn = parse_lsn(restart[0]) if restart and restart[0] else parse_lsn(consistent)
                self._say(
                    f"slot {self.config.slot} created at {consistent}; "
                    f"snapshot of {len(self._tables)} table(s)"
                )
                if not self._snapshot(snap_name, snap_lsn, stop):
                    self._say("stopped during the snapshot; the next start takes it again")
                    return
                self._write_state("done", lsn=snap_lsn)
                self._say(f"snapshot published ({self.published} event(s))")
            self._stream(cur, stop)
        finally:
            if self._producer is not None:
                self._producer.flush(30)
                self._producer = None
            repl.close()

    def _stream(self, cur: Any, stop: threading.Event) -> None:
        cur.start_replication(
            slot_name=self.config.slot,
            decode=False,
            options={"proto_version": "1", "publication_names": self.config.publication},
            status_interval=self.config.status_interval,
        )
        self._say(f"streaming from slot {self.config.slot}")
        begin: pgo.Begin | None = None
        tx: _Tx | None = None
        sent_lsn = 0
        last_report, reported = time.monotonic(), 0
        sent_at = time.monotonic()
        assert self._producer is not None
        while True:
            if stop.is_set() and begin is None:
                break
            msg = cur.read_message()
            if msg is None:
                self._producer.poll(0)
                self._advance()
                if self.acked_lsn > sent_lsn:
                    cur.send_feedback(flush_lsn=self.acked_lsn)
                    sent_lsn = self.acked_lsn
                if time.monotonic() - last_report > 5 and self.published != reported:
                    last_report, reported = time.monotonic(), self.published
                    self._say(
                        f"published {self.published} event(s); acknowledged {format_lsn(self.acked_lsn)}"
                    )
                select.select([cur], [], [], 0.2)
                continue
            m = pgo.decode(msg.payload)
            if isinstance(m, pgo.Begin):
                begin, tx = m, _Tx()
                self._txs.append(tx)
            elif isinstance(m, pgo.Commit):
                assert tx is not None
                tx.end_lsn = m.end_lsn
                begin = tx = None
                self._advance()
                due = time.monotonic() - sent_at >= self.config.status_interval
                if self.acked_lsn > sent_lsn and due:  # while busy: once per status interval
                    cur.send_feedback(flush_lsn=self.acked_lsn, force=True)
                    sent_lsn, sent_at = self.acked_lsn, time.monotonic()
            elif isinstance(m, pgo.Relation):
                self._relations[m.rel_id] = m
            elif isinstance(m, pgo.Change):
                assert begin is not None and tx is not None
                self._on_change(m, begin, msg.data_start, begin.final_lsn, tx)
            elif isinstance(m, pgo.Truncate):
                self._say("note: a TRUNCATE is not published (as Debezium's default skipped.operations=t)")
        self._drain()
        cur.send_feedback(flush_lsn=self.acked_lsn, force=True)
        self._say(f"stopped: published {self.published} event(s); acknowledged {format_lsn(self.acked_lsn)}")
        self._wait_confirmed()

    def _wait_confirmed(self, timeout: float = 5.0) -> None:
        """Wait until the slot shows the acknowledged position, so a restart resends nothing."""
        if not self.acked_lsn:
            return
        deadline = time.monotonic() + timeout
        with self._connect() as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                    (self.config.slot,),
                ).fetchone()
                if row and row[0] and parse_lsn(row[0]) >= self.acked_lsn:
                    return
                time.sleep(0.05)
        self._say("warning: PostgreSQL did not confirm the last position in time; a restart may resend")


class _AsText(Loader):
    """A column value as PostgreSQL's text output (the form pgoutput sends)."""

    def load(self, data: Any) -> str:
        return bytes(data).decode("utf-8")
