"""Stage 1 of table state, in columns: the row guard of a source partition and the moves it emits.

Per primary key, :class:`RowGuard` keeps the *applied position* (the newest change's
``source.lsn``, else Kafka offset) and the entity the row belongs to now, in arrays indexed by a
key slot (``pk -> slot`` is the only per-key Python object). A batch of changes is resolved at
once with numpy: sorted by (slot, arrival), a change is applied when its position is above every
position seen before it for that key (held or earlier in the batch), exactly as if the changes
were applied one by one, so the newest position wins whatever the arrival order and a
redelivery or an older change arriving late is ignored. A delete keeps the key's position (a
tombstone), so an older insert replayed after it stays ignored.

A batch becomes :class:`Moves`: per key, at most one removal (the row leaves the entity it held
before the batch) and one addition (its newest image enters its entity), plus a *stamp* per entity
an applied change touched (the change's partition, offset and time), so an entity a row passed
through within the batch is still written with its positions, as when changes were applied one
by one.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Column", "Moves", "RowGuard", "codes_of", "column_of", "take"]

Column = tuple[np.ndarray, np.ndarray]
"""A view column of a batch: values (float64 for float and bool, int64 for int, object for str)
and validity (False: null)."""


def take(items: Sequence[Any], at: np.ndarray) -> list[Any]:
    """``items[i]`` for each ``i`` in ``at``, in a C loop."""
    return list(map(items.__getitem__, at.tolist()))


def codes_of(
    names: Sequence[str | None], index: dict[Any, int], table: list[str] | None = None
) -> np.ndarray:
    """Codes of ``names`` in ``index``, adding names not seen yet (to ``table`` too; codes count
    from ``len(table)`` then, else from ``len(index)``). A name None is -1 unless ``index`` says
    otherwise."""
    codes: list[Any] = list(map(index.get, names))  # C loops: no Python per name
    if None in codes:
        new = dict.fromkeys(itertools.compress(names, map(operator.is_, codes, itertools.repeat(None))))
        new.pop(None, None)
        if new:
            start = len(index) if table is None else len(table)
            index.update(zip(new, range(start, start + len(new)), strict=True))
            if table is not None:
                table.extend(new)  # type: ignore[arg-type]
        codes = list(map(index.get, names, itertools.repeat(-1)))
    return np.fromiter(codes, np.int64, len(codes))


@dataclass
class Moves:
    """One guard batch's effect on entities; ``names`` are the entities the index arrays point to.

    Removals are applied before additions; an addition of a key an entity holds replaces it."""

    names: list[str]
    rm_pk: list[str]
    rm_ent: np.ndarray
    add_pk: list[str]
    add_ent: np.ndarray
    add_cols: list[Column]
    st_ent: np.ndarray
    st_part: np.ndarray
    st_off: np.ndarray
    st_ts: np.ndarray

    def __len__(self) -> int:
        return len(self.rm_pk) + len(self.add_pk) + len(self.st_ent)

    def split(self, shard_of_name: np.ndarray) -> list[tuple[int, Moves]]:
        """The moves per shard (``shard_of_name[i]``: the shard of ``names[i]``), each with only
        its own entities in ``names``."""
        at = np.asarray(shard_of_name, np.int64)
        shards = np.unique(at)
        mine_of, rm_of, add_of, st_of = (
            _groups(x, shards) for x in (at, at[self.rm_ent], at[self.add_ent], at[self.st_ent])
        )
        local = np.zeros(len(self.names), np.int64)
        out = []
        for i, s in enumerate(shards.tolist()):
            mine, rm, add, st = mine_of[i], rm_of[i], add_of[i], st_of[i]
            local[mine] = np.arange(len(mine))
            part = Moves(
                take(self.names, mine),
                take(self.rm_pk, rm),
                local[self.rm_ent[rm]],
                take(self.add_pk, add),
                local[self.add_ent[add]],
                [(v[add], ok[add]) for v, ok in self.add_cols],
                local[self.st_ent[st]],
                self.st_part[st],
                self.st_off[st],
                self.st_ts[st],
            )
            out.append((s, part))
        return out


def _groups(keys: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """For each of ``values`` (sorted), the indices where ``keys`` equals it, in order: one sort
    rather than a scan of ``keys`` per value."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.searchsorted(ordered, values).tolist()
    ends = np.searchsorted(ordered, values, side="right").tolist()
    return [order[a:b] for a, b in zip(starts, ends, strict=True)]


class RowGuard:
    """Per primary key: the applied position and current entity (see module docstring)."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.position = np.zeros(0, np.int64)
        self.entity = np.zeros(0, np.int64)  # code in self.names, -1: no entity (or deleted)
        self.entity_of: dict[str | None, int] = {None: -1}  # None: a delete, or no entity
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.slot_of)

    def copy(self) -> RowGuard:
        out = RowGuard()
        out.slot_of, out.entity_of, out.names = dict(self.slot_of), dict(self.entity_of), list(self.names)
        n = len(self.slot_of)
        out.position, out.entity = self.position[:n].copy(), self.entity[:n].copy()
        return out

    @classmethod
    def from_rows(cls, rows: dict[str, tuple[int, str | None]]) -> RowGuard:
        """A guard from ``pk -> (position, entity)`` (the form recovery snapshots held before)."""
        guard = cls()
        pks = list(rows)
        guard._slots(pks)
        guard.position[: len(pks)] = [rows[k][0] for k in pks]
        guard.entity[: len(pks)] = codes_of([rows[k][1] for k in pks], guard.entity_of, guard.names)
        return guard

    def rows(self) -> dict[str, tuple[int, str | None]]:
        """``pk -> (position, entity)``: what the guard holds, for tests and inspection."""
        pos, ent = self.position.tolist(), self.entity.tolist()
        return {k: (pos[s], None if ent[s] < 0 else self.names[ent[s]]) for k, s in self.slot_of.items()}

    def _slots(self, pks: Sequence[str]) -> np.ndarray:
        slots = codes_of(pks, self.slot_of)
        n = len(self.slot_of)
        if n > len(self.position):
            grow = max(n, 2 * len(self.position)) - len(self.position)
            self.position = np.concatenate((self.position, np.full(grow, -1, np.int64)))
            self.entity = np.concatenate((self.entity, np.full(grow, -1, np.int64)))
        return slots

    def apply(
        self,
        pk: Sequence[str],
        position: np.ndarray,
        entity: Sequence[str | None],
        cols: list[Column],
        partition: np.ndarray,
        offset: np.ndarray,
        ts: np.ndarray,
    ) -> Moves:
        """Changes in arrival order: ``entity[i]`` is the after image's entity (None for a delete or
        no entity), ``cols`` the after image's view columns."""
        n = len(pk)
        slot = self._slots(pk)
        ent = codes_of(entity, self.entity_of, self.names)
        position = np.asarray(position, np.int64)
        if n == 0:
            none = np.zeros(0, np.int64)
            return Moves([], [], none, [], none, [(v[:0], ok[:0]) for v, ok in cols], none, none, none, none)
        order = np.argsort(slot, kind="stable")  # by key, then arrival
        s, p = slot[order], position[order]
        held = self.position[s]
        first = np.ones(n, bool)
        first[1:] = s[1:] != s[:-1]
        group = np.cumsum(first) - 1
        # Applied: above the held position and every earlier position of the key in the batch.
        if (first[1:] | (p[1:] > p[:-1])).all():  # each key's positions rise in arrival order
            applied = p > held
        else:  # a running max per key, on dense ranks so that (key, rank) fits one int64
            ranks = np.unique(np.concatenate((p, held)), return_inverse=True)[1].reshape(-1)
            rp, rh = ranks[:n], ranks[n:]
            span = 2 * n + 1
            running = np.maximum.accumulate(group * span + rp) - group * span
            before = np.empty(n, np.int64)
            before[0] = -1
            before[1:] = running[:-1]
            before[first] = -1
            applied = rp > np.maximum(before, rh)
        idx = order[applied]
        s, g = s[applied], group[applied]
        new = ent[idx]
        # Each applied change moves the key from the entity of the change before it.
        first_applied = np.ones(len(idx), bool)
        first_applied[1:] = g[1:] != g[:-1]
        old = np.empty(len(idx), np.int64)
        old[1:] = new[:-1]
        old[first_applied] = self.entity[s[first_applied]]
        last = np.ones(len(idx), bool)
        last[:-1] = first_applied[1:]
        # stamps: the entity left (when another) and the entity entered
        left = (old >= 0) & (old != new)
        entered = new >= 0
        st_ent = np.concatenate((old[left], new[entered]))
        st_at = np.concatenate((idx[left], idx[entered]))
        # net effect per key: held entity -> final entity
        ks, kidx, knew = s[last], idx[last], new[last]
        kheld = self.entity[ks]
        rm = (kheld >= 0) & (kheld != knew)
        add = knew >= 0
        self.position[ks] = position[kidx]
        self.entity[ks] = knew
        add_at = kidx[add]
        rm_at = kidx[rm]
        # Only the entities referenced travel with the moves, renumbered.
        rm_ent, add_ent = kheld[rm], knew[add]
        used, local = np.unique(np.concatenate((rm_ent, add_ent, st_ent)), return_inverse=True)
        local = local.reshape(-1)
        a, b = len(rm_ent), len(rm_ent) + len(add_ent)
        names = self.names
        return Moves(
            names=take(names, used),
            rm_pk=take(pk, rm_at),
            rm_ent=local[:a],
            add_pk=take(pk, add_at),
            add_ent=local[a:b],
            add_cols=[(v[add_at], ok[add_at]) for v, ok in cols],
            st_ent=local[b:],
            st_part=np.asarray(partition, np.int64)[st_at],
            st_off=np.asarray(offset, np.int64)[st_at],
            st_ts=np.asarray(ts, np.int64)[st_at],
        )

    def __getstate__(self) -> dict[str, Any]:
        n = len(self.slot_of)
        return {**self.__dict__, "position": self.position[:n], "entity": self.entity[:n]}


def column_of(arr: Any, dtype: str) -> Column:
    """A view column from a pyarrow array of the source field's type."""
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if dtype == "str":
        return arr.to_numpy(zero_copy_only=False), valid
    if dtype == "bool":
        return arr.fill_null(False).to_numpy(zero_copy_only=False).astype(np.float64), valid
    return arr.fill_null(0).to_numpy(zero_copy_only=False), valid
