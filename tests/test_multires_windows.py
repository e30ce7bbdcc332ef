"""Windows from 10 minutes to 90 days in one view, through real Kafka, Bytewax, Redis and Delta:
online == point-in-time (Delta event log) == training set == oracle over ~100 days of events
(several partitions, shuffled arrival, idle and stopped entities, events 20 hours late, 1- and
16-minute tiles, an object aggregation), also after a worker is killed (SIGKILL) mid-stream and
after Redis loses every key; each tile level's Redis log per entity stays bounded however long
the stream, and a view of short windows keeps a single level."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis
from confluent_kafka import Producer

from connectors.delta_store import DeltaOfflineStore
from connectors.redis_store import RedisOnlineStore
from engine.dataflow import RuntimeConfig
from engine.definitions import FeatureView
from engine.reads import point_in_time_values
from engine.tiles import TileLayout
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.multires_helpers import (
    COARSE_TILE_WINDOWS,
    COLUMN_FUNCTIONS,
    DAY,
    FINE_WINDOWS,
    HOUR,
    MEM_WINDOWS,
    MIN,
    WINDOWS,
    Entities,
    accepted_frame,
    close,
    coarse_edges,
    distinct_view,
    expected,
    heavy_events,
    live_bound,
    make_events,
    make_view,
    read_times,
    view_of,
    window_aggregations,
    window_of,
)
from tests.support import create_topic, make_runtime, read_topic, run_views, unique, worker_env


def send(kafka: str, topic: str, pairs: list[tuple[int, dict[str, Any]]]) -> None:
    """Publish ``(partition, event)`` pairs in order, keyed by entity."""
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "acks": "all"})
    for i, (partition, e) in enumerate(pairs):
        p.produce(topic, key=e["user_id"].encode(), value=json.dumps(e).encode(), partition=partition)
        if i % 5_000 == 0:
            p.poll(0)
    assert p.flush(30) == 0


def _ms(t: int) -> datetime:
    return datetime.fromtimestamp(t / 1000, UTC)


def _store(view: FeatureView, redis_url: str, delta_uri: str, prefix: str) -> FeatureStore:
    return FeatureStore([view], redis_url=redis_url, delta_uri=delta_uri, redis_prefix=prefix)


def compare_online(store: FeatureStore, view: FeatureView, ent: Entities) -> int:
    """Online values as of times at or after each entity's newest event (the newest of all, half
    an hour, hour and day boundaries, a day and a month later; each entity's own newest event and
    an hour after) against the oracle; returns how many values were compared."""
    users = ent.users()
    newest = max(ent.newest(u) for u in users)
    hour, day = (newest // HOUR + 1) * HOUR, (newest // DAY + 1) * DAY
    reads = [(t, users) for t in (newest, newest + 30 * MIN, hour - 1, hour, day - 1, day)]
    reads += [(t, users) for t in (newest + DAY, newest + 31 * DAY, newest + 61 * DAY)]
    reads += [(ent.newest(u) + d, [u]) for u in users for d in (0, HOUR)]
    bad: list[Any] = []
    n = 0
    for a in view.aggregations[:: len(COLUMN_FUNCTIONS) + 1]:  # one feature alone, each window
        got = store.get_online_features([f"{view.name}:{a.feature_name}"], users, as_of=_ms(newest + DAY))
        for u, value in zip(users, got.values[f"{view.name}:{a.feature_name}"], strict=True):
            want = expected(ent, view, u, newest + DAY)[a.feature_name]
            n += 1
            if not close(value, want, a.function):
                bad.append(("online alone", a.feature_name, u, value, want))
    for t, who in reads:
        got = store.get_online_features([view.name], who, as_of=_ms(t)).values
        for i, u in enumerate(who):
            want = expected(ent, view, u, t)
            for a in view.aggregations:
                value = got[f"{view.name}:{a.feature_name}"][i]
                n += 1
                if not close(value, want[a.feature_name], a.function):
                    bad.append(("online", a.feature_name, u, _ms(t).isoformat(), value, want[a.feature_name]))
    assert not bad, (len(bad), bad[:12])
    return n


def compare_offline(view: FeatureView, events_log: Any, ent: Entities, seed: int) -> int:
    """Point-in-time values from the Delta event log (as training sets read it) against the
    oracle; returns how many values were compared."""
    rng = np.random.default_rng(seed)
    users: list[str] = []
    times: list[int] = []
    edges = coarse_edges(view)
    for u in ent.users():
        mine = read_times(ent, u, rng, edges)
        users += [u] * len(mine)
        times += mine
    found = point_in_time_values(
        view, events_log, users, np.asarray(times, np.int64), list(view.aggregations)
    )
    bad: list[Any] = []
    n = 0
    for i, (u, t) in enumerate(zip(users, times, strict=True)):
        want = expected(ent, view, u, t)
        for a in view.aggregations:
            value = found[a.feature_name][0][i]
            value = None if value is None else float(value)
            n += 1
            if not close(value, want[a.feature_name], a.function):
                bad.append(("offline", a.feature_name, u, _ms(t).isoformat(), value, want[a.feature_name]))
    assert not bad, (len(bad), bad[:12])
    return n


@dataclass(frozen=True)
class Run:
    runtime: RuntimeConfig
    view: FeatureView
    mem: FeatureView
    coarse: FeatureView
    late: FeatureView
    fine: FeatureView
    events: pd.DataFrame
    heavy: pd.DataFrame
    lagging: pd.DataFrame

    def busy(self) -> list[tuple[FeatureView, pd.DataFrame]]:
        """Each view with the events of its topic."""
        return [
            (self.view, self.events),
            (self.mem, self.heavy),
            (self.coarse, self.heavy),
            (self.late, self.lagging),
            (self.fine, self.events),
        ]


@pytest.fixture(scope="module")
def run(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One dataflow over three topics: ~100 days of ~30 entities on 4 partitions (the view with
    windows from 10m to 90d); 400 days of a busy entity on 2 (the view of the memory bound, and
    one of 16-minute tiles); ~100 days of 6 entities arriving up to 20 hours out of order (a view
    with 1 day of allowed lateness: late events land in tiles of every level); and a view of the
    first topic with short windows only (one level, as before coarse levels existed)."""
    main = create_topic(services.kafka, unique("multires"), 4)
    busy = create_topic(services.kafka, unique("multires-busy"), 2)
    late_topic = create_topic(services.kafka, unique("multires-late"), 2)
    view = make_view(main)
    mem = view_of("multires_mem", busy, window_aggregations(MEM_WINDOWS))
    coarse = view_of("multires_coarse", busy, window_aggregations(COARSE_TILE_WINDOWS), tile_size="16m")
    late = view_of("multires_late", late_topic, window_aggregations(WINDOWS), lateness=DAY)
    fine = view_of("multires_fine", main, window_aggregations(FINE_WINDOWS))
    send(services.kafka, main, make_events(11))
    send(services.kafka, busy, heavy_events(12))
    send(services.kafka, late_topic, make_events(13, entities=6, partitions=2, disorder=20 * HOUR))
    runtime = make_runtime(services.kafka, services.redis_url, tmp_path_factory.mktemp("multires"), "mr")
    run_views([view, mem, coarse, late, fine], runtime)
    for t in (main, busy, late_topic):  # every shuffled event within lateness
        assert not read_topic(services.kafka, f"{t}.dlq")
    events = accepted_frame(read_topic(services.kafka, main))
    heavy = accepted_frame(read_topic(services.kafka, busy))
    lagging = accepted_frame(read_topic(services.kafka, late_topic))
    return Run(runtime, view, mem, coarse, late, fine, events, heavy, lagging)


def test_levels_and_inputs(run: Run) -> None:
    """The views keep the levels the rule gives, and the inputs are as hostile as intended."""
    assert run.view.tile_levels_ms == run.mem.tile_levels_ms == run.late.tile_levels_ms == (MIN, HOUR, DAY)
    assert run.coarse.tile_levels_ms == (16 * MIN, DAY)
    assert run.fine.tile_levels_ms == (MIN,)
    assert sorted(run.events["partition"].unique().tolist()) == [0, 1, 2, 3]
    spread = run.events.groupby("user_id")["partition"].nunique()
    assert spread["u00"] > 1 and spread["u01"] > 1  # an entity's events on several partitions
    for frame, behind in ((run.events, 2 * MIN), (run.lagging, 12 * HOUR)):
        lag = 0
        for _, g in frame.sort_values("offset").groupby("partition"):
            lag = max(lag, int((g["ts"].cummax() - g["ts"]).max()))
        assert lag > behind  # events arrive that far behind their partition's newest


def test_online_equals_oracle_after_100_days(run: Run) -> None:
    rt = run.runtime
    for view, frame in run.busy():
        store = _store(view, rt.redis_url, rt.delta_uri, rt.redis_prefix)
        assert compare_online(store, view, Entities(frame)) > 250 * len(frame.user_id.unique())


def test_point_in_time_equals_oracle(run: Run) -> None:
    offline = DeltaOfflineStore(run.runtime.delta_uri)
    for seed, (view, frame) in enumerate(run.busy()):
        log = offline.read(offline.table_uri(view.name, view.version))
        assert log.num_rows == len(frame)
        assert compare_offline(view, log, Entities(frame), seed) > 2_000


def test_training_set_equals_oracle(run: Run) -> None:
    rt = run.runtime
    store = _store(run.view, rt.redis_url, rt.delta_uri, rt.redis_prefix)
    ent = Entities(run.events)
    rng = np.random.default_rng(8)
    users: list[str] = []
    times: list[int] = []
    for u in ent.users():
        mine = read_times(ent, u, rng, coarse_edges(run.view), k=2)
        users += [u] * len(mine)
        times += mine
    stamps = pd.to_datetime(np.asarray(times, np.int64), unit="ms", utc=True)
    df = store.get_training_set(pd.DataFrame({"user_id": users, "event_timestamp": stamps}), [run.view.name])
    df = df.to_pandas()
    bad = []
    for i, (u, t) in enumerate(zip(users, times, strict=True)):
        want = expected(ent, run.view, u, t)
        for a in run.view.aggregations:
            value = df[f"{run.view.name}:{a.feature_name}"].iloc[i]
            value = None if pd.isna(value) else float(value)
            if not close(value, want[a.feature_name], a.function):
                bad.append((a.feature_name, u, _ms(t).isoformat(), value, want[a.feature_name]))
    assert not bad, (len(bad), bad[:12])


def _level_key(prefix: str, view: FeatureView, level: int, entity: str) -> str:
    from engine.levels import level_namespace

    ns = RedisOnlineStore.namespace_of(prefix, view.name, view.version)
    return (ns if level == view.tile_levels_ms[0] else level_namespace(ns, level)) + entity


def test_view_of_short_windows_keeps_no_coarse_keys(run: Run, redis_client: redis.Redis) -> None:
    prefix = run.runtime.redis_prefix
    assert redis_client.exists(_level_key(prefix, run.fine, MIN, "u02"))
    for level in (HOUR, DAY):
        coarse = _level_key(prefix, run.fine, level, "*")
        assert not list(redis_client.scan_iter(match=coarse, count=1_000)), coarse


def test_redis_tile_logs_stay_bounded_per_level(run: Run, redis_client: redis.Redis) -> None:
    """Each level's packed row log per entity holds at most twice its live-tile bound plus 16
    rows, though the busy entity's 400 days of events touch many more tiles at every level."""
    prefix = run.runtime.redis_prefix
    for view, frame in run.busy():
        windows = [window_of(a) for a in view.aggregations]
        row_bytes = 8 * TileLayout.of(view).width
        for level in view.tile_levels_ms:
            lateness = round(view.allowed_lateness.total_seconds() * 1000)
            limit = 2 * live_bound(windows, view.tile_levels_ms, level, lateness) + 16
            for u, g in frame.groupby("user_id"):
                blob = redis_client.get(_level_key(prefix, view, level, str(u))) or b""
                assert len(blob) % row_bytes == 0, (view.name, level, u, len(blob))
                rows = len(blob) // row_bytes
                assert rows <= limit, (view.name, level, u, rows, limit)
                if view is run.mem and u == "h0":
                    touched = g["ts"].floordiv(level).nunique()
                    assert touched > limit, (level, touched, limit)  # the bound is a real one
                    assert rows > 0, (level, "no tiles under this level's namespace")


def test_count_distinct_over_long_windows(services: Services, topic, runtime: RuntimeConfig) -> None:
    """An object aggregation (count_distinct of a text column) over 1h to 90d windows."""
    name = topic(partitions=2)
    view = distinct_view(name)
    assert view.tile_levels_ms == (MIN, HOUR, DAY)
    send(services.kafka, name, make_events(21, entities=8, per_entity=(40, 90), partitions=2, spread=(0,)))
    run_views([view], runtime)
    assert not read_topic(services.kafka, f"{name}.dlq")
    frame = accepted_frame(read_topic(services.kafka, name))
    ent = Entities(frame)
    store = _store(view, runtime.redis_url, runtime.delta_uri, runtime.redis_prefix)
    assert compare_online(store, view, ent) > 400
    offline = DeltaOfflineStore(runtime.delta_uri)
    log = offline.read(offline.table_uri(view.name, view.version))
    assert compare_offline(view, log, ent, 5) > 1_000


_PIPELINE = """
from tests.multires_helpers import make_view

views = [make_view({topic!r})]


def __getattr__(name):
    if name == "flow":
        from featurestream.runtime import dataflow
        return dataflow(*views)
    raise AttributeError(name)
"""


def _worker(pipeline: Path, recovery: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bytewax.run", f"{pipeline}:flow", "-r", str(recovery), "-s", "1", "-b", "0"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_worker_resumes_and_rebuilds_a_lost_store(services: Services, topic, tmp_path: Path) -> None:
    name = topic(partitions=4)
    pipeline = tmp_path / "multires.py"
    pipeline.write_text(_PIPELINE.format(topic=name))
    view = load_views(pipeline)[0]
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    prefix = unique("mrk")
    env = {**worker_env(services.kafka, services.redis_url, tmp_path, prefix), "PYTHONPATH": str(Path.cwd())}
    offline = DeltaOfflineStore(str(tmp_path / "delta"))
    uri = offline.table_uri(view.name, view.version)
    pairs = make_events(31, entities=12)
    waves = np.array_split(np.arange(len(pairs)), 3)

    send(services.kafka, name, [pairs[i] for i in waves[0]])
    worker = _worker(pipeline, recovery, env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            table = offline.read(uri)
            if table is not None and table.num_rows > 0:
                break
            time.sleep(0.2)
        send(services.kafka, name, [pairs[i] for i in waves[1]])
        time.sleep(1.5)  # at least one more snapshot, likely mid-way through the second wave
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    assert worker.returncode == -signal.SIGKILL

    send(services.kafka, name, [pairs[i] for i in waves[2]])
    resumed = _worker(pipeline, recovery, {**env, "FEATURESTREAM_BOUNDED": "true"})
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-4000:]
    assert not read_topic(services.kafka, f"{name}.dlq")

    stored = offline.read(uri)
    kept = list(
        zip(stored.column("_partition").to_pylist(), stored.column("_offset").to_pylist(), strict=True)
    )
    assert len(kept) == len(set(kept)) == len(pairs)
    ent = Entities(accepted_frame(read_topic(services.kafka, name)))
    store = _store(view, services.redis_url, str(tmp_path / "delta"), prefix)
    assert compare_online(store, view, ent) > 5_000
    assert compare_offline(view, stored, ent, 6) > 5_000

    # Then Redis loses every key of the prefix (every level, guards, epoch); the worker resumes
    # with one new event for two entities only: every entity's every level must be rebuilt.
    client = redis.Redis.from_url(services.redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1_000))
    coarse = [_level_key(prefix, view, level, "") for level in view.tile_levels_ms[1:]]
    assert all(any(k.decode().startswith(c) for k in keys) for c in coarse)  # every level was there
    client.delete(*keys)
    newest = max(ent.newest(u) for u in ent.users())
    extra = [
        (p, {"user_id": u, "ts": newest + MIN, "amount": 1.5, "merchant": "m1"})
        for p, u in ((0, "u00"), (3, "u03"))
    ]
    send(services.kafka, name, extra)
    again = _worker(pipeline, recovery, {**env, "FEATURESTREAM_BOUNDED": "true"})
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-4000:]
    ent = Entities(accepted_frame(read_topic(services.kafka, name)))
    assert compare_online(store, view, ent) > 5_000
