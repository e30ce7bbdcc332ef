"""A new user's first hour with the CLI, at 80 columns: every command prints what a person needs
(exact values, tables that fit) and every mistake is one or two lines naming the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from engine.decode import EventDecoder, Reason
from featurestream.client import FeatureStore
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.support import create_topic, produce, unique, worker_env

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "featurestream.cli"]

PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="payments", topic="{topic}", timestamp_field="ts", timestamp_format="epoch_millis",
    fields=(Field(name="user_id", dtype="str"), Field(name="amount", dtype="float")),
)
spend = FeatureView(
    name="spend", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=(
        Aggregation(function="count", window="1d"),
        Aggregation(function="sum", column="amount", window="1d"),
        {extra}
    ),
    tile_size="1m", allowed_lateness="1h", owner="risk@example.com",
    description="Spend per user over the last day, for fraud scoring and limits.",
)
views = [spend]


def __getattr__(name):
    if name == "flow":
        from featurestream.runtime import dataflow
        return dataflow(*views)
    raise AttributeError(name)
"""
MAX = 'Aggregation(function="max", column="amount", window="1d"),'


def _pipeline(path: Path, topic: str, extra: str = "") -> Path:
    path.write_text(PIPELINE.format(topic=topic, extra=extra))
    return path


def fs(*args: str, env: dict[str, str], cwd: Path, code: int | None = 0) -> str:
    """Run the CLI as a user would (80 columns); stdout and stderr together."""
    run = subprocess.run(
        [*CLI, *args], env={**env, "COLUMNS": "80"}, cwd=cwd, capture_output=True, text=True, timeout=180
    )
    out = run.stdout + run.stderr
    if code is not None:
        assert run.returncode == code, f"exit {run.returncode}:\n{out}"
    if "--debug" not in args:
        assert "Traceback" not in out, out
    return out


def _fits(out: str) -> None:
    """Tables fit 80 columns and no cell is cut short."""
    for line in out.splitlines():
        if line[:1] in "┏┃┡│└" or line.startswith(("┏", "┃", "│", "└")):
            assert len(line) <= 80, line
            assert "…" not in line, line


class World:
    """One topic with known events, computed once by `featurestream run --bounded`."""

    def __init__(self, services: Services, tmp: Path) -> None:
        self.services = services
        self.tmp = tmp
        self.topic = create_topic(services.kafka, unique("payments"), 2)
        self.prefix = unique("newuser")
        self.pipeline = _pipeline(tmp / "spend.py", self.topic)
        now = int(time.time() * 1000) - 120_000
        self.events: list[Any] = [
            {"user_id": "u1", "amount": 27_000.0, "ts": now},
            {"user_id": "u1", "amount": 289.10, "ts": now + 1},
            {"user_id": "u2", "amount": 1_752.15, "ts": now + 2},
            {"user_id": "u3", "amount": 0.5, "ts": now + 3},
            b"{not json",
            {"user_id": "u4", "amount": 1.0, "ts": now // 1000},  # epoch seconds, not millis
            {"user_id": "", "amount": 1.0, "ts": now + 4},  # empty entity id
        ]
        produce(services.kafka, self.topic, self.events, key_field="user_id")
        self.run_output = fs("run", str(self.pipeline), "--bounded", env=self.env(), cwd=tmp)

    def env(self, state: str = "state", **extra: str) -> dict[str, str]:
        env = worker_env(self.services.kafka, self.services.redis_url, self.tmp, self.prefix)
        env["FEATURESTREAM_STATE_DIR"] = str(self.tmp / state)
        env.pop("FEATURESTREAM_CONFIG", None)
        env.pop("FEATURESTREAM_DEBUG", None)
        return {**env, **extra}


@pytest.fixture(scope="module")
def world(services: Services, tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(services, tmp_path_factory.mktemp("newuser"))


# 1. training sets take ordinary timestamps -------------------------------------------------


def test_training_set_takes_microsecond_timestamps(world: World) -> None:
    store = FeatureStore(
        load_views(world.pipeline),
        redis_url=world.services.redis_url,
        delta_uri=str(world.tmp / "delta"),
        redis_prefix=world.prefix,
    )
    now = pd.Timestamp.now(tz="UTC")
    assert now.microsecond or now.nanosecond or True  # any precision
    df = pd.DataFrame({"user_id": ["u1", "u2"], "event_timestamp": [now, now]})
    got = store.get_training_set(df, ["spend:amount_sum_1d"]).column("spend:amount_sum_1d").to_pylist()
    assert got == pytest.approx([27_289.10, 1_752.15])
    table = pa.table(
        {"user_id": ["u1"], "event_timestamp": pa.array([datetime.now(UTC)], pa.timestamp("us", "UTC"))}
    )
    assert store.get_training_set(table, ["spend:amount_sum_1d"]).column(2).to_pylist() == pytest.approx(
        [27_289.10]
    )


# 2. one way to a store bound to the CLI's services; reads start nothing --------------------


def test_connect_reads_what_the_cli_reads(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import featurestream

    for key, value in world.env().items():
        if key.startswith("FEATURESTREAM_"):
            monkeypatch.setenv(key, value)
    store = featurestream.connect(world.pipeline)
    assert store.get_online_features(["spend:amount_sum_1d"], ["u1"]).values == {
        "spend:amount_sum_1d": [27_289.10]
    }


def test_reads_without_redis_name_the_command_and_start_nothing(world: World, tmp_path: Path) -> None:
    env = world.env(state=str(tmp_path / "empty"))
    del env["FEATURESTREAM_REDIS_URL"]
    out = fs("online", str(world.pipeline), "u1", env=env, cwd=tmp_path, code=2)
    assert out == (
        f"error: no embedded Redis is running for state dir {tmp_path / 'empty'}; start one with "
        "`featurestream services up` (then `featurestream run PIPELINE.py` to fill it), or set "
        "FEATURESTREAM_REDIS_URL to yours\n"
    )
    status = fs("services", "status", env=env, cwd=tmp_path)
    assert "redis: not running" in status


# 3. and 5. online: registered versions, exact values ---------------------------------------


def test_online_prints_exact_values_at_80_columns(world: World) -> None:
    out = fs("online", str(world.pipeline), "u1", "u2", "nobody", env=world.env(), cwd=world.tmp)
    _fits(out)
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in out.splitlines()
        if line.startswith("│")
    }
    assert rows == {
        "spend:events_count_1d": ["2", "1", "0"],
        "spend:amount_sum_1d": ["27,289.10", "1,752.15", "0"],
    }


def test_online_reads_a_registered_version(world: World) -> None:
    env = world.env(state="state-versions")
    out = fs(
        "online", str(world.pipeline), "u1", "-f", "spend@1:amount_sum_1d", env=env, cwd=world.tmp, code=2
    )
    assert out == (
        "error: 'spend@1' names a registered version, but no registry is open: record versions with "
        "`featurestream apply PIPELINE.py`; in Python, build the store with featurestream.connect(...)\n"
    )
    fs("apply", str(world.pipeline), env=env, cwd=world.tmp)
    out = fs("online", str(world.pipeline), "u1", "-f", "spend@1:amount_sum_1d", env=env, cwd=world.tmp)
    assert re.search(r"│ spend@1:amount_sum_1d\s+│\s+27,289.10 │", out), out


# 4. retire is honoured by run and online ---------------------------------------------------


def test_retired_version_is_neither_computed_nor_served(world: World) -> None:
    env = world.env(state="state-retire")
    v1 = load_views(world.pipeline)[0].version
    newer = _pipeline(world.tmp / "spend_v2.py", world.topic, MAX)
    v2 = load_views(newer)[0].version
    fs("apply", str(world.pipeline), env=env, cwd=world.tmp)
    fs("apply", str(newer), env=env, cwd=world.tmp)
    assert fs("retire", "spend", "1", env=env, cwd=world.tmp) == "retired spend@1\n"
    out = fs("run", str(world.pipeline), "--bounded", env=env, cwd=world.tmp)
    assert f"running spend ({v2}) with 1 process(es)" in out
    assert v1 not in out
    out = fs("online", str(world.pipeline), "u1", env=env, cwd=world.tmp, code=2)
    assert out == "error: spend as defined here is spend@1, which is retired; read spend@2 instead\n"
    out = fs("online", str(newer), "u1", "-f", "spend@1:amount_sum_1d", env=env, cwd=world.tmp, code=2)
    assert out == "error: spend@1 is retired and no longer served; read spend instead\n"


# 6. registry tables fit ---------------------------------------------------------------------


@pytest.mark.parametrize("columns", ["80", "120"])
def test_apply_and_versions_fit_the_terminal(world: World, columns: str) -> None:
    env = {**world.env(state=f"state-tables-{columns}"), "COLUMNS": columns}
    run = subprocess.run(
        [*CLI, "apply", str(world.pipeline)], env=env, cwd=world.tmp, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "first version" in run.stdout
    run = subprocess.run([*CLI, "versions"], env=env, cwd=world.tmp, capture_output=True, text=True)
    out = run.stdout
    assert all(len(line) <= int(columns) and "…" not in line for line in out.splitlines()), out
    text = " ".join(c.strip() for line in out.splitlines() for c in line.split("│")[4:5])
    for word in ("Spend", "fraud", "scoring", "limits."):
        assert word in text.split(), out  # words stay whole
    assert "spend@1" in out and "active" in out and load_views(world.pipeline)[0].version in out


# 7. bad settings: one line naming the variable or file key and the fix ----------------------


def test_bad_settings_are_one_line(world: World, tmp_path: Path) -> None:
    pipe = str(world.pipeline)
    env = world.env()
    out = fs(
        "online", pipe, "u1", env={**env, "FEATURESTREAM_REDIS_URL": "localhost:6379"}, cwd=tmp_path, code=2
    )
    assert out == (
        "error: FEATURESTREAM_REDIS_URL = 'localhost:6379': not a Redis URL; write redis://host:port/db, "
        "e.g. redis://localhost:6379/0 (rediss:// for TLS, unix:///path.sock)\n"
    )
    out = fs("services", "status", env={**env, "FEATURESTREAM_METRICS_PORT": "abc"}, cwd=tmp_path, code=2)
    assert out == (
        "error: FEATURESTREAM_METRICS_PORT = 'abc': not a whole number; set a whole number, e.g. 9464\n"
    )
    bad_kafka = {**env, "FEATURESTREAM_KAFKA_CONFIG": '{"sasl.password": ["hunter22"]}'}
    out = fs("services", "status", env=bad_kafka, cwd=tmp_path, code=2)
    assert out == (
        "error: FEATURESTREAM_KAFKA_CONFIG: not a JSON object of settings; write e.g. "
        '{"security.protocol": "SSL"} (values are strings, numbers or booleans)\n'
    )
    del env["FEATURESTREAM_REDIS_URL"]
    (tmp_path / "featurestream.toml").write_text('redis_urll = "redis://localhost:6379/0"\n')
    out = fs("run", pipe, "--bounded", env=env, cwd=tmp_path, code=2)
    assert out == "error: featurestream.toml: unknown setting 'redis_urll'; did you mean 'redis_url'?\n"
    (tmp_path / "featurestream.toml").write_text('redis_url = "localhost:6379"\n')
    out = fs("online", pipe, "u1", env=env, cwd=tmp_path, code=2)
    assert out.startswith("error: featurestream.toml: redis_url = 'localhost:6379': not a Redis URL;"), out
    out = fs("--debug", "online", pipe, "u1", env=env, cwd=tmp_path, code=1)
    assert "Traceback" in out and "ConfigError" in out


def test_an_unexpected_error_is_one_line_with_the_debug_hint(world: World, tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    out = fs("online", str(broken), "u1", env=world.env(), cwd=tmp_path, code=1)
    assert out == "(run `featurestream --debug ...` for the traceback)\nerror: RuntimeError: boom\n"


# 8. services status --------------------------------------------------------------------------


def test_services_status_says_what_runs(world: World, tmp_path: Path) -> None:
    env = world.env(state=str(tmp_path / "s"))
    out = fs("services", "status", env=env, cwd=tmp_path)
    assert out == (
        f"kafka: configured, FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS={world.services.kafka} "
        "(`featurestream doctor` checks it)\n"
        f"redis: configured, FEATURESTREAM_REDIS_URL={world.services.redis_url} "
        "(`featurestream doctor` checks it)\n"
    )
    del env["FEATURESTREAM_REDIS_URL"], env["FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS"]
    out = fs("services", "status", env=env, cwd=tmp_path)
    assert out == (
        f"kafka: not running (embedded, state dir {tmp_path / 's'})\n"
        f"redis: not running (embedded, state dir {tmp_path / 's'})\n"
        "start the embedded services with `featurestream services up`\n"
    )


# 9. drift: a command captures the baseline ---------------------------------------------------


def test_baseline_then_drift(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import featurestream

    env = world.env(state="state-drift")
    pipe = str(world.pipeline)
    fs("apply", pipe, env=env, cwd=world.tmp)
    out = fs("drift", "spend", "--pipeline", pipe, env=env, cwd=world.tmp, code=2)
    version = load_views(world.pipeline)[0].version
    assert out == (
        f"error: no drift baseline for 'spend' version {version}; capture one from a recorded training "
        "set: `featurestream baseline spend --pipeline PIPELINE.py --training-set ID`\n"
    )
    for key, value in env.items():
        if key.startswith("FEATURESTREAM_"):
            monkeypatch.setenv(key, value)
    store = featurestream.connect(world.pipeline)
    df = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "event_timestamp": pd.Timestamp.now(tz="UTC")})
    ts_id = featurestream.training_set_id(store.get_training_set(df, ["spend"], registry=store.registry))
    assert ts_id is not None
    out = fs("baseline", "spend", "--pipeline", pipe, "--training-set", str(ts_id), env=env, cwd=world.tmp)
    _fits(out)
    assert f"baseline of spend ({version}) from training set #{ts_id}" in out
    assert re.search(r"│ amount_sum_1d\s+│\s+3 │", out), out
    out = fs("drift", "spend", "--pipeline", pipe, "--since", "1d", env=env, cwd=world.tmp)
    _fits(out)
    assert "amount_sum_1d" in out


# 10. a run ends with a summary ----------------------------------------------------------------


def test_bounded_run_prints_a_summary(world: World) -> None:
    pattern = (
        rf"spend \(\w+\): 7 events read from {world.topic} in [\d.]+ s \([\d,]+ events/s\); 4 accepted; "
        rf"3 dead letters \(bad_timestamp 1, invalid_value 1, malformed_json 1\) on {world.topic}\.dlq"
    )
    assert re.search(pattern, world.run_output), world.run_output


def test_bytewax_run_logs_what_runs_and_a_summary(world: World) -> None:
    env = {
        **world.env(state="state-bytewax", FEATURESTREAM_BOUNDED="true"),
        "FEATURESTREAM_REDIS_PREFIX": unique("bw"),
    }
    run = subprocess.run(
        [sys.executable, "-m", "bytewax.run", f"{world.pipeline}:flow"],
        env=env,
        cwd=world.tmp,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    assert re.search(r"INFO featurestream: running spend \(\w+\)", run.stderr), run.stderr
    assert re.search(
        r"INFO featurestream: spend \(\w+\): 7 events read from .* 4 accepted; 3 dead letters", run.stderr
    )


# 11. help is plain text -------------------------------------------------------------------------


def test_help_has_no_markup_or_placeholders(world: World) -> None:
    from typer.main import get_command
    from typer.testing import CliRunner

    from featurestream.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "80"})
    assert "featurestream.toml" in top.output and "``" not in top.output
    group = get_command(app)
    names = [[n] for n in group.commands] + [["services", n] for n in ("up", "down", "status")]
    for name in names:
        out = runner.invoke(app, [*name, "--help"], env={"COLUMNS": "80"}).output
        usage = out.splitlines()[0]
        assert "{" not in usage and "``" not in out, (name, out)
        assert not re.search(r"<(bool|path|str|int|float|list)", out), (name, out)
    run_help = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "80"}).output
    assert "Usage: featurestream run [OPTIONS] PIPELINE" in run_help.replace("root ", "featurestream ")


# 12. install and demo are quiet ---------------------------------------------------------------


def test_license_is_an_spdx_string() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["build-system"]["requires"] == ["setuptools>=77"]


def test_demo_fits_and_ends_quietly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATURESTREAM_")}
    env.update(FEATURESTREAM_STATE_DIR=str(tmp_path / "state"), FEATURESTREAM_METRICS_PORT="0", COLUMNS="80")
    run = subprocess.run(
        [*CLI, "demo", "--events", "2000", "--users", "20"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # no librdkafka lines (the broker the demo stopped: disconnected, connection refused)
    assert "rdkafka" not in run.stderr, run.stderr
    _fits(run.stdout)
    times = re.findall(r"│ user_\d+ │ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC) │", run.stdout)
    assert len(times) == 6, run.stdout


# 13. a missing topic: the message says what creates it, and that works -------------------------


def test_missing_topic_names_the_command_that_creates_it(world: World, tmp_path: Path) -> None:
    topic = unique("missing")
    pipe = _pipeline(tmp_path / "missing.py", topic)
    env = {**world.env(state=str(tmp_path / "state")), "FEATURESTREAM_REDIS_PREFIX": unique("missing")}
    out = fs("run", str(pipe), "--bounded", env=env, cwd=tmp_path, code=2)
    assert out == (
        f"error: source topic '{topic}' of feature view 'spend' does not exist on {world.services.kafka} "
        "(`run` creates only dead-letter topics); create it by publishing to it, e.g. `featurestream "
        "produce PIPELINE.py payments events.jsonl --partitions 4`, or fix the source's topic name\n"
    )
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps({"user_id": "u1", "amount": 2.5, "ts": int(time.time() * 1000)}) + "\n")
    fs("produce", str(pipe), "payments", str(events), "--partitions", "4", env=env, cwd=tmp_path)
    out = fs("run", str(pipe), "--bounded", env=env, cwd=tmp_path)
    assert "1 events read" in out and "1 accepted" in out


# 14. the decoder names unit mistakes and empty keys --------------------------------------------


def test_epoch_seconds_and_empty_ids_are_dead_lettered_with_the_fix(world: World) -> None:
    view = load_views(world.pipeline)[0]
    got = EventDecoder(view).decode(
        [
            json.dumps({"user_id": "u1", "amount": 1.0, "ts": 1_764_000_000}).encode(),
            json.dumps({"user_id": "", "amount": 1.0, "ts": 1_764_000_000_000}).encode(),
            json.dumps({"user_id": "u2", "amount": 1.0, "ts": 1_764_000_000_000}).encode(),
        ]
    )
    assert got.entity == ["u2"]
    assert got.failures == [
        (
            0,
            Reason.TIMESTAMP,
            "ts: 1764000000 looks like epoch seconds (2025-11-24T16:00:00Z), but the source's "
            "timestamp_format is epoch_millis; send milliseconds (seconds x 1000) or set "
            'timestamp_format="epoch_seconds"',
        ),
        (1, Reason.VALUE, "user_id: the entity key is empty; send a non-empty user_id"),
    ]


# doctor ---------------------------------------------------------------------------------------


def test_doctor_checks_every_service(world: World, tmp_path: Path) -> None:
    env = world.env(state=str(tmp_path / "state"))
    out = fs("doctor", env=env, cwd=tmp_path)
    delta = world.tmp / "delta"
    tables = len(list(delta.glob("*/_delta_log")))
    assert out.splitlines() == [
        "settings: from the environment (no settings file)",
        f"ok   broker: {world.services.kafka} (FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS)",
        f"ok   redis: {world.services.redis_url} (FEATURESTREAM_REDIS_URL)",
        f"ok   delta: {delta} ({tables} table(s))",
        f"ok   registry: sqlite:///{tmp_path / 'state' / 'registry.db'} (empty: record views with "
        "`featurestream apply PIPELINE.py`)",
        "all good",
    ]
    env["FEATURESTREAM_REDIS_URL"] = "redis://:hunter22@127.0.0.1:1/0"
    out = fs("doctor", env=env, cwd=tmp_path, code=1)
    assert "hunter22" not in out
    assert "FAIL redis: redis://:***@127.0.0.1:1/0 (FEATURESTREAM_REDIS_URL) did not answer PING" in out
    assert out.splitlines()[-1] == "1 problem(s); fix them and run `featurestream doctor` again"
