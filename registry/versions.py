"""Feature view versions: plan and apply definitions, list, deprecate and retire versions.

A version is immutable: its stored ``definition`` (and so its hash, online keys, offline table and
state) never changes. Only its status (active -> deprecated -> retired) and metadata (description,
owner, tags, ttl, drift thresholds) may. Older versions keep being served beside newer ones until
they are retired, so consumers can move over at their own pace.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import JSON, Connection, column, func, insert, select, table, update
from sqlalchemy.exc import IntegrityError

from engine.definitions import FeatureView
from engine.errors import DefinitionError
from engine.table_definitions import TableView
from registry.core import Registry, RegistryError, now
from registry.diff import diff_views
from registry.schema import view_changes, view_versions

__all__ = [
    "Change",
    "ChangeKind",
    "ViewVersion",
    "apply",
    "deprecate",
    "find_version",
    "get_version",
    "plan",
    "retire",
    "serving_views",
    "versions",
]

ChangeKind = Literal["new", "unchanged", "metadata", "additive", "breaking", "removed"]
Status = Literal["active", "deprecated", "retired"]
_CREATES = ("new", "additive", "breaking")
_LOCK = "apply"
_ATTEMPTS = 5

# fs_view_versions with the column migration 2 added (the Table object stays as migration 1 made it).
_vv = table(
    view_versions.name,
    *(column(c.name, c.type) for c in view_versions.columns),
    column("edited_definition", JSON),
)


@dataclass(frozen=True)
class ViewVersion:
    """One stored version of a feature view."""

    id: int
    name: str
    seq: int
    version_hash: str
    status: Status
    created_at: datetime
    deprecated_at: datetime | None
    retire_after: datetime | None
    retired_at: datetime | None
    description: str
    owner: str
    tags: dict[str, str]
    source_topic: str
    definition: dict[str, Any] = field(repr=False)  # as first applied; never updated
    edited_definition: dict[str, Any] | None = field(default=None, repr=False)  # + metadata edits

    @property
    def label(self) -> str:
        return f"{self.name}@{self.seq}"

    def view(self) -> FeatureView:
        """The FeatureView this version serves (metadata edits included); its ``version`` is the hash."""
        try:
            definition = self.edited_definition or self.definition
            kind = TableView if "features" in definition else FeatureView  # a CDC table view
            view = kind(**definition)
        except DefinitionError as exc:
            raise RegistryError(f"stored definition of {self.label} no longer validates: {exc}") from None
        if view.version != self.version_hash:
            raise RegistryError(
                f"stored definition of {self.label} hashes to {view.version}, not {self.version_hash}: "
                "FeatureView.canonical() changed since it was recorded; migrate the registry's definitions"
            )
        return view


@dataclass(frozen=True)
class Change:
    """What ``plan``/``apply`` does with one view; ``result`` is the version it maps to after apply."""

    name: str
    kind: ChangeKind
    current: ViewVersion | None
    proposed: FeatureView | None = field(repr=False)
    reasons: list[str] = field(default_factory=list)
    result: ViewVersion | None = None

    @property
    def breaking(self) -> bool:
        return self.kind == "breaking"

    @property
    def creates_version(self) -> bool:
        return self.kind in _CREATES


def plan(registry: Registry, views: Iterable[FeatureView]) -> list[Change]:
    """What :func:`apply` would record, without recording it."""
    views = _unique(views)
    with registry.read() as conn:
        return _plan(conn, views)


def apply(registry: Registry, views: Iterable[FeatureView]) -> list[Change]:
    """Record ``views``: new versions for definition changes, in-place edits for metadata ones.

    Serialised by the registry's ``apply`` lock, so concurrent applies (from any process) see each
    other's versions; the unique constraints catch any writer that bypasses it, and we retry.
    """
    views = _unique(views)
    for attempt in range(_ATTEMPTS):
        try:
            with registry.write_lock(_LOCK) as conn:
                return _apply(conn, views)
        except IntegrityError as exc:
            if attempt == _ATTEMPTS - 1:
                raise RegistryError(
                    f"apply kept conflicting with concurrent writers ({exc.orig}); run it again"
                ) from None
    raise AssertionError("unreachable")


def versions(registry: Registry, name: str | None = None) -> list[ViewVersion]:
    """Every stored version (of one view, or of all), by name then seq."""
    with registry.read() as conn:
        rows = _rows(conn, name)
    if name is not None and not rows:
        raise RegistryError(_unknown(registry, name))
    return rows


def get_version(registry: Registry, name: str, seq: int | None = None) -> ViewVersion:
    """Version ``seq`` of a view; ``None`` means the latest one not retired."""
    with registry.read() as conn:
        return _get(conn, registry, name, seq)


def find_version(registry: Registry, name: str, version_hash: str) -> ViewVersion | None:
    """The version of ``name`` whose definition hashes to ``version_hash``, if recorded."""
    with registry.read() as conn:
        return next((v for v in _rows(conn, name) if v.version_hash == version_hash), None)


def deprecate(registry: Registry, name: str, seq: int, retire_after: datetime | None = None) -> ViewVersion:
    """Mark a version deprecated (still served) and, optionally, when it may be retired."""
    if retire_after is not None and retire_after.utcoffset() is None:
        raise RegistryError(
            f"retire_after {retire_after.isoformat()} has no time zone; pass an aware datetime, "
            "e.g. datetime(2030, 1, 1, tzinfo=UTC)"
        )
    with registry.write_lock(_LOCK) as conn:
        v = _get(conn, registry, name, seq)
        if v.status == "retired":
            raise RegistryError(f"{v.label} is already retired, so it cannot be deprecated")
        values: dict[str, Any] = {"status": "deprecated", "deprecated_at": v.deprecated_at or now()}
        if retire_after is not None:
            values["retire_after"] = retire_after.astimezone(UTC)
        conn.execute(update(_vv).where(_vv.c.id == v.id).values(**values))
        when = f"; may be retired after {retire_after.isoformat()}" if retire_after else ""
        _log(conn, v.id, "deprecated", [f"{v.label} deprecated{when}"])
        return _get(conn, registry, name, seq)


def retire(registry: Registry, name: str, seq: int) -> ViewVersion:
    """Mark a version retired: no longer served, and never reused by a later apply."""
    with registry.write_lock(_LOCK) as conn:
        v = _get(conn, registry, name, seq)
        if v.status != "retired":
            conn.execute(update(_vv).where(_vv.c.id == v.id).values(status="retired", retired_at=now()))
            _log(conn, v.id, "retired", [f"{v.label} retired"])
        return _get(conn, registry, name, seq)


def serving_views(registry: Registry, names: Iterable[str]) -> list[FeatureView]:
    """Every non-retired version of these views, oldest first, so a worker computes them side by side."""
    out: list[FeatureView] = []
    with registry.read() as conn:
        for name in dict.fromkeys(names):
            mine = _rows(conn, name)
            if not mine:
                raise RegistryError(_unknown(registry, name))
            live = [v for v in mine if v.status != "retired"]
            if not live:
                raise RegistryError(
                    f"every version of feature view {name!r} is retired; apply a definition of it "
                    f"(featurestream apply <pipeline>) or stop serving it"
                )
            out.extend(v.view() for v in live)
    return out


def _unique(views: Iterable[FeatureView]) -> list[FeatureView]:
    views = list(views)
    names = [v.name for v in views]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RegistryError(f"feature views {dupes} are given more than once; give each name one definition")
    return views


def _plan(conn: Connection, views: list[FeatureView]) -> list[Change]:
    stored: dict[str, list[ViewVersion]] = {}
    for v in _rows(conn):
        stored.setdefault(v.name, []).append(v)
    changes = []
    for view in views:
        mine = stored.get(view.name, [])
        live = [v for v in mine if v.status != "retired"]
        same = next((v for v in mine if v.version_hash == view.version), None)
        if same is not None and same.status == "retired":
            raise RegistryError(
                f"{view.name}: this definition is {same.label} (version {same.version_hash}), which was "
                f"retired on {same.retired_at:%Y-%m-%d}, and a retired version is never served again; "
                "change the definition (a changed definition gets a new version) or drop it from the pipeline"
            )
        if same is not None:
            diff = diff_views(same.view(), view)
            reasons = list(diff.reasons)
            if same.status == "deprecated":
                reasons.insert(0, f"reactivates {same.label} (deprecated)")
            if same is not live[-1]:
                reasons.insert(0, f"same definition as {same.label}; the latest is {live[-1].label}")
            changes.append(Change(view.name, diff.kind, same, view, reasons, result=same))
        elif not live:
            why = f"all earlier versions ({', '.join(v.label for v in mine)}) are retired" if mine else ""
            changes.append(Change(view.name, "new", None, view, [why or "first version"]))
        else:
            diff = diff_views(live[-1].view(), view)
            changes.append(Change(view.name, diff.kind, live[-1], view, list(diff.reasons)))
    given = {v.name for v in views}
    for name, mine in sorted(stored.items()):
        live = [v for v in mine if v.status != "retired"]
        if name not in given and live:
            reason = (
                "stored but not in the given definitions; apply keeps serving it "
                f"(retire its versions to stop: featurestream retire {name} <seq>)"
            )
            changes.append(Change(name, "removed", live[-1], None, [reason], result=live[-1]))
    return changes


def _apply(conn: Connection, views: list[FeatureView]) -> list[Change]:
    done = []
    for ch in _plan(conn, views):
        view = ch.proposed
        if view is None:  # removed: reported only
            done.append(ch)
            continue
        if ch.creates_version:
            seq = (conn.execute(select(func.max(_vv.c.seq)).where(_vv.c.name == view.name)).scalar() or 0) + 1
            result = conn.execute(
                insert(view_versions).values(
                    name=view.name,
                    seq=seq,
                    version_hash=view.version,
                    definition=view.model_dump(mode="json"),
                    source_topic=view.source.topic,
                    status="active",
                    created_at=now(),
                    description=view.description,
                    owner=view.owner,
                    tags=dict(view.tags),
                )
            )
            vid = int(result.inserted_primary_key[0])
            _log(conn, vid, ch.kind, ch.reasons, ch.current)
        else:
            assert ch.current is not None
            vid = ch.current.id
            values: dict[str, Any] = {}
            if ch.kind == "metadata":
                values.update(
                    description=view.description,
                    owner=view.owner,
                    tags=dict(view.tags),
                    edited_definition=view.model_dump(mode="json"),
                )
            if ch.current.status == "deprecated":
                values.update(status="active", deprecated_at=None, retire_after=None)
            if values:
                conn.execute(update(_vv).where(_vv.c.id == vid).values(**values))
                kind = "metadata" if ch.kind == "metadata" else "reactivated"
                _log(conn, vid, kind, ch.reasons, ch.current)
        row = conn.execute(select(_vv).where(_vv.c.id == vid)).one()
        done.append(replace(ch, result=_version(row)))
    return done


def _log(
    conn: Connection, vid: int, kind: str, reasons: list[str], previous: ViewVersion | None = None
) -> None:
    detail = {"reasons": reasons, "previous": previous.label if previous else None}
    conn.execute(insert(view_changes).values(view_version_id=vid, kind=kind, detail=detail, applied_at=now()))


def _get(conn: Connection, registry: Registry, name: str, seq: int | None) -> ViewVersion:
    mine = _rows(conn, name)
    if not mine:
        raise RegistryError(_unknown(registry, name))
    if seq is None:
        live = [v for v in mine if v.status != "retired"]
        if not live:
            raise RegistryError(
                f"every version of feature view {name!r} is retired; pass a seq to read one, or apply "
                "a new definition"
            )
        return live[-1]
    found = next((v for v in mine if v.seq == seq), None)
    if found is None:
        raise RegistryError(
            f"feature view {name!r} has no version {seq}; it has {', '.join(str(v.seq) for v in mine)} "
            f"(see `featurestream versions {name}`)"
        )
    return found


def _unknown(registry: Registry, name: str) -> str:
    return (
        f"no feature view {name!r} in the registry at {registry.safe_url}; record it first with "
        "`featurestream apply <pipeline.py>` (or check the name and FEATURESTREAM_REGISTRY_URL)"
    )


def _rows(conn: Connection, name: str | None = None) -> list[ViewVersion]:
    query = select(_vv).order_by(_vv.c.name, _vv.c.seq)
    if name is not None:
        query = query.where(_vv.c.name == name)
    return [_version(row) for row in conn.execute(query)]


def _version(row: Any) -> ViewVersion:
    m = row._mapping
    return ViewVersion(
        id=m["id"],
        name=m["name"],
        seq=m["seq"],
        version_hash=m["version_hash"],
        status=m["status"],
        created_at=_utc(m["created_at"]),  # type: ignore[arg-type]
        deprecated_at=_utc(m["deprecated_at"]),
        retire_after=_utc(m["retire_after"]),
        retired_at=_utc(m["retired_at"]),
        description=m["description"],
        owner=m["owner"],
        tags=dict(m["tags"] or {}),
        source_topic=m["source_topic"],
        definition=m["definition"],
        edited_definition=m["edited_definition"],
    )


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session zone."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
