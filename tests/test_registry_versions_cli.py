"""Feature view versions through the CLI: plan, apply, versions, deprecate, retire."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# --- CLI ------------------------------------------------------------------------------------------

PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="clicks", topic="clicks", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="value", dtype="float")),
)
clicks = FeatureView(
    name="clicks", entity=Entity(name="user", join_keys=("user_id",)), source=source,
    aggregations=(
        Aggregation(function="count", window="1h"),
        {extra}
    ),
    owner="web",
)
"""


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "featurestream.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_cli_plan_apply_versions_deprecate_retire(tmp_path: Path) -> None:
    pipes = tmp_path / "pipes"
    pipes.mkdir()
    (pipes / "helpers.py").write_text("WINDOWS = ('1h',)\n")  # defines no views: skipped
    pipeline = pipes / "clicks.py"
    pipeline.write_text(PIPELINE.format(extra=""))
    env = {
        **os.environ,
        "FEATURESTREAM_REGISTRY_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "FEATURESTREAM_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "200",
    }

    out = _cli(env, "plan", str(pipeline))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "clicks" in out.stdout and "new" in out.stdout and "plan: 1 new" in out.stdout
    assert not (tmp_path / "state").exists()  # the configured registry, not the default one

    out = _cli(env, "apply", str(pipes))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "clicks@1" in out.stdout and "applied: 1 new" in out.stdout
    assert "applied: 1 unchanged" in _cli(env, "apply", str(pipes)).stdout

    pipeline.write_text(PIPELINE.format(extra='Aggregation(function="sum", column="value", window="1h"),'))
    out = _cli(env, "apply", str(pipes))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "additive" in out.stdout and "clicks@2" in out.stdout and "value_sum_1h: added" in out.stdout

    pipeline.write_text(PIPELINE.format(extra='Aggregation(function="sum", column="value", window="2h"),'))
    out = _cli(env, "plan", str(pipes))
    assert out.returncode == 0 and "breaking: clicks" in out.stdout
    assert "window 1h -> 2h" in out.stdout and "yes" in out.stdout

    out = _cli(env, "deprecate", "clicks", "1", "--retire-after", "2030-01-31")
    assert out.returncode == 0 and "deprecated clicks@1 (may be retired after 2030-01-31)" in out.stdout
    assert _cli(env, "retire", "clicks", "1").stdout.strip() == "retired clicks@1"
    out = _cli(env, "versions", "clicks")
    assert out.returncode == 0
    first, second = out.stdout.split("clicks@1")[1].split("clicks@2")  # each version's rows
    assert "retired" in first and "2030-01-31" in first
    assert "active" in second and "web" in second

    for args, needle in [
        (("versions", "nosuch"), "no feature view 'nosuch'"),
        (("retire", "clicks", "7"), "has no version 7"),
        (("deprecate", "clicks", "2", "--retire-after", "31/01/2030"), "use YYYY-MM-DD"),
        (("apply", str(tmp_path / "missing.py")), "does not exist"),
    ]:
        out = _cli(env, *args)
        assert out.returncode == 2 and "error:" in out.stdout and needle in out.stdout, (args, out.stdout)
