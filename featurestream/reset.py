"""Drop a pipeline's derived state, so that a rerun recomputes it from its topics as they are now.

What a pipeline derives from its topics: each view version's online keys (Redis: tiles, their
guards, object-aggregation records and session-window values), its offline table (Delta), its
finished or interrupted backfills (``<state_dir>/backfills/<view>__<version>``: their recovery
state and the handoff a worker would continue from) and, when the run used one, the recovery
directory (state and read positions).
After the broker lost its data or a topic was recreated, these describe events that no longer
exist, and the worker refuses to run on them (:class:`~connectors.kafka.TopicChangedError`).

A local Delta table is moved aside (``<table>.reset-<UTC time>``), not deleted, so training sets
pinned to it can still be reproduced from there; a table on an object store cannot be moved by
delta-rs and must be deleted with that store's tools. Registry records are kept.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from connectors.delta_store import DeltaOfflineStore
from connectors.delta_tiles import tiles_uri
from connectors.redis_store import RedisOnlineStore
from engine.definitions import FeatureView
from engine.errors import FeaturestreamError
from engine.levels import level_namespace
from engine.sessions import has_sessions, session_namespace
from featurestream.config import Settings
from featurestream.local.services import embedded_status

__all__ = ["ResetPlan", "apply_reset", "plan_reset"]


@dataclass
class ResetPlan:
    """What a reset drops, and what it cannot reach (``notes``)."""

    redis_url: str | None
    namespaces: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    backfills: list[Path] = field(default_factory=list)
    recovery_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"online keys {ns}* (Redis)" for ns in self.namespaces]
        out += [f"offline table {uri} (moved aside)" for uri in self.tables]
        out += [f"backfill state {d} (recovery state and handoff)" for d in self.backfills]
        if self.recovery_dir is not None:
            out.append(f"recovery dir {self.recovery_dir} (its snapshots)")
        return out


def _redis_url(settings: Settings) -> str | None:
    if settings.redis_url:
        return settings.redis_url
    record = embedded_status(settings).get("redis")
    return str(record["address"]) if record and record["answers"] else None


def plan_reset(views: list[FeatureView], settings: Settings, recovery_dir: Path | None) -> ResetPlan:
    """The state of ``views`` (every version given) that a reset would drop."""
    plan = ResetPlan(_redis_url(settings))
    if plan.redis_url is None:
        plan.notes.append("no embedded Redis is running; it keeps nothing, so no online keys remain")
    else:
        for v in views:
            ns = RedisOnlineStore.namespace_of(settings.redis_prefix, v.name, v.version)
            plan.namespaces.append(ns)
            if has_sessions(v):
                plan.namespaces.append(session_namespace(ns))
            plan.namespaces += [level_namespace(ns, r) for r in v.tile_levels_ms[1:]]  # long windows
    offline = DeltaOfflineStore(settings.resolved_delta_uri(), settings.delta_storage_options)
    for v in views:
        events = offline.table_uri(v.name, v.version)
        for uri in (events, tiles_uri(offline, v.name, v.version)):  # accepted events, then tiles
            if offline.version(uri) is None:
                continue
            if "://" in uri and not uri.startswith("file://"):
                raise FeaturestreamError(
                    f"offline table {uri} is on an object store, which this command cannot move; "
                    "delete it with that store's tools, then run `featurestream reset` again"
                )
            plan.tables.append(uri)
    # A backfill's handoff would make the next run continue from offsets and tiles of the events
    # a reset drops, so its directory goes too (engine.backfill keeps nothing else there).
    root = settings.state_dir.resolve() / "backfills"
    plan.backfills = [
        root / f"{v.name}__{v.version}" for v in views if (root / f"{v.name}__{v.version}").is_dir()
    ]
    if recovery_dir is not None and any(recovery_dir.glob("part-*.sqlite3*")):
        plan.recovery_dir = recovery_dir
    elif recovery_dir is not None:
        plan.notes.append(f"{recovery_dir} holds no recovery snapshots (part-*.sqlite3)")
    return plan


def apply_reset(plan: ResetPlan) -> list[str]:
    """Drop what ``plan`` lists; returns one line per thing done."""
    done: list[str] = []
    if plan.namespaces and plan.redis_url:
        store = RedisOnlineStore(plan.redis_url)
        for ns in plan.namespaces:
            done.append(f"deleted {store.delete_namespace(ns)} online keys {ns}*")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for uri in plan.tables:
        path = Path(uri.removeprefix("file://"))
        aside = path.with_name(f"{path.name}.reset-{stamp}")
        path.rename(aside)
        done.append(f"moved offline table {path} to {aside}")
    for directory in plan.backfills:
        shutil.rmtree(directory)
        done.append(f"removed backfill state {directory}")
    if plan.recovery_dir is not None:
        parts = list(plan.recovery_dir.glob("part-*.sqlite3*"))
        for part in parts:  # only Bytewax's files: a mistyped directory loses nothing else
            part.unlink()
        done.append(f"removed {len(parts)} recovery snapshot files from {plan.recovery_dir}")
    return done
