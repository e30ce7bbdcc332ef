"""Feature view versions: concurrent applies from several processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any

from engine.definitions import FeatureView
from registry.core import Registry
from registry.versions import apply, versions
from tests.registry_fixtures import *  # noqa: F403
from tests.registry_helpers import COUNT_1H, SUM_1H, _change_kinds, make_view

# --- concurrency ------------------------------------------------------------------------------------

DEFINITIONS = [
    make_view(aggs=(SUM_1H.model_copy(update={"window": f"{h}h"}), COUNT_1H)).model_dump(mode="json")
    for h in (1, 2, 3, 4, 5)
]


def _apply_worker(url: str, proc: int, barrier: Any, out: Any) -> None:
    try:
        reg = Registry(url)
        order = [0] + [(i + proc) % len(DEFINITIONS) for i in range(len(DEFINITIONS))] * 3
        barrier.wait(timeout=60)
        got = []
        for i in order:
            [ch] = apply(reg, [FeatureView(**DEFINITIONS[i])])
            got.append((ch.proposed.version, ch.result.seq))  # type: ignore[union-attr]
        reg.close()
        out.put((proc, got))
    except BaseException:
        out.put((proc, traceback.format_exc()))


def test_concurrent_applies_never_duplicate_or_lose_versions(registry: Registry, registry_url: str) -> None:
    ctx = mp.get_context("spawn")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_apply_worker, args=(registry_url, p, barrier, out)) for p in range(n)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert all(isinstance(r, list) for r in results.values()), results
    assert [p.exitcode for p in procs] == [0] * n

    rows = versions(registry, "spend")
    expected = {FeatureView(**d).version for d in DEFINITIONS}
    assert [v.seq for v in rows] == list(range(1, len(DEFINITIONS) + 1))
    assert sorted(v.version_hash for v in rows) == sorted(expected)
    seq_of = {v.version_hash: v.seq for v in rows}
    for got in results.values():
        assert all(seq_of[h] == seq for h, seq in got)  # every process saw the same numbering
    assert _change_kinds(registry) == ["new"] + ["breaking"] * (len(DEFINITIONS) - 1)  # one per version
