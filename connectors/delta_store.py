"""Delta Lake offline store: the accepted events of a view version, partitioned by date.

Every commit records, per source partition, the highest offset it contains as a Delta app
transaction (``{view}:{version}:{topic}:{partition}`` -> offset). Before writing, rows at or
below the recorded offset are dropped, so a replayed batch is never stored twice
(effectively-once), and concurrent writers of different partitions never conflict.

When the broker gives topic ids, the same offset is also recorded under
``{view}:{version}:{topic}:{partition}@{topic id}``. Offsets of a recreated topic (a new id) are
then told apart from a replay: :meth:`DeltaOfflineStore.stored_position` reports whether the
stored offsets belong to the topic as it is now, and the sink refuses to write otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError

from engine.errors import ServiceUnavailable, StoreError

__all__ = ["DeltaOfflineStore", "StoredPosition", "event_schema", "partition_app"]


def event_schema(columns: tuple[str, ...], text_columns: tuple[str, ...] = ()) -> pa.Schema:
    """Stored events: aggregated columns as float64, except text columns (only ever counted)."""
    return pa.schema(
        [
            ("entity", pa.string()),
            ("event_ts", pa.timestamp("ms", tz="UTC")),
            *[(c, pa.string() if c in text_columns else pa.float64()) for c in columns],
            ("_topic", pa.string()),
            ("_partition", pa.int32()),
            ("_offset", pa.int64()),
            ("date", pa.date32()),
        ]
    )


def _time_filter(start: datetime | None, end: datetime | None) -> pc.Expression:
    """Events with times in ``[start, end]``; the ``date`` partition bounds prune whole files."""
    ts = pa.timestamp("ms", "UTC")
    expr = pc.scalar(True)
    if start is not None:
        expr &= pc.field("date") >= pa.scalar(start.date(), pa.date32())
        expr &= pc.field("event_ts") >= pa.scalar(start, ts)
    if end is not None:
        expr &= pc.field("date") <= pa.scalar(end.date(), pa.date32())
        expr &= pc.field("event_ts") <= pa.scalar(end, ts)
    return expr


def partition_app(app_prefix: str, topic: str, partition: int, topic_id: str | None = None) -> str:
    """App-transaction id of a source partition's offsets (of one topic identity with ``topic_id``)."""
    app = f"{app_prefix}:{topic}:{partition}"
    return f"{app}@{topic_id}" if topic_id else app


@dataclass(frozen=True)
class StoredPosition:
    """What a table holds of one source partition: its highest offset, and whether that offset
    was recorded for the topic id asked about (``None``: no id asked about)."""

    offset: int | None
    same_topic: bool | None


class DeltaOfflineStore:
    """One Delta table per feature view version under ``root``."""

    def __init__(self, root: str, storage_options: dict[str, str] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or None
        self._seen: set[str] = set()  # tables this store found or wrote: they cannot vanish

    def table_uri(self, view: str, version: str) -> str:
        return f"{self.root}/{view}__{version}"

    def _open(self, uri: str, version: int | None = None) -> DeltaTable | None:
        try:
            table = DeltaTable(uri, version=version, storage_options=self.storage_options)
            self._seen.add(uri)
            return table
        except TableNotFoundError:
            if version is not None:
                raise StoreError(
                    f"Delta table {uri} does not exist, so it has no version {version}"
                ) from None
            return None
        except Exception as exc:
            if version is None:
                raise
            raise StoreError(f"cannot read Delta table {uri} at version {version}: {exc}") from exc

    def committed_offsets(self, uri: str, app_ids: list[str]) -> dict[str, int]:
        table = self._open(uri)
        if table is None:
            return {}
        out = {}
        for app in app_ids:
            v = table.transaction_version(app)
            if v is not None:
                out[app] = v
        return out

    def stored_position(
        self, uri: str, app_prefix: str, topic: str, partition: int, topic_id: str | None
    ) -> StoredPosition:
        """The highest stored offset of a source partition, and whether it belongs to ``topic_id``."""
        apps = [partition_app(app_prefix, topic, partition)]
        if topic_id:
            apps.append(partition_app(app_prefix, topic, partition, topic_id))
        done = self.committed_offsets(uri, apps)
        offset = done.get(apps[0])
        same = None if not topic_id or offset is None else apps[1] in done
        return StoredPosition(offset, same)

    def append(
        self, uri: str, rows: pa.Table, app_prefix: str, topic_ids: Mapping[str, str | None] | None = None
    ) -> int:
        """Append rows not yet stored; returns how many were written.

        ``topic_ids`` (topic -> id) records the offsets under each topic's identity as well.
        """
        if rows.num_rows == 0:
            return 0
        seen = uri in self._seen
        if seen and not self._readable(uri):
            raise self._missing(uri)
        topics = rows.column("_topic").to_numpy(zero_copy_only=False)
        parts = rows.column("_partition").to_numpy()
        offsets = rows.column("_offset").to_numpy()
        pairs = rows.group_by(["_topic", "_partition"]).aggregate([]).to_pylist()
        apps = {
            (r["_topic"], r["_partition"]): partition_app(app_prefix, r["_topic"], r["_partition"])
            for r in pairs
        }
        done = self.committed_offsets(uri, list(apps.values()))
        keep = np.ones(rows.num_rows, dtype=bool)
        txns = []
        for (topic, part), app in apps.items():
            mine = (parts == part) & (topics == topic)
            if app in done:
                keep &= ~mine | (offsets > done[app])
            fresh = mine & keep
            if fresh.any():
                top = int(offsets[fresh].max())
                txns.append(Transaction(app_id=app, version=top))
                tid = (topic_ids or {}).get(topic)
                if tid:
                    txns.append(Transaction(app_id=partition_app(app_prefix, topic, part, tid), version=top))
        if not keep.all():
            rows = rows.filter(pa.array(keep))
        if rows.num_rows == 0:
            return 0
        try:
            write_deltalake(
                uri,
                rows,
                mode="append",
                partition_by=["date"],
                storage_options=self.storage_options,
                commit_properties=CommitProperties(app_transactions=txns, max_commit_retries=50),
            )
        except Exception as exc:
            if seen and not self._readable(uri):  # its log went away while this commit ran
                raise self._missing(uri) from exc
            raise StoreError(f"offline append to {uri} failed: {exc}") from exc
        self._seen.add(uri)
        return rows.num_rows

    def _readable(self, uri: str) -> bool:
        try:
            return self._open(uri) is not None
        except Exception:
            return False

    @staticmethod
    def _missing(uri: str) -> ServiceUnavailable:
        """A table that existed cannot be read (its log is gone or unreadable): an outage of its
        storage, retried until it is back, never a new table whose history would start over
        (and whose offsets could not filter a replay)."""
        return ServiceUnavailable(f"Delta table {uri} existed but its log cannot be read now")

    def read(
        self,
        uri: str,
        entities: list[str] | pa.Array | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        columns: list[str] | None = None,
        version: int | None = None,
    ) -> pa.Table | None:
        """Stored events, optionally only some entities and event times in ``[start, end]``.

        With ``version``, the table as of that Delta version (its state when that commit was the
        newest), so a read is repeatable however many appends follow.
        """
        table = self._open(uri, version)
        if table is None:
            return None
        # One expression for the scan, so rows are filtered batch by batch as files are read:
        # a read of a few entities holds only theirs, not the whole time range's.
        expr = _time_filter(start, end)
        if entities is not None:
            wanted = entities if isinstance(entities, pa.Array) else pa.array(entities, pa.string())
            expr &= pc.field("entity").isin(wanted)
        return table.to_pyarrow_table(filters=expr, columns=columns)

    def batches(
        self,
        uri: str,
        columns: list[str],
        start: datetime | None = None,
        end: datetime | None = None,
        version: int | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stored events with times in ``[start, end]``, streamed batch by batch with a few in
        flight (not the defaults' dozens), so memory stays bounded whatever the table's size;
        nothing if the table does not exist."""
        table = self._open(uri, version)
        if table is None:
            return
        yield from table.to_pyarrow_dataset().to_batches(
            columns=columns, filter=_time_filter(start, end), batch_readahead=4, fragment_readahead=2
        )

    def version(self, uri: str) -> int | None:
        table = self._open(uri)
        return None if table is None else table.version()
