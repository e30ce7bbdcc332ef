"""Tile snapshots: a copy when recovery is on (or unknown), skipped when it is known off."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from engine.dataflow import TileLogic, snapshots_needed
from engine.snapshots import snapshots_wanted
from engine.state import TileState
from featurestream import runtime
from tests.tiles_helpers import LAYOUT


@pytest.fixture(autouse=True)
def _restore() -> None:
    snapshots_needed(True)  # an in-process run without recovery earlier in the session said False
    yield
    snapshots_needed(True)


def _logic() -> TileLogic:
    state = TileState(LAYOUT, 10**9)
    state.apply(["a"], np.zeros(2, np.int64), np.array([1_000, 2_000]), [np.ones(2)] * len(LAYOUT.columns))
    return TileLogic(state)


def test_snapshot_is_an_independent_copy_unless_recovery_is_known_off() -> None:
    logic = _logic()
    snap = logic.snapshot()
    assert snap is not None and snap is not logic.state
    logic.state.apply(["a"], np.zeros(1, np.int64), np.array([3_000]), [np.ones(1)] * len(LAYOUT.columns))
    assert int(snap.ops[snap.entity_index["a"]]) == 2  # later events do not leak into the snapshot
    snapshots_needed(False)
    assert logic.snapshot() is None


@pytest.mark.parametrize(
    ("argv", "env", "needed"),
    [
        (["/x/bytewax/run.py", "p.py:flow"], {}, False),
        (["/x/bytewax/run.py", "p.py:flow", "-r", "rec"], {}, True),
        (["/x/bytewax/run.py", "p.py:flow", "--recovery-directory=rec"], {}, True),
        (["/x/bytewax/run.py", "p.py:flow"], {"BYTEWAX_RECOVERY_DIRECTORY": "rec"}, True),
        (["my_own_runner.py"], {}, True),  # not bytewax.run: unknown, so snapshots stay on
    ],
)
def test_bytewax_run_without_recovery_skips_snapshots(monkeypatch, argv, env, needed) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("BYTEWAX_RECOVERY_DIRECTORY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    snapshots_needed(True)
    runtime._tell_recovery_from_bytewax_run()
    assert snapshots_wanted() is needed
