"""`featurestream reset` drops every piece of a pipeline's derived state: tile keys and guards,
object-aggregation records, session-window keys and guards, its Delta event and tile tables (moved
aside), and its backfills' state (whose handoff would make a rerun continue from the dropped
events), and nothing of other views."""

from __future__ import annotations

from pathlib import Path

import redis

from connectors.delta_store import DeltaOfflineStore
from connectors.delta_tiles import tiles_uri
from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation
from engine.handoff import HANDOFF_FILE, find_handoff
from engine.sessions import session_namespace
from featurestream.config import Settings
from featurestream.reset import apply_reset, plan_reset
from tests.conftest import Services
from tests.sessions_helpers import BASE, make_view
from tests.support import make_runtime, produce, run_views


def test_reset_drops_sessions_objects_and_backfills(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=2)
    view = make_view(name, extra=(Aggregation(function="count_distinct", column="amount", window="1h"),))
    events = [{"user_id": f"u{i % 5}", "amount": float(i % 4), "ts": BASE + i * 30_000} for i in range(60)]
    produce(services.kafka, name, events, key_field="user_id")
    runtime: RuntimeConfig = make_runtime(services.kafka, services.redis_url, tmp_path, "reset")
    run_views([view], runtime)

    client = redis.Redis.from_url(services.redis_url)
    prefix = runtime.redis_prefix
    ns = RedisOnlineStore.namespace_of(prefix, view.name, view.version)
    sessions = session_namespace(ns)
    kinds = {
        "tiles": ns + "*",
        "guards": ns[:-1] + "#g:*",
        "objects": ns[:-1] + "#o:*",
        "sessions": sessions + "*",
        "session guards": sessions[:-1] + "#g:*",
    }
    for kind, pattern in kinds.items():
        assert list(client.scan_iter(match=pattern)), f"the run wrote no {kind} keys"
    client.set(f"{prefix}:other:v1:u0", b"kept")  # another view's key under the same prefix

    state = tmp_path / "state"
    mine = state / "backfills" / f"{view.name}__{view.version}" / "0123456789ab"
    other = state / "backfills" / f"other__{view.version}" / "0123456789ab"
    for d in (mine, other):
        (d / "recovery").mkdir(parents=True)
        (d / "recovery" / "part-0.sqlite3").write_bytes(b"")
        (d / HANDOFF_FILE).write_bytes(b"")
    settings = Settings(
        redis_url=services.redis_url, redis_prefix=prefix, state_dir=state, delta_uri=runtime.delta_uri
    )
    plan = plan_reset([view], settings, None)
    assert plan.backfills == [mine.parent.resolve()]
    offline = DeltaOfflineStore(runtime.delta_uri)
    tables = [offline.table_uri(view.name, view.version), tiles_uri(offline, view.name, view.version)]
    assert plan.tables == tables  # the accepted events and the tile table both go aside
    assert sessions in plan.namespaces
    done = apply_reset(plan)
    assert any("backfill" in line for line in done)

    left = [k.decode() for k in client.scan_iter(match=f"{prefix}:*")]
    assert left == [f"{prefix}:other:v1:u0"]
    assert not mine.parent.exists() and other.exists()
    assert all(offline.version(uri) is None for uri in tables)
    with_backfills = runtime.model_copy(update={"backfill_dir": str(state / "backfills")})
    assert find_handoff(with_backfills, view) is None
