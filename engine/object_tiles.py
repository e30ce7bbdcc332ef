"""Object tiles: per (entity, tile) states of the aggregations that do not fit a float64 tile row
(``first``, ``last`` of text, ``last_n``, ``count_distinct``, ``percentile``, ``top_k``).

A view's object aggregations share *specs*: one state per (kind, column), see
:mod:`engine.sketches`. The stream merges each batch's per-tile states into its state (kept in
recovery snapshots), and ships the changed tiles as length-prefixed msgpack records with the
tile rows, in the same guarded Redis call. Reads merge the tiles a window covers in tile order
and finalize; training sets rebuild the same per-tile states from the event log and do the same,
so online and offline values agree exactly (every state is canonical, see ``engine.sketches``).
"""

from __future__ import annotations

import itertools
import math
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from engine import sketches as sk
from engine.definitions import Aggregation, FeatureView

__all__ = [
    "ObjectSpec",
    "apply_events",
    "build_states",
    "decode_records",
    "encode_record",
    "finalize_object",
    "is_object",
    "merge_states",
    "object_specs",
    "object_text_columns",
]

OBJECT_FUNCTIONS = frozenset({"first", "last_n", "count_distinct", "percentile", "top_k"})
_KIND = {"first": "order", "last": "order", "last_n": "order", "count_distinct": "distinct"}
_KIND |= {"percentile": "quantile", "top_k": "freq"}
_LEN = struct.Struct("<I")
_BIG_ENDIAN = sys.byteorder == "big"
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


@dataclass(frozen=True)
class ObjectSpec:
    """One state per tile: ``kind`` of ``column``; ``n`` latest events kept for ``order``."""

    kind: str
    column: str
    n: int = 1


def is_object(agg: Aggregation, view: FeatureView) -> bool:
    """Whether ``agg`` lives in object tiles (``last`` of a numeric column stays in the rows)."""
    if agg.function in OBJECT_FUNCTIONS:
        return True
    return agg.function == "last" and agg.column in view.text_columns


def object_specs(view: FeatureView) -> tuple[ObjectSpec, ...]:
    specs: dict[tuple[str, str], int] = {}
    for a in view.aggregations:
        if is_object(a, view):
            key = (_KIND[a.function], a.column or "")
            specs[key] = max(specs.get(key, 1), a.n or 1)
    return tuple(ObjectSpec(kind, column, n) for (kind, column), n in specs.items())


def spec_index(specs: tuple[ObjectSpec, ...], agg: Aggregation) -> int:
    kind = _KIND[agg.function]
    return next(i for i, s in enumerate(specs) if s.kind == kind and s.column == agg.column)


def object_text_columns(view: FeatureView) -> tuple[str, ...]:
    """Text columns whose values (not only their presence) the stream needs."""
    cols = {s.column for s in object_specs(view)}
    return tuple(c for c in view.text_columns if c in cols)


def _prepare(s: ObjectSpec, col: list[Any]) -> list[Any]:
    """Per event, what its value adds to a state of kind ``s.kind``: the value itself, its hash,
    or its bucket code; None for a null (None or NaN)."""
    vals = [None if v is None or v != v else v for v in col]  # NaN != NaN
    if s.kind == "distinct":
        return [None if v is None else sk.value_hash(v) for v in vals]
    if s.kind == "quantile":
        return [None if v is None else sk.quantile_code(float(v)) for v in vals]
    return vals


def _add(s: ObjectSpec, state: Any, items: list[Any], ts: list[int], part: list[int], off: list[int]) -> Any:
    """``state`` with the prepared items of some events (nulls skipped)."""
    if s.kind == "order":
        events = [(ts[i], part[i], off[i], v) for i, v in enumerate(items) if v is not None]
        return sk.order_add(state, events, s.n)
    present = [v for v in items if v is not None]
    if s.kind == "distinct":
        return sk.distinct_add(state, present)
    if s.kind == "quantile":
        return sk.quantile_add(state, present)
    return sk.freq_add(state, present)


def empty_states(specs: tuple[ObjectSpec, ...]) -> list[Any]:
    return [
        (None, [])
        if s.kind == "order"
        else []
        if s.kind == "distinct"
        else ({}, {}, 0)
        if s.kind == "quantile"
        else {}
        for s in specs
    ]


def build_states(
    specs: tuple[ObjectSpec, ...], ts: list[int], part: list[int], off: list[int], values: dict[str, list]
) -> list[Any]:
    """The states of one tile's events (nulls skipped)."""
    return [
        _add(s, x, _prepare(s, values[s.column]), ts, part, off)
        for s, x in zip(specs, empty_states(specs), strict=True)
    ]


def merge_states(specs: tuple[ObjectSpec, ...], a: list[Any], b: list[Any]) -> list[Any]:
    out: list[Any] = []
    for s, x, y in zip(specs, a, b, strict=True):
        if s.kind == "order":
            out.append(sk.order_merge(x, y, s.n))
        elif s.kind == "distinct":
            out.append(sk.distinct_merge(x, y))
        elif s.kind == "quantile":
            out.append(sk.quantile_merge(x, y))
        else:
            out.append(sk.freq_merge(x, y))
    return out


def apply_events(
    specs: tuple[ObjectSpec, ...],
    store: dict[int, list[Any]],
    keys: np.ndarray,
    ts: np.ndarray,
    part: np.ndarray,
    off: np.ndarray,
    values: dict[str, list],
) -> None:
    """Add events (group ``keys[i]``) to ``store``, one state list per group key: each event is
    prepared once per spec, then each group's states are updated from their events."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    cuts = [*np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1]))).tolist(), len(k)]
    o, t, p, f = order.tolist(), ts[order].tolist(), part[order].tolist(), off[order].tolist()
    prepared = [_prepare(s, [values[s.column][i] for i in o]) for s in specs]
    fresh = empty_states(specs)
    for a, b in itertools.pairwise(cuts):
        key = int(k[a])
        old = store.get(key) or fresh
        ta, pa_, fa = t[a:b], p[a:b], f[a:b]
        store[key] = [
            _add(s, x, items[a:b], ta, pa_, fa) for s, x, items in zip(specs, old, prepared, strict=True)
        ]


# -- bytes: length-prefixed msgpack records [tile_no, state...] --------------------------------


def _pack(s: ObjectSpec, x: Any) -> Any:
    if s.kind == "order":
        return [None if x[0] is None else list(x[0]), [list(e) for e in x[1]]]
    if s.kind == "distinct":
        h = array("Q", x)
        if _BIG_ENDIAN:
            h.byteswap()
        return h.tobytes()  # little-endian uint64
    if s.kind == "quantile":
        return [sorted(x[0].items()), sorted(x[1].items()), x[2]]
    return sorted([v, c] for v, c in x.items())


def _unpack(s: ObjectSpec, x: Any) -> Any:
    if s.kind == "order":
        return (None if x[0] is None else tuple(x[0]), [tuple(e) for e in x[1]])
    if s.kind == "distinct":
        h = array("Q")
        h.frombytes(x)
        if _BIG_ENDIAN:
            h.byteswap()
        return h.tolist()
    if s.kind == "quantile":
        return ({k: c for k, c in x[0]}, {k: c for k, c in x[1]}, int(x[2]))
    return {v: c for v, c in x}


def encode_record(specs: tuple[ObjectSpec, ...], tile_no: int, states: list[Any]) -> bytes:
    body = _enc.encode([tile_no, *(_pack(s, x) for s, x in zip(specs, states, strict=True))])
    return _LEN.pack(len(body)) + body


def decode_records(specs: tuple[ObjectSpec, ...], blob: bytes) -> dict[int, list[Any]]:
    """Tile number -> states; a later record of a tile replaces an earlier one."""
    out: dict[int, list[Any]] = {}
    pos, end = 0, len(blob)
    while pos < end:
        (size,) = _LEN.unpack_from(blob, pos)
        rec = _dec.decode(blob[pos + 4 : pos + 4 + size])
        pos += 4 + size
        out[int(rec[0])] = [_unpack(s, x) for s, x in zip(specs, rec[1:], strict=True)]
    return out


# -- values -----------------------------------------------------------------------------------


def numeric_result(agg: Aggregation, view: FeatureView) -> bool:
    """Whether the values are floats (NaN = null) rather than objects (str, list, None)."""
    if agg.function in ("count_distinct", "percentile"):
        return True
    return agg.function == "first" and agg.column not in view.text_columns


def finalize_object(agg: Aggregation, spec: ObjectSpec, state: Any) -> Any:
    """One value from a window's merged state: None/NaN when the window holds no value;
    ``count_distinct`` of an empty window is 0, ``last_n`` and ``top_k`` give ``[]``."""
    match agg.function:
        case "first":
            return None if state[0] is None else state[0][3]
        case "last":
            return state[1][0][3] if state[1] else None
        case "last_n":
            return [e[3] for e in state[1][: agg.n]]
        case "count_distinct":
            return sk.distinct_estimate(state)
        case "percentile":
            return sk.quantile_value(state, agg.q)  # type: ignore[arg-type]
        case "top_k":
            return sk.freq_top(state, agg.k)  # type: ignore[arg-type]
    raise AssertionError(agg.function)


def window_values(
    view: FeatureView,
    specs: tuple[ObjectSpec, ...],
    aggs: list[Aggregation],
    windows: list[dict[int, list[Any]]],
) -> dict[str, np.ndarray]:
    """Values of ``aggs`` for each row's window, given as tile number -> states."""
    merged: list[list[Any]] = []
    for tiles in windows:
        acc = empty_states(specs)
        for t in sorted(tiles):
            acc = merge_states(specs, acc, tiles[t])
        merged.append(acc)
    out: dict[str, np.ndarray] = {}
    for a in aggs:
        i = spec_index(specs, a)
        vals = [finalize_object(a, specs[i], m[i]) for m in merged]
        if numeric_result(a, view):
            out[a.feature_name] = np.array([math.nan if v is None else v for v in vals], np.float64)
        else:
            arr = np.empty(len(vals), dtype=object)
            for j, v in enumerate(vals):  # element-wise: numpy would broadcast equal-length lists
                arr[j] = v
            out[a.feature_name] = arr
    return out
