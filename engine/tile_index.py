"""Where each live tile's row is: ``entity << 32 | tile`` -> row number, in flat numpy arrays.

12 bytes a tile (an int64 key and an int32 row), against about 100 for a dict of Python ints, and
looked up a batch at a time with ``np.searchsorted``. Keys sort by entity first, so one entity's
tiles are a contiguous run: rewrites and resyncs gather them with no per-entity structure.

New keys go to a small sorted side level that is merged into the main one once it holds
``max(SIDE_MIN, main / 64)`` keys, so a batch costs its own size plus that bound, not a copy of the
whole index (which a shard of a long retention would pay on every small batch).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TileIndex"]

_NO_KEYS = np.zeros(0, dtype=np.int64)
_NO_ROWS = np.zeros(0, dtype=np.int32)


def _merge(ak: np.ndarray, ar: np.ndarray, bk: np.ndarray, br: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted key arrays without common keys (with their rows) merged into one."""
    if not len(ak):
        return bk.astype(np.int64), br.astype(np.int32)
    if len(ak) < 16_384:  # small: a sort of the two sorted runs costs fewer numpy calls
        keys = np.concatenate((ak, bk))
        order = keys.argsort(kind="stable")
        return keys[order], np.concatenate((ar, br.astype(np.int32)))[order]
    at = np.searchsorted(ak, bk) + np.arange(len(bk))  # b's places in the merged array
    old = np.ones(len(ak) + len(bk), dtype=bool)
    old[at] = False
    keys = np.empty(len(old), dtype=np.int64)
    keys[at] = bk
    keys[old] = ak
    rows = np.empty(len(old), dtype=np.int32)
    rows[at] = br
    rows[old] = ar
    return keys, rows


class TileIndex:
    """Sorted ``entity << 32 | tile`` keys of the live tiles with their rows (int32), in two levels."""

    SIDE_MIN = 4096

    def __init__(self, keys: np.ndarray = _NO_KEYS, rows: np.ndarray = _NO_ROWS) -> None:
        self.keys, self.rows = keys, rows  # main level
        self.side_keys, self.side_rows = _NO_KEYS, _NO_ROWS

    @classmethod
    def of(cls, keys: np.ndarray, rows: np.ndarray) -> TileIndex:
        order = np.argsort(keys)
        return cls(keys[order].astype(np.int64), rows[order].astype(np.int32))

    def __len__(self) -> int:
        return len(self.keys) + len(self.side_keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes + self.side_keys.nbytes + self.side_rows.nbytes

    def _levels(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if not len(self.side_keys):
            return [(self.keys, self.rows)] if len(self.keys) else []
        return (
            [(self.keys, self.rows), (self.side_keys, self.side_rows)]
            if len(self.keys)
            else [(self.side_keys, self.side_rows)]
        )

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each of ``keys``, -1 where it has none."""
        out = np.full(len(keys), -1, dtype=np.int64)
        for k, r in self._levels():
            at = k.searchsorted(keys)
            np.minimum(at, len(k) - 1, out=at)
            np.copyto(out, r[at], where=k[at] == keys)
        return out

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Index new ``keys`` (sorted, none indexed yet) at ``rows``."""
        self.side_keys, self.side_rows = _merge(self.side_keys, self.side_rows, keys, rows)
        if len(self.side_keys) > max(self.SIDE_MIN, len(self.keys) // 64):
            self.flush()

    def flush(self) -> None:
        """Merge the side level into the main one."""
        if len(self.side_keys):
            self.keys, self.rows = _merge(self.keys, self.rows, self.side_keys, self.side_rows)
            self.side_keys, self.side_rows = _NO_KEYS, _NO_ROWS

    def rows_of(self, ents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``ents`` (int64), entity after entity, each entity's in ascending row order,
        and how many each has."""
        e = len(ents)
        first = ents << 32
        bounds = np.concatenate((first, first + (1 << 32)))
        counts = np.zeros(e, dtype=np.int64)
        found = []
        for k, r in self._levels():
            b = k.searchsorted(bounds)
            lo, c = b[:e], b[e:] - b[:e]
            counts += c
            found.append((r, lo, c))
        if not found or not e:
            return np.zeros(0, dtype=np.int64), counts
        if e <= 64:  # a few entities: slices, entity after entity
            spans = [(r, lo.tolist(), (lo + c).tolist()) for r, lo, c in found]
            row = np.concatenate([r[lo[i] : hi[i]] for i in range(e) for r, lo, hi in spans]).astype(np.int64)
            run = np.repeat(np.arange(e, dtype=np.int64), counts)
        else:
            row = np.concatenate(
                [r[np.arange(int(c.sum())) + np.repeat(lo - (np.cumsum(c) - c), c)] for r, lo, c in found]
            ).astype(np.int64)
            run = np.concatenate([np.repeat(np.arange(e, dtype=np.int64), c) for _, _, c in found])
        # Keys sort by tile within an entity, rows by creation: order each run by row number.
        return np.sort((run << 32) | row) & 0xFFFFFFFF, counts

    def keep(self, keep: np.ndarray) -> None:
        """Drop the tiles of rows where ``keep`` (one flag per row) is false; the kept rows are
        renumbered in order, as a compaction of the rows array does."""
        self.flush()
        renumber = (np.cumsum(keep) - 1).astype(np.int32)
        stay = keep[self.rows]
        self.keys = self.keys[stay]
        self.rows = renumber[self.rows[stay]]

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Whether each of ``keys`` (any order) is indexed."""
        return self.find(keys) >= 0

    def entities(self) -> np.ndarray:
        """The entity of every indexed tile."""
        return np.concatenate((self.keys, self.side_keys)) >> 32

    def items(self) -> dict[int, int]:
        out = dict(zip(self.keys.tolist(), self.rows.tolist(), strict=True))
        out.update(zip(self.side_keys.tolist(), self.side_rows.tolist(), strict=True))
        return out
