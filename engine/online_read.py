"""One round trip for everything an online read of a view needs.

A view's online values live under several key prefixes (connectors.redis_store): its tile logs,
its object-tile records, its session values (engine.sessions) and one set of tiles per coarse
level (engine.levels). :func:`read_view` fetches the ones asked for in a single MGET, so the
values of one read come from one consistent moment of the store, and returns them as the keyword
arguments of :func:`engine.reads.online_values`.
"""

from __future__ import annotations

from typing import Any

from connectors.redis_store import RedisOnlineStore
from engine.definitions import FeatureView
from engine.levels import level_namespace
from engine.sessions import has_sessions, session_namespace
from engine.tiles import TileLayout

__all__ = ["read_view"]


def read_view(
    store: RedisOnlineStore,
    view: FeatureView,
    namespace: str,
    ids: list[str],
    *,
    objects: bool | None = None,
    sessions: bool | None = None,
) -> dict[str, Any]:
    """``blobs``, ``objects``, ``session_blobs`` and ``levels`` of the entities ``ids``; object
    records and session values only where asked (default: where the view has them)."""
    want_objects = bool(TileLayout.of(view).objects) if objects is None else objects
    want_sessions = has_sessions(view) if sessions is None else sessions
    objects_ns = RedisOnlineStore.objects_namespace
    spaces = [namespace]
    if want_objects:
        spaces.append(objects_ns(namespace))
    if want_sessions:
        spaces.append(session_namespace(namespace))
    coarse = view.tile_levels_ms[1:]
    for r in coarse:
        spaces.append(level_namespace(namespace, r))
        if want_objects:
            spaces.append(objects_ns(level_namespace(namespace, r)))
    got = iter(store.read_spaces(spaces, ids))
    blobs = next(got)
    found: dict[str, Any] = {"blobs": blobs, "objects": next(got) if want_objects else None}
    found["session_blobs"] = next(got) if want_sessions else None
    levels = {}
    for r in coarse:
        tiles = next(got)
        levels[r] = (tiles, next(got) if want_objects else None)
    found["levels"] = levels or None
    return found
