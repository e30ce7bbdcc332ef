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
import re
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import NewTopic
from psycopg import sql
from psycopg.adapt import Loader

from connectors import pgoutput as pgo
from connectors.kafka import admin_client, ensure_topic, make_producer
from engine.errors import FeaturestreamError
from engine.redact import redact_text

__all__ = ["CdcConfig", "CdcError", "PostgresChangeSource", "format_lsn", "parse_tables"]

log = logging.getLogger(__name__)
VERSION = "2.7.3.Final"  # the Debezium envelope version this source writes (source.version)
_STATE_SUFFIX = ".cdc-state"
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,200}")


class CdcError(FeaturestreamError):
    """The change source cannot start or go on (configuration, permissions, Kafka delivery)."""


def format_lsn(lsn: int) -> str:
    """PostgreSQL's ``X/Y`` text of an LSN."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def parse_tables(spec: str | list[str]) -> list[tuple[str, str]]:
    """``public.orders,customers`` -> ``[("public", "orders"), ("public", "customers")]``."""
    items = spec.split(",") if isinstance(spec, str) else [t for s in spec for t in s.split(",")]
    out: list[tuple[str, str]] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        parts = raw.split(".")
        if len(parts) > 2 or not all(parts):
            raise CdcError(f"tables: {raw!r} is not a table name; write schema.table, e.g. public.orders")
        out.append((parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0]))
    if not out:
        raise CdcError("tables: no table given; pass --tables schema.table[,schema.table...]")
    return out


@dataclass(frozen=True)
class CdcConfig:
    dsn: str
    tables: list[tuple[str, str]]
    kafka_bootstrap_servers: str
    slot: str = "featurestream_cdc"
    publication: str = "featurestream_cdc"
    topic_prefix: str = "featurestream"
    kafka_config: Mapping[str, Any] = field(default_factory=dict)
    schemas: bool = False
    set_replica_identity: bool = False
    partitions: int = 1
    status_interval: float = 1.0

    def __post_init__(self) -> None:
        if not _SLOT_NAME.fullmatch(self.slot):
            raise CdcError(
                f"slot: {self.slot!r} is not a replication slot name; use lower-case letters, digits "
                "and underscores (at most 63)"
            )
        if not self.topic_prefix or not _TOPIC.fullmatch(self.topic_prefix):
            raise CdcError(
                f"topic_prefix: {self.topic_prefix!r} is not a Kafka topic prefix; use [A-Za-z0-9._-]"
            )


@dataclass
class _Table:
    schema: str
    name: str
    columns: tuple[pgo.Column, ...]
    key: tuple[str, ...]
    topic: str
    schema_key: dict[str, Any] | None = None
    schema_value: dict[str, Any] | None = None


@dataclass
class _Tx:
    pending: int = 0
    end_lsn: int | None = None


class PostgresChangeSource:
    """Publishes the changes of ``config.tables`` to Kafka until ``stop`` is set (see module doc)."""

    def __init__(self, config: CdcConfig, echo: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.echo = echo or (lambda line: log.info("%s", line))
        self._tables: dict[tuple[str, str], _Table] = {}
        self._relations: dict[int, pgo.Relation] = {}
        self._txs: deque[_Tx] = deque()
        self._failure: str | None = None
        self.acked_lsn = 0
        self.published = 0
        self._db = ""
        self._producer: Producer | None = None

    # --- setup ---------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        self.echo(redact_text(text))

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.config.dsn, autocommit=True, options="-c TimeZone=UTC")
        except psycopg.Error as exc:
            raise CdcError(f"dsn: cannot connect to PostgreSQL: {redact_text(str(exc))}") from None

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Check wal_level, the tables' keys and replica identity; create or extend the publication."""
        wal = conn.execute("SHOW wal_level").fetchone()
        if not wal or wal[0] != "logical":
            raise CdcError(
                f"PostgreSQL has wal_level={wal[0] if wal else '?'}; logical replication needs "
                "wal_level=logical (set it in postgresql.conf and restart the server)"
            )
        self._db = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        for schema, name in self.config.tables:
            row = conn.execute(
                "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
                (schema, name),
            ).fetchone()
            if row is None:
                raise CdcError(f"tables: table {schema}.{name} does not exist; create it or fix --tables")
            oid, ident = row
            cols = conn.execute(
                "SELECT a.attname, a.atttypid, a.atttypmod, "
                "coalesce(a.attnum = ANY(i.indkey), false) FROM pg_attribute a "
                "LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary "
                "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                (oid,),
            ).fetchall()
            keys = conn.execute(
                "SELECT a.attname FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
                "JOIN pg_attribute a ON a.attnum = k.attnum "
                "WHERE i.indrelid = %s AND i.indisprimary AND a.attrelid = %s ORDER BY k.ord",
                (oid, oid),
            ).fetchall()
            if not keys:
                raise CdcError(
                    f"tables: {schema}.{name} has no primary key, which is the Kafka message key of "
                    f"its change events; add one (ALTER TABLE {schema}.{name} ADD PRIMARY KEY (...))"
                )
            table = _Table(
                schema,
                name,
                tuple(pgo.Column(c[0], int(c[1]), int(c[2]), bool(c[3])) for c in cols),
                tuple(k[0] for k in keys),
                f"{self.config.topic_prefix}.{schema}.{name}",
            )
            if self.config.schemas:
                table.schema_key, table.schema_value = _connect_schemas(table, self.config.topic_prefix)
            self._tables[(schema, name)] = table
            if ident != "f":
                self._replica_identity(conn, schema, name)
        self._publication(conn)

    def _replica_identity(self, conn: psycopg.Connection[Any], schema: str, name: str) -> None:
        ident = sql.Identifier(schema, name)
        if self.config.set_replica_identity:
            try:
                conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(ident))
                self._say(f"set REPLICA IDENTITY FULL on {schema}.{name}")
                return
            except psycopg.Error as exc:
                self._say(f"warning: cannot set REPLICA IDENTITY FULL on {schema}.{name}: {exc}")
        self._say(
            f"warning: {schema}.{name} lacks REPLICA IDENTITY FULL, so updates carry no before image "
            f"and deletes only the key; run ALTER TABLE {schema}.{name} REPLICA IDENTITY FULL "
            "(or pass --set-replica-identity)"
        )

    def _publication(self, conn: psycopg.Connection[Any]) -> None:
        pub = self.config.publication
        exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (pub,)).fetchone()
        have = {
            (r[0], r[1])
            for r in conn.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (pub,)
            ).fetchall()
        }
        missing = [t for t in self.config.tables if t not in have]
        if exists and not missing:
            return
        names = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in missing)
        stmt = "ALTER PUBLICATION {} ADD TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
        try:
            conn.execute(sql.SQL(stmt).format(sql.Identifier(pub), names))
        except psycopg.Error as exc:
            raise CdcError(
                f"publication: cannot {'extend' if exists else 'create'} publication {pub!r}: {exc}. "
                "Create it as the tables' owner (CREATE PUBLICATION ... FOR TABLE ...) or pass "
                "--publication with an existing one"
            ) from None
        self._say(f"publication {pub}: {'added' if exists else 'created for'} {len(missing)} table(s)")

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

    def _state_topic(self) -> str:
        return self.config.topic_prefix + _STATE_SUFFIX

    def _ensure_state_topic(self) -> None:
        """The state topic, compacted: its latest record per slot must outlive any retention."""
        topic = self._state_topic()
        admin = admin_client(self.config.kafka_bootstrap_servers, self.config.kafka_config)
        if topic in admin.list_topics(timeout=10).topics:
            return
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=-1, config={"cleanup.policy": "compact"})]
        )
        try:
            futures[topic].result(10)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise CdcError(f"cannot create the state topic {topic}: {exc}") from None
        ensure_topic(self.config.kafka_bootstrap_servers, topic, 1, config=self.config.kafka_config)

    def _read_state(self) -> dict[str, Any] | None:
        """The latest state record of this slot (``None`` if none)."""
        topic = self._state_topic()
        consumer = Consumer(
            {
                **self.config.kafka_config,
                "bootstrap.servers": self.config.kafka_bootstrap_servers,
                "group.id": "featurestream-cdc-state",
                "enable.auto.commit": False,
            }
        )
        try:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            latest, last_offset = None, -1
            # To the high watermark, then on until nothing more comes (a broker may report the
            # watermark before its newest batch is readable).
            while True:
                msgs = consumer.consume(500, 5.0 if last_offset < high - 1 else 0.5)
                if not msgs:
                    if last_offset < high - 1:
                        raise CdcError(f"cannot read the state topic {topic} to its end ({high})")
                    return latest
                for m in msgs:
                    if m.error() is not None:
                        continue
                    last_offset = max(last_offset, m.offset())
                    if m.key() == self.config.slot.encode() and m.value():
                        latest = json.loads(m.value())
        finally:
            consumer.close()

    def _write_state(self, status: str, **extra: Any) -> None:
        tx = _Tx()
        body = json.dumps({"slot": self.config.slot, "status": status, **extra}).encode()
        self._send(self._state_topic(), self.config.slot.encode(), body, tx, count=False)
        self._drain()

    # --- events -----------------------------------------------------------------------------

    def _envelope(
        self,
        table: _Table,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        *,
        lsn: int,
        ts_ms: int,
        tx_id: int | None,
        snapshot: str,
        commit: int | None,
    ) -> bytes:
        payload = {
            "before": before,
            "after": after,
            "source": {
                "version": VERSION,
                "connector": "postgresql",
                "name": self.config.topic_prefix,
                "ts_ms": ts_ms,
                "snapshot": snapshot,
                "db": self._db,
                "sequence": json.dumps([None if commit is None else str(commit), str(lsn)]),
                "schema": table.schema,
                "table": table.name,
                "txId": tx_id,
                "lsn": lsn,
                "xmin": None,
            },
            "op": op,
            "ts_ms": int(time.time() * 1000),
            "transaction": None,
        }
        body = {"schema": table.schema_value, "payload": payload} if self.config.schemas else payload
        return json.dumps(body, separators=(",", ":")).encode()

    def _key(self, table: _Table, row: dict[str, Any]) -> bytes:
        key = {k: row[k] for k in table.key}
        body = {"schema": table.schema_key, "payload": key} if self.config.schemas else key
        return json.dumps(body, separators=(",", ":")).encode()

    def _row(self, table: _Table, values: list[Any], relation: pgo.Relation | None = None) -> dict[str, Any]:
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
            self._prepare(conn)
            kafka, extra = self.config.kafka_bootstrap_servers, self.config.kafka_config
            for t in self._tables.values():
                ensure_topic(kafka, t.topic, self.config.partitions, config=extra)
            self._ensure_state_topic()
            slot = conn.execute(
                "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s", (self.config.slot,)
            ).fetchone()
            if slot is not None and (slot[0] != "pgoutput" or slot[1] != self._db):
                raise CdcError(
                    f"slot: replication slot {self.config.slot!r} exists for plugin {slot[0]} in "
                    f"database {slot[1]}; pass --slot with another name"
                )
            state = self._read_state() if slot is not None else None
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
                snap_lsn = _parse_lsn(restart[0]) if restart and restart[0] else _parse_lsn(consistent)
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
                if row and row[0] and _parse_lsn(row[0]) >= self.acked_lsn:
                    return
                time.sleep(0.05)
        self._say("warning: PostgreSQL did not confirm the last position in time; a restart may resend")


class _AsText(Loader):
    """A column value as PostgreSQL's text output (the form pgoutput sends)."""

    def load(self, data: Any) -> str:
        return bytes(data).decode("utf-8")


def _connect_schemas(table: _Table, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kafka Connect schemas of a table's key and envelope, as Debezium's JsonConverter writes them."""
    base = f"{prefix}.{table.schema}.{table.name}"

    def fld(col: pgo.Column, optional: bool) -> dict[str, Any]:
        kind, name = pgo.connect_type(col)
        out: dict[str, Any] = {"type": kind, "optional": optional}
        if name:
            out["name"] = name
            out["version"] = 1
        out["field"] = col.name
        return out

    key = {
        "type": "struct",
        "fields": [fld(c, False) for c in table.columns if c.name in table.key],
        "optional": False,
        "name": f"{base}.Key",
    }
    row = {
        "type": "struct",
        "fields": [fld(c, c.name not in table.key) for c in table.columns],
        "optional": True,
        "name": f"{base}.Value",
    }

    def simple(name: str, kind: str, optional: bool = False) -> dict[str, Any]:
        return {"type": kind, "optional": optional, "field": name}

    source = {
        "type": "struct",
        "fields": [
            simple("version", "string"),
            simple("connector", "string"),
            simple("name", "string"),
            simple("ts_ms", "int64"),
            {
                "type": "string",
                "optional": True,
                "name": "io.debezium.data.Enum",
                "version": 1,
                "parameters": {"allowed": "true,last,false,incremental"},
                "default": "false",
                "field": "snapshot",
            },
            simple("db", "string"),
            simple("sequence", "string", True),
            simple("schema", "string"),
            simple("table", "string"),
            simple("txId", "int64", True),
            simple("lsn", "int64", True),
            simple("xmin", "int64", True),
        ],
        "optional": False,
        "name": "io.debezium.connector.postgresql.Source",
        "field": "source",
    }
    transaction = {
        "type": "struct",
        "fields": [
            simple("id", "string"),
            simple("total_order", "int64"),
            simple("data_collection_order", "int64"),
        ],
        "optional": True,
        "name": "event.block",
        "version": 1,
        "field": "transaction",
    }
    value = {
        "type": "struct",
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            source,
            simple("op", "string"),
            simple("ts_ms", "int64", True),
            transaction,
        ],
        "optional": False,
        "name": f"{base}.Envelope",
        "version": 1,
    }
    return key, value
