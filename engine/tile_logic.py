"""The stateful step of a view's tiles: one shard's :class:`engine.state.TileState`, and the watch
that notices when the online store lost its data or some entities' keys expired.

Session windows (engine.session_flow) and coarse tile levels (engine.level_flow) run the same
logic over their own state and namespace.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from bytewax.operators import StatefulBatchLogic

from connectors.redis_store import RedisOnlineStore
from engine.errors import StoreError
from engine.shards import ShardEvents
from engine.sinks import TimedUpdate
from engine.snapshots import snapshots_wanted
from engine.state import TileState

__all__ = ["OnlineEpochWatch", "TileLogic"]

log = logging.getLogger(__name__)


class OnlineEpochWatch:
    """Notices when the online store lost its data (its epoch token changed), at most every
    ``interval`` seconds, so the tile state can rewrite every entity it holds.

    Uses its own client with short timeouts: it runs on the dataflow thread, which must not
    stall while Redis is down (then it checks again after ``interval``). The shards of one
    namespace in a process share each answer for ``interval`` (one round trip per interval, not
    one per shard: 32 blocking calls a second on the dataflow thread were a sixth of its time at
    1k events/s), so a loss is noticed within two intervals.
    """

    _answers: dict[tuple[str, str], tuple[float, str | None, frozenset[str]]] = {}
    _lock = threading.Lock()

    def __init__(self, url: str, namespace: str, interval: float = 1.0) -> None:
        self.store = RedisOnlineStore(url, socket_timeout=0.5, connect_timeout=0.5)
        self.url = url
        self.namespace = namespace
        self.interval = interval
        self.next_check = 0.0
        self.lost: frozenset[str] = frozenset()  # entities whose keys expired, as last asked

    @classmethod
    def forget(cls) -> None:
        """A new run starts in this process: ask the store afresh."""
        with cls._lock:
            cls._answers.clear()

    def due(self) -> bool:
        return time.monotonic() >= self.next_check

    def lost_data(self, state: Any) -> bool:
        """Whether the store lost what ``state`` (with ``online_epoch`` and ``entities``) wrote, so
        every entity must be rewritten; records the store's new epoch in ``state``. Checks at
        most every ``interval`` seconds."""
        if not self.due():
            return False
        token = self.current()
        if token is None or token == state.online_epoch:
            return False
        fresh = state.online_epoch is None and not state.entities  # nothing written yet
        state.online_epoch = token
        return not fresh

    def current(self) -> str | None:
        """The store's epoch token, or None when it cannot be asked now; also notes in ``lost``
        the entities whose appends the store refused because their keys had expired."""
        now = time.monotonic()
        self.next_check = now + self.interval
        key = (self.url, self.namespace)
        with self._lock:
            asked, token, lost = self._answers.get(key, (-np.inf, None, frozenset()))
            if now - asked >= self.interval:
                try:
                    token = self.store.epoch(self.namespace)
                    lost = frozenset(self.store.lost_entities(self.namespace))
                except StoreError:
                    token, lost = None, frozenset()
                self._answers[key] = (time.monotonic(), token, lost)
            self.lost = lost
            return token

    def take_lost(self, state: Any) -> list[str]:
        """The entities of ``state`` whose keys expired (noted by the last :meth:`current`), taken
        off the store's lost set; empty when it cannot be asked now."""
        mine = [e for e in self.lost if e in state.entity_index]
        self.lost = frozenset()
        if not mine:
            return []
        try:
            self.store.forget_lost(self.namespace, mine)
        except StoreError:
            return []  # asked again next interval
        return mine


class TileLogic(StatefulBatchLogic[ShardEvents, TimedUpdate, TileState]):
    """Keeps one shard's tiles; emits the tiles each batch changed, with the batch's read time.

    When the online store lost its data, emits every entity's live tiles as a forced rewrite.
    """

    def __init__(self, state: TileState, watch: OnlineEpochWatch | None = None) -> None:
        self.state = state
        self.watch = watch

    def _resync(self) -> list[TimedUpdate]:
        if self.watch is None:
            return []
        if not self.watch.lost_data(self.state):
            return self._rewrite_expired()
        update = self.state.resync()
        if update.entities:
            log.warning(
                "online store %s has a new epoch (it lost its data); rewriting %d entities from state",
                self.watch.namespace,
                len(update.entities),
            )
        return [TimedUpdate(update, time.time())] if update.entities else []

    def _rewrite_expired(self) -> list[TimedUpdate]:
        """Rewrite the entities whose keys expired while appends were pending (the store
        refused those appends)."""
        assert self.watch is not None
        rewrite = getattr(self.state, "rewrite", None)
        names = self.watch.take_lost(self.state) if rewrite is not None else []
        if not names:
            return []
        log.info("rewriting %d entities whose online keys expired", len(names))
        return [TimedUpdate(rewrite(names), time.time())]

    def on_batch(self, values: list[ShardEvents]) -> tuple[list[TimedUpdate], bool]:
        out = self._resync()
        for ev in values:
            update = self.state.apply(ev.keys, ev.codes, ev.ts, ev.columns, ev.partition, ev.offsets, ev.text)
            if update.entities:
                out.append(TimedUpdate(update, ev.read_at, ev.produced_at))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[TimedUpdate], bool]:
        return self._resync(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if self.watch is None:
            return None
        # At once when built (a resumed shard checks the store before any new event), then
        # every interval.
        wait = max(0.0, self.watch.next_check - time.monotonic())
        return datetime.now(UTC) + timedelta(seconds=wait)

    def snapshot(self) -> TileState | None:
        # A copy, because Bytewax serialises it later while this state keeps changing.
        return copy.deepcopy(self.state) if snapshots_wanted() else None
