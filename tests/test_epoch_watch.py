"""The online-store epoch watch shared by the shards of a namespace (real Redis).

One answer per interval serves every shard of the namespace in a process; a store that lost its
data must still be noticed by every shard (within two intervals), each shard exactly once, and a
new run in the same process must not reuse an answer from the previous one.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import redis

from connectors.redis_store import RedisOnlineStore
from engine.dataflow import OnlineEpochWatch
from tests.conftest import Services
from tests.support import unique


def _state() -> SimpleNamespace:
    return SimpleNamespace(online_epoch=None, entities=["e1"])


def _lose_data(client: redis.Redis, namespace: str) -> None:
    client.delete(namespace[:-1] + "#epoch")  # what a restart without persistence leaves


def test_every_shard_notices_a_loss_once_with_shared_answers(
    services: Services, redis_client: redis.Redis
) -> None:
    namespace = RedisOnlineStore.namespace_of(unique("w"), "v", "1")
    OnlineEpochWatch.forget()
    interval = 0.2
    watches = [OnlineEpochWatch(services.redis_url, namespace, interval) for _ in range(8)]
    states = [_state() for _ in watches]
    asked = []
    for w in watches:  # count the round trips the shards make
        real = w.store.epoch
        w.store.epoch = lambda ns, real=real: (asked.append(ns), real(ns))[1]  # type: ignore[method-assign]
    # First check: every shard records the store's token (a shard that already wrote sees a loss).
    assert [w.lost_data(s) for w, s in zip(watches, states, strict=True)] == [True] * 8
    assert len(asked) == 1, "the shards share one answer per interval"
    token = states[0].online_epoch
    assert token and all(s.online_epoch == token for s in states)
    _lose_data(redis_client, namespace)
    noticed = [0] * len(watches)
    deadline = time.monotonic() + 2 * interval + 1.0
    while time.monotonic() < deadline:
        for i, (w, s) in enumerate(zip(watches, states, strict=True)):
            noticed[i] += w.lost_data(s)
        time.sleep(interval / 10)
    assert noticed == [1] * 8, "each shard rewrites once after the loss"
    assert all(s.online_epoch not in (None, token) for s in states)
    assert len(asked) <= 2 + int((2 * interval + 1.0) / interval) + 1


def test_a_new_run_asks_afresh(services: Services, redis_client: redis.Redis) -> None:
    namespace = RedisOnlineStore.namespace_of(unique("w"), "v", "1")
    OnlineEpochWatch.forget()
    first = OnlineEpochWatch(services.redis_url, namespace, interval=60.0)
    state = _state()
    first.lost_data(state)
    _lose_data(redis_client, namespace)
    OnlineEpochWatch.forget()  # run_dataflow does this when a run starts
    second = OnlineEpochWatch(services.redis_url, namespace, interval=60.0)
    assert second.lost_data(state), "a cached answer from the previous run would hide the loss"
