"""Which feature views the server serves, and how a request's feature references resolve.

Bare names (``user_spend``) are the definitions in the served pipeline files; ``user_spend@2``
is registered version 2, served until it is retired. A view's features are its aggregations and
its derived features (``view`` alone reads all of them, as the Python client does). The registry
is re-read every ``refresh_seconds`` in the background, so versions deprecated or retired after
the server started are refused within that interval, without a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from engine.definitions import Aggregation, Derived, FeatureView
from featurestream.server.errors import ApiError
from featurestream.server.reads import Plan, ViewReader
from registry.core import Registry, RegistryError

__all__ = ["Catalog", "Selection"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Version:
    label: str
    status: str  # active | deprecated | retired
    retire_after: datetime | None
    view: FeatureView | None  # None when retired


@dataclass
class Selection:
    """The features one request reads from one view reference (``view`` or ``view@N``)."""

    ref: str
    view: FeatureView
    reader: ViewReader
    aggs: list[Aggregation | Derived] = field(default_factory=list)  # the features, derived included
    deprecation: str | None = None
    plan: Plan | None = None  # set once ``aggs`` is final


class Catalog:
    """The pipeline's views plus their registered versions; resolves ``view[@N][:feature]`` refs."""

    def __init__(self, views: Sequence[FeatureView]) -> None:
        self.views = {v.name: v for v in views}
        self._versions: dict[str, dict[int, _Version]] = {}
        self._readers: dict[str, ViewReader] = {v.version: ViewReader(v) for v in views}
        self.loaded = False
        self._cache: dict[tuple[str, ...], list[Selection]] = {}
        self.sources: dict[str, FeatureView] = {}  # source name -> first view reading it
        for v in views:
            self.sources.setdefault(v.source.name, v)

    def refresh(self, registry: Registry | None) -> None:
        """Re-read the registered versions of the served views (all of them, none without registry)."""
        from registry.versions import versions

        found: dict[str, dict[int, _Version]] = {}
        if registry is not None:
            for vv in versions(registry):
                if vv.name not in self.views:
                    continue
                view = None
                if vv.status != "retired":
                    try:
                        view = self._known(vv.version_hash) or vv.view()
                    except RegistryError as exc:  # one unreadable version must not hide the others
                        log.warning("not serving %s: %s", vv.label, exc)
                        continue
                found.setdefault(vv.name, {})[vv.seq] = _Version(vv.label, vv.status, vv.retire_after, view)
        for mine in found.values():
            for ver in mine.values():
                if ver.view is not None and ver.view.version not in self._readers:
                    self._readers[ver.view.version] = ViewReader(ver.view)
        self._versions = found
        self._cache = {}
        self.loaded = True

    def _known(self, version: str) -> FeatureView | None:
        reader = self._readers.get(version)
        return reader.view if reader else None

    def view_names(self) -> list[str]:
        return sorted(self.views)

    def resolve(self, features: Sequence[str], readable: set[str] | None = None) -> list[Selection]:
        """Selections of ``features`` (``view``, ``view:feature``, ``view@N:feature``), in the order
        first named, each with its read plan. ``readable`` (the names a key may read) limits the
        names errors list. Results are cached per feature list until the next refresh."""
        key = tuple(features)
        found = self._cache.get(key)
        if found is not None:
            return found
        out: dict[str, Selection] = {}
        seen: set[tuple[str, str]] = set()
        for i, ref in enumerate(features):
            where = f"features[{i}]"
            view_ref, _, feat = ref.partition(":")
            sel = out.get(view_ref) or self._select(view_ref, where, readable)
            out[view_ref] = sel
            if not feat:
                wanted = list(sel.view.features)
            else:
                agg = next((a for a in sel.view.features if a.feature_name == feat), None)
                if agg is None:
                    names = list(sel.view.feature_names)
                    raise ApiError(
                        400,
                        "unknown_feature",
                        f"feature view {sel.ref!r} has no feature {feat!r}",
                        field=where,
                        fix=f"use one of {names}, or {sel.ref!r} alone for all of them",
                    )
                wanted = [agg]
            for a in wanted:
                if (view_ref, a.feature_name) not in seen:
                    seen.add((view_ref, a.feature_name))
                    sel.aggs.append(a)
        result = list(out.values())
        for sel in result:
            sel.plan = sel.reader.plan(sel.aggs)
        if len(self._cache) >= 10_000:
            self._cache = {}
        self._cache[key] = result
        return result

    def select(self, view_ref: str, where: str, readable: set[str] | None = None) -> Selection:
        return self._select(view_ref, where, readable)

    def _select(self, view_ref: str, where: str, readable: set[str] | None) -> Selection:
        name, at, seq = view_ref.partition("@")
        if name not in self.views:
            known = [n for n in self.view_names() if readable is None or "*" in readable or n in readable]
            raise ApiError(
                404 if where == "view" else 400,
                "unknown_view",
                f"no feature view {name!r} is served here",
                field=where,
                fix=f"name one of {known} as view:feature (or view@N:feature for version N)",
            )
        if not at:
            view = self.views[name]
            return Selection(view_ref, view, self._readers[view.version])
        mine = self._versions.get(name, {})
        if not seq.isdigit() or int(seq) not in mine:
            have = ", ".join(f"{name}@{s}" for s in sorted(mine)) or "none (not applied to the registry)"
            raise ApiError(
                404 if where == "view" else 400,
                "unknown_version",
                f"{view_ref!r} is not a registered version of {name!r}",
                field=where,
                fix=f"registered versions: {have}; or read {name!r} for the served definition",
            )
        ver = mine[int(seq)]
        if ver.view is None:
            raise ApiError(
                410,
                "retired_version",
                f"{ver.label} is retired and no longer served",
                field=where,
                fix=f"read {name!r} (the current definition) or another version that is not retired",
            )
        note = None
        if ver.status == "deprecated":
            note = f"{ver.label} is deprecated" + (
                f" and retires after {ver.retire_after:%Y-%m-%d}" if ver.retire_after else ""
            )
        return Selection(view_ref, ver.view, self._readers[ver.view.version], deprecation=note)
