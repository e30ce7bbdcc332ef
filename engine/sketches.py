"""Mergeable per-tile states of the object aggregations (first, last of text, last_n,
count_distinct, percentile, top_k).

Every state here is a *canonical* function of the multiset of events it has seen: building it
from a tile's events at once, or from any split of them merged in any order, gives the same
state. That is why the stream (tiles built batch by batch) and training sets (tiles rebuilt from
the event log) agree exactly, and why merges are associative and commutative.

An event is ``(ts, partition, offset, value)``; ``(ts, partition, offset)`` orders events, so
ties in event time are broken the same way online and offline, whatever the arrival order.

- ``order``: the earliest event and the ``n`` latest ones (``first``, ``last``, ``last_n``).
- ``distinct``: the ``DISTINCT_K`` smallest distinct 64-bit hashes (a KMV / bottom-k sketch).
  Exact below ``DISTINCT_K`` distinct values, then ``(k - 1) / u_k`` with relative standard
  error ``1 / sqrt(k - 2)``. (DataSketches' HLL was tried: its estimate of a union depends on
  how the inputs were built, so online and offline would disagree.)
- ``quantile``: DDSketch bins (``ddsketch``'s logarithmic mapping, relative accuracy
  ``QUANTILE_ALPHA``): bucket counts, merged by adding, so exact and order independent.
- ``freq``: exact counts per value.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from typing import Any

import numpy as np
from ddsketch.mapping import LogarithmicMapping

__all__ = [
    "DISTINCT_K",
    "QUANTILE_ALPHA",
    "distinct_build",
    "distinct_estimate",
    "distinct_merge",
    "freq_build",
    "freq_merge",
    "freq_top",
    "order_build",
    "order_merge",
    "quantile_build",
    "quantile_merge",
    "quantile_value",
]

DISTINCT_K = 1024
QUANTILE_ALPHA = 0.01
_MAPPING = LogarithmicMapping(QUANTILE_ALPHA)

Event = tuple[int, int, int, Any]
Order = tuple[Event | None, list[Event]]
Quantile = tuple[dict[int, int], dict[int, int], int]  # positive buckets, negative buckets, zeros


def _key(e: Event) -> tuple[int, int, int]:
    return e[0], e[1], e[2]


# -- order: first / last / last_n -------------------------------------------------------------


def order_build(events: list[Event], n: int) -> Order:
    """The earliest event and the ``n`` latest (newest first)."""
    if not events:
        return None, []
    return min(events, key=_key), heapq.nlargest(n, events, key=_key)


def order_add(s: Order, events: list[Event], n: int) -> Order:
    return order_merge(s, order_build(events, n), n) if events else s


def order_merge(a: Order, b: Order, n: int) -> Order:
    heads = [h for h in (a[0], b[0]) if h is not None]
    head = min(heads, key=_key) if heads else None
    if not b[1]:
        return head, a[1]
    if not a[1]:
        return head, b[1]
    unique = {_key(e): e for e in (*a[1], *b[1])}  # the same event twice is one event
    return head, heapq.nlargest(n, unique.values(), key=_key)


# -- distinct: bottom-k hashes ----------------------------------------------------------------


def value_hash(v: Any) -> int:
    """A stable 64-bit hash (never Python's ``hash()``): text as UTF-8, numbers as float64."""
    if isinstance(v, str):
        raw = b"s" + v.encode("utf-8", "surrogatepass")
    else:
        raw = b"f" + struct.pack("<d", float(v) + 0.0)  # -0.0 and 0.0 are one value
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def distinct_build(values: list[Any]) -> list[int]:
    """The sorted ``DISTINCT_K`` smallest distinct hashes (plain ints: tiles are mostly small)."""
    return sorted({value_hash(v) for v in values})[:DISTINCT_K]


def distinct_add(h: list[int], hashes: list[int]) -> list[int]:
    """``h`` with more hashes (from :func:`value_hash`)."""
    if not hashes:
        return h
    return sorted(set(h).union(hashes))[:DISTINCT_K]


def distinct_merge(a: list[int], b: list[int]) -> list[int]:
    if not b:
        return a
    if not a:
        return b
    return sorted(set(a).union(b))[:DISTINCT_K]


def distinct_estimate(h: list[int]) -> float:
    """Exact below ``DISTINCT_K`` distinct values, else the KMV estimate ``(k - 1) / u_k``."""
    if len(h) < DISTINCT_K:
        return float(len(h))
    u = (float(h[DISTINCT_K - 1]) + 1.0) / 2.0**64
    return (DISTINCT_K - 1) / u


# -- quantile: DDSketch bins ------------------------------------------------------------------


ZERO = -(2**62)  # the bucket code of values too close to 0 for a bucket of their own


def quantile_code(v: float) -> int:
    """A value's bucket: ``2 * key`` for a positive value, ``2 * key + 1`` for a negative one
    (the key of its magnitude), :data:`ZERO` near zero."""
    if v > _MAPPING.min_possible:
        return 2 * _MAPPING.key(v)
    if v < -_MAPPING.min_possible:
        return 2 * _MAPPING.key(-v) + 1
    return ZERO


def quantile_add(s: Quantile, codes: list[int]) -> Quantile:
    """Bucket counts of positive values, of the magnitudes of negative ones, and the zero count."""
    if not codes:
        return s
    pos, neg, zero = dict(s[0]), dict(s[1]), s[2]
    for c in codes:
        if c == ZERO:
            zero += 1
        elif c & 1:
            neg[c >> 1] = neg.get(c >> 1, 0) + 1
        else:
            pos[c >> 1] = pos.get(c >> 1, 0) + 1
    return pos, neg, zero


def quantile_build(values: list[float]) -> Quantile:
    return quantile_add(({}, {}, 0), [quantile_code(v) for v in values])


def _add(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    if not b:
        return a
    if not a:
        return b
    out = dict(a)
    for k, c in b.items():
        out[k] = out.get(k, 0) + c
    return out


def quantile_merge(a: Quantile, b: Quantile) -> Quantile:
    return _add(a[0], b[0]), _add(a[1], b[1]), a[2] + b[2]


def quantile_value(s: Quantile, q: float) -> float:
    """DDSketch's quantile: the bucket holding rank ``floor(q * (n - 1))`` of the sorted values,
    within relative error ``QUANTILE_ALPHA`` of that value; NaN when empty."""
    pos, neg, zero = s
    n_neg = sum(neg.values())
    count = sum(pos.values()) + n_neg + zero
    if count == 0:
        return math.nan
    rank = q * (count - 1)
    if rank < n_neg:  # negative values, the largest magnitudes first
        keys = sorted(neg, reverse=True)
        cum = np.cumsum([neg[k] for k in keys])
        return -_MAPPING.value(keys[int(np.searchsorted(cum, rank, side="right"))])
    if rank < n_neg + zero:
        return 0.0
    keys = sorted(pos)
    cum = np.cumsum([pos[k] for k in keys])
    return _MAPPING.value(keys[int(np.searchsorted(cum, rank - n_neg - zero, side="right"))])


# -- freq: exact counts -----------------------------------------------------------------------


def freq_add(counts: dict[Any, int], values: list[Any]) -> dict[Any, int]:
    if not values:
        return counts
    out = dict(counts)
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def freq_build(values: list[Any]) -> dict[Any, int]:
    return freq_add({}, values)


def freq_merge(a: dict[Any, int], b: dict[Any, int]) -> dict[Any, int]:
    if not b:
        return a
    if not a:
        return b
    out = dict(a)
    for v, c in b.items():
        out[v] = out.get(v, 0) + c
    return out


def freq_top(counts: dict[Any, int], k: int) -> list[dict[str, Any]]:
    """The ``k`` most frequent values as ``{"value", "count"}``, ties broken by value."""
    top = heapq.nsmallest(k, counts.items(), key=lambda vc: (-vc[1], vc[0]))
    return [{"value": v, "count": c} for v, c in top]
