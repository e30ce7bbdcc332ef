"""The README's Python snippets and shell commands, extracted from the file at test time and run
in order against the test session's broker and Redis, so the README cannot drift from the code.

A block opts out with a visible marker and a reason on the line before its fence:
``<!-- readme-test: skip (needs a running feature server) -->``. Python blocks share one
namespace (as in a notebook); shell blocks run with ``bash -euo pipefail`` in the same working
directory, with ``FEATURESTREAM_*`` pointing at the test services and ``FEATURESTREAM_BOUNDED=true``
(so commands that would run until stopped end at the topics' end).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Services
from tests.support import unique, worker_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    skip: str | None  # the reason, when opted out


def extract(text: str) -> list[Block]:
    """Every fenced block with its language, line and opt-out reason (if the line before the
    fence is a ``readme-test: skip (reason)`` marker)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = lines[start - 1] if start else ""
        marker = SKIP.search(before)
        blocks.append(
            Block(m["lang"], "\n".join(body) + "\n", start + 1, marker["reason"] if marker else None)
        )
        i += 1
    return blocks


def test_extractor_reads_markers_and_languages() -> None:
    text = (
        "x\n```bash\necho 1\n```\n<!-- readme-test: skip (needs a server) -->\n"
        "```python\nprint(2)\n```\n```\nout\n```\n"
    )
    got = extract(text)
    assert [(b.lang, b.code, b.line, b.skip) for b in got] == [
        ("bash", "echo 1\n", 2, None),
        ("python", "print(2)\n", 6, "needs a server"),
        ("", "out\n", 9, None),
    ]


def test_readme_opt_outs_are_few_and_give_a_reason() -> None:
    blocks = [b for b in extract(README.read_text()) if b.lang in ("python", "bash")]
    skipped = [b for b in blocks if b.skip]
    assert all(b.skip.strip() for b in skipped)
    assert len(skipped) <= len(blocks) // 3, [(b.line, b.skip) for b in skipped]
    # a marker must sit right before a fence, or it silently opts out nothing
    text = README.read_text().splitlines()
    for n, line in enumerate(text):
        if SKIP.search(line):
            assert n + 1 < len(text) and FENCE.match(text[n + 1]), (
                f"README.md:{n + 1}: marker not before a fence"
            )


def _events_jsonl(path: Path, n: int = 50) -> None:
    """The ``events.jsonl`` the README's produce commands read: valid card transactions."""
    now = int(time.time() * 1000)
    with path.open("w") as f:
        for i in range(n):
            event = {
                "user_id": f"user_{i % 7:06d}",
                "card_id": f"c{i % 3}",
                "merchant": "m_00017",
                "category": "fuel",
                "amount": 10.0 + i,
                "country": "DE",
                "is_online": i % 2 == 0,
                "ts": now - (n - i) * 1000,
            }
            f.write(json.dumps(event) + "\n")


def test_readme_runs_as_written(services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in extract(README.read_text()) if b.lang in ("python", "bash") and not b.skip]
    assert any(b.lang == "python" for b in blocks) and any(b.lang == "bash" for b in blocks)
    work = tmp_path / "work"
    work.mkdir()
    (work / "pipelines").symlink_to(ROOT / "pipelines")
    _events_jsonl(work / "events.jsonl")
    env = {
        **worker_env(services.kafka, services.redis_url, work, unique("readme")),
        "FEATURESTREAM_BOUNDED": "true",
        "COLUMNS": "80",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FEATURESTREAM_CONFIG", None)
    for key, value in env.items():
        if key.startswith("FEATURESTREAM_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(work)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for block in blocks:
        where = f"README.md:{block.line} ({block.lang})"
        if block.lang == "python":
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"{where} failed: {type(exc).__name__}: {exc}")
            continue
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, f"{where} exited {run.returncode}:\n{block.code}\n{output}"
        assert "Traceback" not in output, f"{where}:\n{output}"
