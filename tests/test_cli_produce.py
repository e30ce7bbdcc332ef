"""``featurestream produce``: JSONL files and stdin, validated line by line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Services
from tests.support import unique, worker_env
from tests.test_producer import read_messages

CLI = [sys.executable, "-m", "featurestream.cli"]
T0 = 1_700_000_000_000

PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

clicks = EventSource(
    name="clicks", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="value", dtype="float", nullable=True)),
)
views = [FeatureView(
    name="clicks", entity=Entity(name="user", join_keys=("user_id",)), source=clicks,
    aggregations=(Aggregation(function="sum", column="value", window="1d"),),
    tile_size="1m", allowed_lateness="1h",
)]
"""


def _line(i: int, **over: object) -> str:
    return json.dumps({"user_id": f"u{i % 3}", "value": float(i), "ts": T0 + i, **over})


# Line 3 has a string amount, line 5 is blank, line 7 is not JSON; the last line has no newline.
LINES = [
    _line(1),
    _line(2),
    _line(3, value="12.5"),
    _line(4),
    "",
    _line(6),
    '{"user_id": "u1", "value": ',
    _line(8, value=None),
]


def _run(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)


def _setup(
    services: Services, tmp_path: Path, topic: Callable[..., str]
) -> tuple[str, Path, Path, dict[str, str]]:
    name = topic(2)
    pipeline = tmp_path / "clicks.py"
    pipeline.write_text(PIPELINE.format(topic=name))
    data = tmp_path / "clicks.jsonl"
    data.write_text("\n".join(LINES))
    return name, pipeline, data, worker_env(services.kafka, services.redis_url, tmp_path, unique("cli"))


def _values(services: Services, name: str) -> list[float | None]:
    return sorted(
        (json.loads(v)["value"] for _, _, v in read_messages(services.kafka, name)),
        key=lambda v: (v is None, v),
    )


def test_a_file_stops_at_the_first_invalid_line_by_default(
    services: Services, tmp_path: Path, topic: Callable[..., str]
) -> None:
    name, pipeline, data, env = _setup(services, tmp_path, topic)
    done = _run(["produce", str(pipeline), "clicks", str(data)], env)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "stopped at line 3" in out and f"tail -n +3 {data}" in out, out
    assert "value" in out and "invalid_type" in out and "send a number" in out
    assert "sent 2 events" in out and "delivered 2, failed 0" in out, out
    assert _values(services, name) == [1.0, 2.0]  # nothing from line 3 on
    keys = {k for _, k, _ in read_messages(services.kafka, name)}
    assert keys == {b"u1", b"u2"}  # keyed by the view's entity


def test_skip_invalid_sends_every_valid_line_and_lists_the_others(
    services: Services, tmp_path: Path, topic: Callable[..., str]
) -> None:
    name, pipeline, data, env = _setup(services, tmp_path, topic)
    done = _run(["produce", str(pipeline), "clicks", str(data), "--skip-invalid"], env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "sent 5 events" in out and "delivered 5, failed 0" in out, out
    assert "invalid lines: 2 (invalid_type 1, malformed_json 1)" in out, out
    rows = [line.split("│")[1:4] for line in done.stdout.splitlines() if line.startswith("│ ")]
    table = {r[0].strip(): (r[1].strip(), r[2].strip()) for r in rows if r[0].strip()}
    assert table == {"3": ("value", "invalid_type"), "7": ("(message)", "malformed_json")}, done.stdout
    assert _values(services, name) == [1.0, 2.0, 4.0, 6.0, None]


def test_stdin_with_a_bad_line(services: Services, tmp_path: Path, topic: Callable[..., str]) -> None:
    name, pipeline, _, env = _setup(services, tmp_path, topic)
    text = "\n".join([_line(1), _line(2, ts="yesterday"), _line(3)]) + "\n"
    done = _run(["produce", str(pipeline), "clicks", "-"], env, stdin=text)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "from stdin" in out and "stopped at line 2" in out and "bad_timestamp" in out, out
    assert _values(services, name) == [1.0]

    done = _run(
        ["produce", str(pipeline), "clicks", "-", "--skip-invalid", "--key", "user_id"], env, stdin=text
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _values(services, name) == [1.0, 1.0, 3.0]


def test_usage_errors_and_the_synthetic_generator(
    services: Services, tmp_path: Path, topic: Callable[..., str]
) -> None:
    name, pipeline, data, env = _setup(services, tmp_path, topic)
    neither = _run(["produce", str(pipeline)], env)
    assert neither.returncode == 2 and "--synthetic N" in neither.stdout, neither.stdout
    wrong = _run(["produce", str(pipeline), "nope", str(data)], env)
    assert wrong.returncode == 2 and "no source 'nope'" in wrong.stdout and "['clicks']" in wrong.stdout
    missing = _run(["produce", str(pipeline), "clicks", str(tmp_path / "none.jsonl")], env)
    assert missing.returncode == 2 and "does not exist" in missing.stdout

    # The generator's card transactions carry user_id and ts (value is nullable): all accepted.
    synthetic = _run(["produce", str(pipeline), "--synthetic", "20", "--users", "4"], env)
    assert synthetic.returncode == 0, synthetic.stdout + synthetic.stderr
    assert "sent 20 events" in synthetic.stdout and "delivered 20" in synthetic.stdout
    got = read_messages(services.kafka, name)
    assert len(got) == 20 and all(json.loads(v)["user_id"].encode() == k for _, k, v in got)
