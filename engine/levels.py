"""Multi-resolution tiles: long windows read a bounded number of coarse tiles.

A view keeps tiles of its ``tile_size`` (level 0). A window spanning more than
:data:`FINE_LIMIT` of them would make every online read combine that many rows and keep that many
per entity, so it reads coarser tiles instead, from the ladder :data:`LADDER_MS` (1 hour, 1 day):
its *precision* ``R`` is the finest ladder level that covers it in at most :data:`COARSE_LIMIT`
tiles. The view then keeps one tile state per level, level 0 first, each fed every event (so no
compaction step can lose or double count anything), each evicting what no window still needs:

- level ``j``'s tiles live for its longest window (windows of precision ``R_j``) or, when a
  coarser level exists, for one tile of that level, plus the allowed lateness;
- so 1-minute tiles live about an hour, 1-hour tiles a day, 1-day tiles the longest window.

A window of precision ``R`` covers, as of ``t``: sliding, ``[((t - size) // R + 1) * R, t]`` (the
window's start moves in steps of ``R``, its length is in ``(size - R, size]``); hopping and
tumbling, ``[E - size, E)`` with ``E = floor(t / hop) * hop`` as at level 0 (``R`` divides both,
so nothing is approximated). A read combines the precision level's tiles for the aligned tail and
each finer level's tiles for what is left, down to level 0 for the newest part: at most
``size / R + 1`` plus the sum of the ratios of consecutive levels rows (174 for 90 days over
1-minute tiles: 90 + 24 + 60). Offline reads cover the same span from events, so online and offline
values stay equal.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING

from engine.aggregations import Aggregation
from engine.durations import duration_ms, format_duration

if TYPE_CHECKING:
    from engine.definitions import FeatureView

__all__ = [
    "COARSE_LIMIT",
    "FINE_LIMIT",
    "LADDER_MS",
    "level_namespace",
    "level_retention_ms",
    "levels_of",
    "view_levels",
    "window_precision_ms",
    "window_ranges",
]

LADDER_MS = (3_600_000, 86_400_000)
"""Coarse tile sizes a long window may read, finest first: 1 hour, 1 day."""
FINE_LIMIT = 10_000
"""Windows of at most this many level-0 tiles read level 0 only (exact to the tile size)."""
COARSE_LIMIT = 1_000
"""A coarse window spans at most this many tiles of its precision."""


@lru_cache(maxsize=4096)
def _precision(kind: str, size_ms: int, hop_ms: int | None, tile_ms: int) -> int | None:
    if kind == "session" or size_ms <= FINE_LIMIT * tile_ms:
        return tile_ms
    for r in LADDER_MS:
        if r <= tile_ms or r % tile_ms or size_ms > COARSE_LIMIT * r:
            continue
        if kind == "sliding" or (size_ms % r == 0 and hop_ms is not None and hop_ms % r == 0):
            return r
    return None


def window_precision_ms(agg: Aggregation, tile_ms: int) -> int:
    """The tile size (ms) the tail of ``agg``'s window is read at: ``tile_ms`` for windows of at
    most :data:`FINE_LIMIT` tiles, else a ladder level. Raises ValueError naming the fix when no
    level bounds the read."""
    w = agg.window
    hop = duration_ms(w.hop_or_size) if w.kind != "sliding" else None
    r = _precision(w.kind, duration_ms(w.size), hop, tile_ms)
    if r is None:
        raise ValueError(
            f"{w.kind} window {format_duration(w.size)} spans more than {FINE_LIMIT} tiles of "
            f"{format_duration(timedelta(milliseconds=tile_ms))} and no coarse tile (1h, 1d) covers "
            f"it in {COARSE_LIMIT} tiles"
            + ("" if w.kind == "sliding" else " while dividing its size and hop")
            + "; shorten the window, use a size and hop in whole hours or days, or a coarser tile_size"
        )
    return r


def view_levels(view: FeatureView) -> tuple[int, ...]:
    """Tile sizes (ms) ``view`` keeps (also ``view.tile_levels_ms``): its tile size, then each
    ladder level up to the coarsest precision of its windows (the levels between make the head
    of a long window short too)."""
    return view.tile_levels_ms


def levels_of(tile_ms: int, aggs: tuple[Aggregation, ...]) -> tuple[int, ...]:
    """:func:`view_levels` from a view's tile size and aggregations (used while it is built)."""
    coarsest = max((window_precision_ms(a, tile_ms) for a in aggs), default=tile_ms)
    return (tile_ms, *(r for r in LADDER_MS if tile_ms < r <= coarsest and r % tile_ms == 0))


def level_retention_ms(
    levels: tuple[int, ...], level: int, aggs: tuple[Aggregation, ...], lateness_ms: int
) -> int:
    """How far behind the newest event level ``level`` keeps tiles: its own windows' lookback or
    one tile of the next coarser level, whichever is longer, plus lateness and one tile."""
    r = levels[level]
    own = [
        duration_ms(a.window.lookback)
        for a in aggs
        if a.window.kind != "session" and window_precision_ms(a, levels[0]) == r
    ]
    if level == 0:  # session windows' state is their own; level 0 also answers short windows
        own.append(0)
    need = max(own, default=0)
    if level + 1 < len(levels):
        need = max(need, levels[level + 1])
    return need + lateness_ms + r


def window_ranges(view: FeatureView, agg: Aggregation, t_ms: int) -> list[tuple[int, int, int]]:
    """The tiles one read of ``agg`` as of ``t_ms`` combines: ``(level_ms, lo, hi)`` with inclusive
    tile numbers at that level, disjoint, coarsest first, together covering the window's span."""
    from engine.tiles import window_tile_range  # the window's span, in level-0 tiles

    levels = view.tile_levels_ms
    tile = levels[0]
    lo, hi, _ = window_tile_range(agg, tile, [t_ms])
    start, end = int(lo[0]) * tile, (int(hi[0]) + 1) * tile
    if end <= start:
        return []
    r = window_precision_ms(agg, tile)
    out: list[tuple[int, int, int]] = []
    for level_ms in reversed(levels):
        if level_ms > r:
            continue
        stop = end if level_ms == tile else (end // level_ms) * level_ms
        if stop > start:
            out.append((level_ms, start // level_ms, stop // level_ms - 1))
            start = stop
    return out


def level_namespace(namespace: str, level_ms: int) -> str:
    """Online key prefix of a view version's coarse tiles of ``level_ms`` (``namespace`` ends in
    ':'), beside its level-0 tiles, with its own position guard."""
    return f"{namespace[:-1]}/r{level_ms // 1000}:"
