"""Table state: current-row aggregates per entity under updates, deletes, moves, redeliveries and
out-of-order changes, against a table recomputed from scratch (stream state and the offline read)."""

from __future__ import annotations

import pickle
import random
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.table_columns import column_of
from engine.table_flow import _ARROW, ChangeBatch, _shards_of
from engine.table_reads import point_in_time_table
from engine.table_state import EntityTables, RowGuard, stored_columns, unpack
from tests.cdc_helpers import EMPTY, FIELDS, oracle, orders_view

VIEW = orders_view()
NAMES = [f.name for f in FIELDS]
STORED = stored_columns(VIEW)


def _row(pk: int, cust: str | None, amount: float | None, status: str | None) -> tuple[Any, ...]:
    return (pk, cust, amount, status)


def _shard(entity: str, shards: int) -> int:
    return zlib.crc32(entity.encode()) % shards


class _State:
    """A guard and ``shards`` entity shards, fed batches as the dataflow would."""

    def __init__(self, shards: int = 1) -> None:
        self.shards = shards
        self.guard = RowGuard()
        self.tables = [EntityTables(VIEW) for _ in range(shards)]
        self.written: dict[str, tuple[np.ndarray, bytes]] = {}  # the newest write of each entity

    def feed(self, batch: list[tuple[Any, ...]]) -> None:
        """batch: (pk, op, position, after tuple or None, partition, offset)."""
        types = {f.name: f.dtype for f in FIELDS}
        cols = [
            column_of(
                pa.array(
                    [None if c[3] is None else c[3][NAMES.index(name)] for c in batch], _ARROW[types[name]]
                ),
                types[name],
            )
            for name in STORED
        ]
        moves = self.guard.apply(
            [str(c[0]) for c in batch],
            np.array([c[2] for c in batch], np.int64),
            [None if c[1] == "d" or c[3] is None else c[3][1] for c in batch],
            cols,
            np.array([c[4] for c in batch], np.int64),
            np.array([c[5] for c in batch], np.int64),
            np.array([1000 + c[2] for c in batch], np.int64),
        )
        shard_of = np.array([_shard(n, self.shards) for n in moves.names], np.int64)
        for s, part in moves.split(shard_of):
            update = self.tables[s].apply([part])
            for i, ent in enumerate(update.entities):
                self.written[ent] = (update.positions[i], update.blobs[i])

    def round_trip(self) -> None:
        """As a recovery snapshot and resume would."""
        self.guard = pickle.loads(pickle.dumps(self.guard))
        self.tables = pickle.loads(pickle.dumps(self.tables))

    def values(self, cust: str) -> dict[str, Any]:
        vals = self.tables[_shard(cust, self.shards)].entity_values(cust)
        return dict(EMPTY) if vals is None else dict(zip(VIEW.feature_names, vals, strict=True))


def _run(
    changes: list[tuple], cuts: list[int] | None = None, pickle_after: int = -1, shards: int = 1
) -> _State:
    """changes: (pk, op, position, after tuple or None), each the change at that position, fed in
    batches of the sizes ``cuts`` (cycled; default 7), snapshotted and restored after batch
    ``pickle_after``."""
    state = _State(shards)
    feed = [(pk, op, pos, after, pos % 3, offset) for offset, (pk, op, pos, after) in enumerate(changes)]
    sizes = cuts or [7]
    i = b = 0
    while i < len(feed):
        size = sizes[b % len(sizes)]
        state.feed(feed[i : i + size])
        if b == pickle_after:
            state.round_trip()
        i += size
        b += 1
    return state


def _sequential(feed: list[tuple]) -> tuple[dict[str, dict[int, int]], dict[str, int]]:
    """Reference: changes applied one by one (the row guard's definition); per entity, the highest
    offset per partition and the newest time of a change applied to it."""
    held: dict[int, tuple[int, str | None]] = {}
    pos: dict[str, dict[int, int]] = {}
    ts: dict[str, int] = {}
    for pk, op, position, after, partition, offset in feed:
        if pk in held and position <= held[pk][0]:
            continue
        old = held[pk][1] if pk in held else None
        new = None if op == "d" or after is None else after[1]
        held[pk] = (position, new)
        for ent in {old, new} - {None}:
            p = pos.setdefault(ent, {})  # type: ignore[arg-type]
            p[partition] = max(p.get(partition, -1), offset)
            ts[ent] = max(ts.get(ent, -1), 1000 + position)  # type: ignore[index]
    return pos, ts


def _final_table(changes: list[tuple]) -> dict[int, dict[str, Any]]:
    newest: dict[int, tuple] = {}
    for c in changes:
        if c[0] not in newest or c[2] > newest[c[0]][2]:
            newest[c[0]] = c
    return {pk: dict(zip(NAMES, c[3], strict=True)) for pk, c in newest.items() if c[1] != "d"}


_amount = st.one_of(st.none(), st.integers(-50, 50).map(float), st.floats(-1e6, 1e6, allow_nan=False))
_versions = st.lists(
    st.tuples(
        st.sampled_from(["c", "u", "d", "r"]),
        st.sampled_from(["a", "b", "c", None]),
        _amount,
        st.sampled_from(["open", "paid", None]),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    history=st.dictionaries(st.integers(1, 8), _versions, min_size=1, max_size=8),
    arrival=st.randoms(use_true_random=False),
    redeliver=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), max_size=15),
    cuts=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    pickle_after=st.integers(-1, 6),
    shards=st.sampled_from([1, 2, 3]),
)
def test_random_histories_match_the_recomputed_table(
    history: dict[int, list[tuple]],
    arrival: Any,
    redeliver: list[tuple[int, int]],
    cuts: list[int],
    pickle_after: int,
    shards: int,
) -> None:
    """Per key, a history of changes at increasing positions, arriving interleaved across keys,
    with redeliveries and stale duplicates anywhere (batch edges included), cut into batches of
    random sizes, state pickled and restored between two batches, entities spread over shards:
    the newest position wins, and every entity is written with the positions of the changes
    applied to it one by one."""
    changes = []
    pos = 0
    for pk, versions in history.items():
        for op, cust, amount, status in versions:
            pos += 1
            after = None if op == "d" else _row(pk, cust, amount, status)
            changes.append((pk, op, pos, after))
    stream = list(changes)
    arrival.shuffle(stream)  # out of order across and within keys
    for which, where in redeliver:  # redeliveries anywhere, the same change again
        stream.insert(where % (len(stream) + 1), changes[which % len(changes)])
    state = _run(stream, cuts, pickle_after, shards)
    want = oracle(_final_table(changes))
    for cust in ("a", "b", "c"):
        assert state.values(cust) == want.get(cust, EMPTY), cust
        if cust in state.written:  # the newest online value is the table's too
            _, blob = state.written[cust]
            got = dict(zip(VIEW.feature_names, unpack(blob)[1], strict=True))  # type: ignore[arg-type]
            assert got == want.get(cust, EMPTY), cust
    for s, tables in enumerate(state.tables):  # a shard rewrites only its own entities
        assert {_shard(e, shards) for e in tables.resync().entities} <= {s}
    feed = [(pk, op, p, after, p % 3, offset) for offset, (pk, op, p, after) in enumerate(stream)]
    positions, times = _sequential(feed)
    assert set(state.written) == set(positions)
    for cust, by_part in positions.items():
        vector = state.written[cust][0]
        assert {p: int(o) for p, o in enumerate(vector) if o >= 0} == by_part, cust
        assert unpack(state.written[cust][1])[0] == times[cust]
    # and the offline read of the same change log, as of after the last change
    got = _offline(stream, ["a", "b", "c"], 10**9)
    for i, cust in enumerate(("a", "b", "c")):
        row = {k: v[i] for k, v in got.items()}
        exp = want.get(cust, EMPTY)
        assert row.keys() == exp.keys()
        for k, v in exp.items():
            assert row[k] == v or (v is not None and abs(row[k] - v) <= 1e-9 * max(1, abs(v))), (cust, k)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 400), min_size=1, max_size=4))
def test_many_keys_in_large_batches(seed: int, cuts: list[int]) -> None:
    """Hundreds of keys over a few entities in batches of up to hundreds of changes (slots
    reused after deletes, many changes of one key in one batch)."""
    rng = random.Random(seed)
    changes, pos = [], 0
    for _ in range(1500):
        pk = rng.randrange(120)
        op = rng.choice("cuudr")
        pos += rng.randrange(1, 3)
        cust = rng.choice(["a", "b", "c", "d", None])
        amount = rng.choice([None, float(rng.randrange(-9, 9)), rng.uniform(-1e3, 1e3)])
        changes.append((pk, op, pos, None if op == "d" else _row(pk, cust, amount, rng.choice(["x", "y"]))))
    stream = list(changes)
    rng.shuffle(stream[:300])  # the first ones out of order
    stream += rng.sample(changes, 200)  # stale redeliveries at the end
    state = _run(stream, cuts, pickle_after=2, shards=2)
    want = oracle(_final_table(changes))
    for cust in "abcd":
        got = state.values(cust)
        exp = want.get(cust, EMPTY)
        assert got == exp, (cust, got, exp)


def _offline(stream: list[tuple], entities: list[str], at: int) -> dict[str, list[Any]]:
    n = len(stream)
    after = [c[3] for c in stream]
    batch = ChangeBatch(
        topic="t",
        partition=0,
        op=[c[1] for c in stream],
        pk=[str(c[0]) for c in stream],
        entity=[None if a is None else a[1] for a in after],
        position=np.array([c[2] for c in stream], np.int64),
        lsn=[c[2] for c in stream],
        ts=np.array([1000 + c[2] for c in stream], np.int64),
        after=[
            pa.array([None if a is None else a[j] for a in after], _ARROW[f.dtype])
            for j, f in enumerate(FIELDS)
        ],
        before=[pa.nulls(n, _ARROW[f.dtype]) for f in FIELDS],
        offsets=np.arange(n, dtype=np.int64),
    )
    log = batch.rows(FIELDS)
    out = point_in_time_table(VIEW, log, entities, np.full(len(entities), at), list(VIEW.features))
    return {k: v.to_pylist() for k, v in out.items()}


def test_update_moves_a_row_between_entities_and_delete_retracts() -> None:
    t = _run(
        [
            (1, "c", 1, _row(1, "a", 10.0, "open")),
            (2, "c", 2, _row(2, "a", 5.0, "open")),
            (1, "u", 3, _row(1, "b", 12.0, "paid")),  # moves from a to b
        ]
    )
    assert t.values("a") == oracle({2: dict(zip(NAMES, _row(2, "a", 5.0, "open"), strict=True))})["a"]
    assert t.values("b")["amount_sum"] == 12.0
    t = _run(
        [(1, "c", 1, _row(1, "a", 10.0, "open")), (1, "d", 2, None), (1, "c", 1, _row(1, "a", 10.0, "x"))]
    )
    assert t.values("a") == EMPTY  # the older insert, redelivered after the delete, stays ignored


def test_snapshot_reread_does_not_double_count() -> None:
    t = _run(
        [
            (1, "r", 5, _row(1, "a", 10.0, "open")),
            (1, "r", 5, _row(1, "a", 10.0, "open")),  # the same snapshot read again
            (1, "r", 9, _row(1, "a", 11.0, "open")),  # a later snapshot of the same row
        ]
    )
    assert t.values("a")["rows_count"] == 1
    assert t.values("a")["amount_sum"] == 11.0


def test_min_max_distinct_retract_exactly() -> None:
    t = _run(
        [
            (1, "c", 1, _row(1, "a", 1.0, "open")),
            (2, "c", 2, _row(2, "a", 9.0, "paid")),
            (3, "c", 3, _row(3, "a", 9.0, "paid")),
            (2, "d", 4, None),
            (1, "u", 5, _row(1, "a", 4.0, "paid")),
        ]
    )
    v = t.values("a")
    assert (v["amount_min"], v["amount_max"], v["status_count_distinct"]) == (4.0, 9.0, 1)


def test_offline_table_as_of_each_time() -> None:
    """The offline read sees the table as it was at t: nothing later, everything up to t."""
    stream = [
        (1, "c", 1, _row(1, "a", 10.0, "open")),  # ts 1001
        (2, "c", 2, _row(2, "a", 5.0, "open")),  # ts 1002
        (1, "u", 3, _row(1, "b", 12.0, "paid")),  # ts 1003
        (2, "d", 4, None),  # ts 1004
    ]
    for at, a_count, b_count in ((1000, 0, 0), (1001, 1, 0), (1002, 2, 0), (1003, 1, 1), (1004, 0, 1)):
        got = _offline(stream, ["a", "b"], at)
        assert got["rows_count"] == [a_count, b_count], at
    assert pa.__version__  # pyarrow computes these reads


def test_guard_resumes_from_a_snapshot_of_positions_per_key() -> None:
    """Recovery snapshots held ``pk -> (position, entity)`` before the guard kept columns: a
    guard rebuilt from that form ignores what is stale and moves rows from the held entity."""
    state = _run(
        [(1, "c", 1, _row(1, "a", 10.0, "open")), (2, "c", 2, _row(2, "b", 5.0, "open")), (2, "d", 3, None)]
    )
    rows = state.guard.rows()
    assert rows == {"1": (1, "a"), "2": (3, None)}
    state.guard = RowGuard.from_rows(rows)
    state.feed(
        [
            (2, "c", 2, _row(2, "b", 5.0, "open"), 0, 10),  # older than the delete: ignored
            (1, "u", 4, _row(1, "b", 7.0, "paid"), 0, 11),  # moves a -> b
        ]
    )
    assert state.values("a") == EMPTY
    assert state.values("b")["amount_sum"] == 7.0 and state.values("b")["rows_count"] == 1
    assert state.guard.rows() == {"1": (4, "b"), "2": (3, None)}


def test_entity_tables_resume_from_a_snapshot_of_rows_per_entity() -> None:
    """Recovery snapshots held each entity's rows as tuples before rows were kept in columns: such
    a snapshot is converted on load, with its positions, and retracts exactly afterwards."""
    from engine.table_state import _Entity

    assert VIEW.columns == ("customer_id", "amount", "status")
    held = {
        "a": (
            {"1": ("a", 10.0, "open"), "2": ("a", None, "paid"), "3": ("a", 2.5, "open")},
            {0: 7, 2: 3},
            1500,
        ),
        "b": ({}, {1: 4}, 1200),
    }
    entities = {}
    for name, (rows, pos, ts) in held.items():
        ent = _Entity()
        ent.rows, ent.pos, ent.ts = rows, pos, ts
        entities[name] = ent
    old = EntityTables.__new__(EntityTables)
    old.__dict__.update({"view": VIEW, "entities": entities, "online_epoch": "e1"})
    tables = pickle.loads(pickle.dumps(old))
    assert tables.online_epoch == "e1"
    table = {int(pk): dict(zip(NAMES, (int(pk), *r), strict=True)) for pk, r in held["a"][0].items()}
    assert tables.entity_values("a") == list(oracle(table)["a"].values())
    assert tables.entity_values("b") == list(EMPTY.values())
    update = tables.resync()
    vectors = {e: update.positions[i].tolist() for i, e in enumerate(update.entities)}
    assert vectors == {"a": [7, -1, 3], "b": [-1, 4, -1]}
    state = _State()
    state.tables = [tables]
    state.guard = RowGuard.from_rows({"1": (5, "a"), "2": (6, "a"), "3": (7, "a")})
    state.feed([(3, "d", 8, None, 0, 20), (1, "u", 9, _row(1, "b", 4.0, "x"), 0, 21)])
    del table[3], table[1]
    table[1] = dict(zip(NAMES, _row(1, "b", 4.0, "x"), strict=True))
    want = oracle(table)
    assert state.values("a") == want["a"] and state.values("b") == want["b"]


def test_entity_shards_are_stable_across_calls_and_shard_counts() -> None:
    """The remembered shard of an entity is always its CRC-32 shard, for each shard count."""
    rng = random.Random(3)
    names = [f"cust_{rng.randrange(500)}" for _ in range(2_000)]
    for shards in (32, 7, 32):
        for part in (names[:700], names, names[300:]):
            assert _shards_of(part, shards).tolist() == [_shard(n, shards) for n in part]
