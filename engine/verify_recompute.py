"""The recomputation side of ``featurestream verify``: one entity's feature values from its
accepted events, written from the rules docs/windows.md states (no engine code is shared):

* a sliding window as of ``t`` holds the events of the tiles starting in ``(t - window, t]`` up
  to ``t``; tumbling and hopping windows the latest complete window;
* a session window splits the events up to ``t`` (in time, partition, offset order) where two
  consecutive times are ``gap`` or more apart; ``which="current"`` is the newest session if
  ``t - newest < gap``, ``which="last"`` the newest session whose last event + ``gap <= t``;
* nulls are skipped per column; ``first``/``last`` are the earliest/newest non-null value (ties
  in time go to the lower/higher partition and offset), ``last_n`` the ``n`` newest, newest
  first; ``count_distinct`` counts distinct values (0.0 and -0.0 are one), exact below the
  sketch's bound and not judged above it; ``duration`` is the session's last event time minus
  its first, in seconds.

``percentile`` and ``top_k`` are approximate sketches: verify lists them as not checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.aggregations import Aggregation
from engine.definitions import FeatureView, duration_ms
from engine.levels import window_precision_ms
from engine.sketches import DISTINCT_K

__all__ = ["NOT_JUDGED", "RECOMPUTED", "checkable", "recompute", "same"]

RTOL = 1e-9
ATOL = 1e-9
_EXACT = {"count", "min", "max", "last", "first", "last_n", "count_distinct"}
RECOMPUTED = frozenset({*_EXACT, "sum", "mean", "variance", "stddev", "duration"})
"""Functions verify recomputes; features of others (approximate sketches) are not checked."""
_TEXT = frozenset({"count", "first", "last", "last_n", "count_distinct"})


class _NotJudged:
    def __repr__(self) -> str:
        return "NOT_JUDGED"


NOT_JUDGED: Any = _NotJudged()
"""A value verify cannot judge exactly for this entity (``count_distinct`` past its bound)."""


def checkable(view: FeatureView, agg: Aggregation) -> bool:
    """Whether verify recomputes ``agg`` (text columns take only their exact functions)."""
    if agg.function not in RECOMPUTED:
        return False
    if agg.column is None:
        return True
    field_ = view.source.field(agg.column)
    return field_ is not None and (field_.dtype != "str" or agg.function in _TEXT)


def _window(agg: Aggregation, tile_ms: int, ts: np.ndarray, t: int) -> np.ndarray:
    w = agg.window
    size = duration_ms(w.size)
    if w.kind == "session":
        return _session(size, w.which or "current", ts, t)
    if w.kind == "sliding":  # a long window's start moves in steps of its precision
        r = window_precision_ms(agg, tile_ms)
        return (ts <= t) & ((ts // r) * r > t - size)
    hop = duration_ms(w.hop) if w.kind == "hopping" and w.hop is not None else size
    end = (t // hop) * hop
    return (ts >= end - size) & (ts < end)


def _session(gap: int, which: str, ts: np.ndarray, t: int) -> np.ndarray:
    """The events of the chosen session as of ``t`` (``ts`` ascending)."""
    mask = np.zeros(len(ts), dtype=bool)
    upto = int(np.searchsorted(ts, t, side="right"))  # events at or before t
    if not upto:
        return mask
    starts = [0] + [i for i in range(1, upto) if ts[i] - ts[i - 1] >= gap]
    bounds = [*zip(starts, [*starts[1:], upto], strict=True)]
    if which == "current":
        chosen = bounds[-1] if t - ts[upto - 1] < gap else None
    else:
        closed = [(a, b) for a, b in bounds if ts[b - 1] + gap <= t]
        chosen = closed[-1] if closed else None
    if chosen is not None:
        mask[chosen[0] : chosen[1]] = True
    return mask


def _plain(v: Any) -> Any:
    """A read or recomputed value as plain Python: None for null/NaN, lists for arrays."""
    if v is None:
        return None
    if isinstance(v, np.ndarray | list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and np.isnan(v):
        return None
    return v


def recompute(view: FeatureView, agg: Aggregation, ts: np.ndarray, column: np.ndarray | None, t: int) -> Any:
    """One entity's value of ``agg`` as of ``t`` from its accepted events (in time, partition,
    offset order)."""
    mask = _window(agg, duration_ms(view.tile_size), ts, t)
    if agg.function == "duration":
        times = ts[mask]
        return float(times[-1] - times[0]) / 1000 if len(times) else None
    if column is None:
        return int(mask.sum())
    vals = column[mask]
    if vals.dtype == object:
        vals = np.array([v for v in vals if v is not None and v == v], dtype=object)
    else:
        vals = vals[~np.isnan(vals)]
    n = len(vals)
    match agg.function:
        case "count":
            return n
        case "first":
            return _plain(vals[0]) if n else None
        case "last":
            return _plain(vals[-1]) if n else None
        case "last_n":
            return [_plain(v) for v in vals[::-1][: agg.n]]
        case "count_distinct":
            distinct = len({v + 0.0 if isinstance(v, float) else v for v in vals.tolist()})
            return float(distinct) if distinct < DISTINCT_K else NOT_JUDGED
        case "sum":
            return float(vals.sum()) if n else 0.0
        case "mean":
            return float(vals.mean()) if n else None
        case "min":
            return float(vals.min()) if n else None
        case "max":
            return float(vals.max()) if n else None
        case "variance":
            return float(np.var(vals, ddof=1)) if n > 1 else None
        case "stddev":
            return float(np.std(vals, ddof=1)) if n > 1 else None
    raise ValueError(f"aggregation function {agg.function!r} cannot be recomputed")


def same(function: str, got: Any, want: Any) -> bool:
    """Whether a read value equals the recomputed one: exactly for counts, order statistics,
    values and lists; within a relative and absolute 1e-9 for float sums and moments."""
    got, want = _plain(got), _plain(want)
    if want is None or got is None:
        return got is None and want is None
    if isinstance(want, list) or isinstance(got, list):
        return (
            isinstance(got, list)
            and isinstance(want, list)
            and len(got) == len(want)
            and all(same("last", g, w) for g, w in zip(got, want, strict=True))
        )
    if isinstance(want, str) or isinstance(got, str):
        return got == want
    if function in _EXACT:
        return float(got) == float(want)
    return bool(np.isclose(float(got), float(want), rtol=RTOL, atol=ATOL))
