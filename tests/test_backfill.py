"""Backfill: a new view version computed from history equals the streamed one and an oracle,
resumes after kill -9, leaves a live worker alone, and hands over to the worker of its version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from engine.backfill import backfill_dir, backfill_id, parse_position, run_backfill
from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from engine.errors import DefinitionError
from engine.handoff import final_states, step_prefix
from tests.backfill_helpers import (
    accepted,
    make_events,
    mismatches,
    now_ms,
    pay_view,
    pipeline_text,
    produce_spread,
    read_values,
    specs,
    store_of,
    topic_frame,
)
from tests.conftest import Services
from tests.support import worker_env

USERS = [f"u{i}" for i in range(30)]


def _run(views: list, runtime: RuntimeConfig) -> None:
    """A worker run to the end of the topics (bounded), continuing from finished backfills."""
    run_dataflow(build_dataflow(views, runtime.model_copy(update={"stop_at_end": True})))


def _delta_rows(runtime: RuntimeConfig, view) -> int:
    from deltalake import DeltaTable

    return DeltaTable(f"{runtime.delta_uri}/{view.name}__{view.version}").to_pyarrow_table().num_rows


def test_feature_names_match_the_oracle_specs(topic) -> None:
    for extra in (False, True):
        view = pay_view("t", extra)
        assert [a.feature_name for a in view.aggregations] == list(specs(extra))
    assert pay_view("t").version != pay_view("t", True).version


def test_positions_parse_and_bad_ones_name_the_option() -> None:
    assert parse_position("earliest", "--from").kind == "earliest"
    assert parse_position("offset:12", "--from").offset == 12
    assert parse_position("offset:0=5,3=7", "--from").offsets == {0: 5, 3: 7}
    naive = parse_position("2026-01-31T12:00:00", "--from")
    assert naive.time_ms == int(datetime(2026, 1, 31, 12, tzinfo=UTC).timestamp() * 1000)
    assert parse_position("2026-01-31T12:00:00Z", "--to").time_ms == naive.time_ms
    for bad in ("yesterday", "offset:-1", "offset:x=1"):
        with pytest.raises(DefinitionError, match="--from"):
            parse_position(bad, "--from")


def test_new_version_backfilled_equals_streamed_and_oracle_then_worker_continues(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    t_name = topic(partitions=4)
    runtime = runtime.model_copy(update={"backfill_dir": str(tmp_path / "backfills")})
    a, b = pay_view(t_name), pay_view(t_name, extra=True)
    produce_spread(services.kafka, t_name, make_events(3_000, len(USERS), seed=1))
    _run([a], runtime)  # the live version, streamed
    with pytest.raises(DefinitionError, match="already computed"):  # served: its state would mix
        run_backfill(a, runtime, tmp_path / "backfills", parse_position("earliest", "--from"))

    result = run_backfill(b, runtime, tmp_path / "backfills", parse_position("earliest", "--from"))
    assert result.plan.total == 3_000 and not result.already_done
    frame = topic_frame(services.kafka, t_name)
    events = accepted(frame)
    assert 0 < len(events) < 3_000  # some events are late: the oracle drops them per partition
    assert frame.groupby("user_id")["partition"].nunique().min() > 1  # users spread over partitions
    t = now_ms()
    va = read_values(store_of(a, runtime), a, USERS, t)
    vb = read_values(store_of(b, runtime), b, USERS, t)
    assert mismatches(va, events, False, USERS, t) == []
    assert mismatches(vb, events, True, USERS, t) == []
    for name in specs(False):  # where the versions overlap, the backfill equals the stream exactly
        assert vb.online[name] == va.online[name] and vb.offline[name] == va.offline[name], name

    # A rerun of the finished backfill changes nothing.
    again = run_backfill(b, runtime, tmp_path / "backfills", parse_position("earliest", "--from"))
    assert again.already_done and again.directory == result.directory

    # The worker now serves both versions; B continues from the backfill's end.
    produce_spread(services.kafka, t_name, make_events(1_500, len(USERS), seed=2))
    _run([a, b], runtime)
    events = accepted(topic_frame(services.kafka, t_name))
    t = now_ms()
    assert mismatches(read_values(store_of(a, runtime), a, USERS, t), events, False, USERS, t) == []
    assert mismatches(read_values(store_of(b, runtime), b, USERS, t), events, True, USERS, t) == []
    assert _delta_rows(runtime, b) == len(events)  # offline: every accepted event once


def _start_offsets(frame, when_ms: int) -> dict[int, int]:
    """Per partition, the first offset whose Kafka timestamp is at or after ``when_ms``."""
    out = {}
    for p, g in frame.groupby("partition"):
        later = g[g["kts"] >= when_ms]
        out[int(p)] = int(later["offset"].min()) if len(later) else int(g["offset"].max()) + 1
    return out


def test_from_mid_history_sees_only_events_from_there_and_worker_continues(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    t_name = topic(partitions=4)
    runtime = runtime.model_copy(update={"backfill_dir": str(tmp_path / "backfills")})
    b = pay_view(t_name, extra=True)
    produce_spread(services.kafka, t_name, make_events(1_500, len(USERS), seed=3))
    time.sleep(1.5)
    middle = now_ms()
    time.sleep(1.5)
    produce_spread(services.kafka, t_name, make_events(1_500, len(USERS), seed=4))

    iso = datetime.fromtimestamp(middle / 1000, UTC).isoformat()
    result = run_backfill(b, runtime, tmp_path / "backfills", parse_position(iso, "--from"))
    frame = topic_frame(services.kafka, t_name)
    start = _start_offsets(frame, middle)
    assert {p: s for p, (s, _) in result.plan.ranges.items()} == start
    t = now_ms()
    from_middle, everything = accepted(frame, start), accepted(frame)
    values = read_values(store_of(b, runtime), b, USERS, t)
    assert mismatches(values, from_middle, True, USERS, t) == []
    assert mismatches(values, everything, True, USERS, t) != []  # the first half would show

    # The worker of B continues from the backfill's end, never reading the first half.
    produce_spread(services.kafka, t_name, make_events(1_000, len(USERS), seed=5))
    _run([b], runtime)
    frame = topic_frame(services.kafka, t_name)
    t = now_ms()
    events = accepted(frame, start)
    assert mismatches(read_values(store_of(b, runtime), b, USERS, t), events, True, USERS, t) == []
    assert _delta_rows(runtime, b) == len(events)


def test_to_bounds_the_backfill_exclusively(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    t_name = topic(partitions=2)
    b = pay_view(t_name, extra=True)
    produce_spread(services.kafka, t_name, make_events(800, len(USERS), seed=6))
    result = run_backfill(
        b,
        runtime,
        tmp_path / "bf",
        parse_position("offset:100", "--from"),
        parse_position("offset:0=300", "--to"),
    )
    frame = topic_frame(services.kafka, t_name)
    ends = frame.groupby("partition")["offset"].max() + 1
    assert result.plan.ranges == {0: (100, 300), 1: (100, int(ends[1]))}
    rows = frame[(frame["offset"] >= 100) & ((frame["partition"] == 1) | (frame["offset"] < 300))]
    events = accepted(rows)
    t = now_ms()
    assert mismatches(read_values(store_of(b, runtime), b, USERS, t), events, True, USERS, t) == []
    assert _delta_rows(runtime, b) == len(events)


def _cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "featurestream.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_backfill_killed_mid_way_resumes_exactly(services: Services, topic, tmp_path: Path) -> None:
    t_name = topic(partitions=4)
    pipeline = tmp_path / "pay_b.py"
    pipeline.write_text(pipeline_text(t_name, extra=True))
    b = pay_view(t_name, extra=True)
    env = worker_env(services.kafka, services.redis_url, tmp_path, f"kill-{t_name}")
    produce_spread(services.kafka, t_name, make_events(8_000, len(USERS), seed=7))
    args = ["backfill", str(pipeline), "pay", "--from", "earliest", "--snapshot-seconds", "0.2"]
    directory = backfill_dir(
        tmp_path / "state" / "backfills", b, backfill_id(parse_position("earliest", "x"), None)
    )

    proc = _cli([*args, "--batch-size", "50"], env)  # small batches: killed part-way, not at the end
    deadline = time.monotonic() + 120
    consumed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            states = final_states(directory / "recovery", step_prefix(b))
        except Exception:  # the database is being created
            states = {}
        consumed = sum(s["offset"] for (step, _), s in states.items() if step.endswith("_source"))
        if consumed > 2_000:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2_000 < consumed < 8_000

    resumed = _cli([*args, "--batch-size", "2000"], env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "complete" in out
    runtime = RuntimeConfig(
        kafka_bootstrap_servers=services.kafka,
        redis_url=services.redis_url,
        delta_uri=env["FEATURESTREAM_DELTA_URI"],
        redis_prefix=env["FEATURESTREAM_REDIS_PREFIX"],
    )
    events = accepted(topic_frame(services.kafka, t_name))
    t = now_ms()
    assert mismatches(read_values(store_of(b, runtime), b, USERS, t), events, True, USERS, t) == []
    assert _delta_rows(runtime, b) == len(events)


def test_backfill_beside_a_live_worker_of_another_version(services: Services, topic, tmp_path: Path) -> None:
    t_name = topic(partitions=4)
    (tmp_path / "pay_a.py").write_text(pipeline_text(t_name))
    a, b = pay_view(t_name), pay_view(t_name, extra=True)
    env = worker_env(services.kafka, services.redis_url, tmp_path, f"live-{t_name}")
    runtime = RuntimeConfig(
        kafka_bootstrap_servers=services.kafka,
        redis_url=services.redis_url,
        delta_uri=env["FEATURESTREAM_DELTA_URI"],
        redis_prefix=env["FEATURESTREAM_REDIS_PREFIX"],
        batch_size=200,
    )
    produce_spread(services.kafka, t_name, make_events(2_000, len(USERS), seed=8))
    worker = _cli(["run", str(tmp_path / "pay_a.py")], env)
    try:
        result = run_backfill(b, runtime, tmp_path / "bf", parse_position("earliest", "--from"))
        produce_spread(services.kafka, t_name, make_events(1_000, len(USERS), seed=9))
        frame = topic_frame(services.kafka, t_name)
        everything = accepted(frame)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the live worker keeps up with the whole topic
            t = now_ms()
            if not mismatches(read_values(store_of(a, runtime), a, USERS, t), everything, False, USERS, t):
                break
            time.sleep(0.5)
        assert worker.poll() is None
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    t = now_ms()
    assert mismatches(read_values(store_of(a, runtime), a, USERS, t), everything, False, USERS, t) == []
    # B holds exactly the backfill's range (the topic as of its start), in its own namespaces.
    first_half = frame[
        frame["offset"] < frame["partition"].map({p: e for p, (_, e) in result.plan.ranges.items()})
    ]
    assert len(first_half) == 2_000
    assert (
        mismatches(read_values(store_of(b, runtime), b, USERS, t), accepted(first_half), True, USERS, t) == []
    )
    # No offsets were committed for the backfill's group (nor the workers' own).
    for group in (f"featurestream-backfill-{result.plan.backfill_id}", f"featurestream-{t_name}"):
        c = Consumer({"bootstrap.servers": services.kafka, "group.id": group})
        try:
            committed = c.committed([TopicPartition(t_name, p) for p in range(4)], timeout=10)
        finally:
            c.close()
        assert all(tp.offset < 0 for tp in committed), group
