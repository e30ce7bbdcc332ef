"""Whether Bytewax recovery is on in this process.

Bytewax asks every stateful operator and sink for a snapshot at the end of each epoch, with or
without recovery. With recovery, a snapshot must be a copy of the state (tiles) and must come
after everything the epoch produced is stored (the store sinks drain their writers), which is
what makes a resumed run lose nothing. Without recovery, both only cost time: a deep copy of each
shard and a dataflow stalled until the slowest store write (a Delta commit) returns. Unknown
(never said) counts as on, the safe side.
"""

from __future__ import annotations

__all__ = ["snapshots_needed", "snapshots_wanted"]

_NEEDED = [True]


def snapshots_needed(needed: bool) -> None:
    """Say whether recovery is on in this process (run_dataflow and the bytewax.run entry say)."""
    _NEEDED[0] = needed


def snapshots_wanted() -> bool:
    return _NEEDED[0]
