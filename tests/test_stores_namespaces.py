"""Dropping a view version's online keys takes its sub-namespaces too (coarse tile levels,
session values, each with guards, object records, lost sets and epochs), and nothing of another
version, even one whose key prefix is a string prefix of it."""

from __future__ import annotations

import redis

from connectors.redis_store import RedisOnlineStore
from engine.levels import level_namespace
from engine.sessions import session_namespace
from tests.conftest import Services
from tests.support import unique


def test_delete_namespace_takes_every_sub_namespace_and_nothing_else(services: Services) -> None:
    prefix = unique("ns")
    store = RedisOnlineStore(services.redis_url, prefix)
    client = redis.Redis.from_url(services.redis_url)
    ns = store.namespace("v", "abc")
    mine = []
    for space in (ns, level_namespace(ns, 3_600_000), level_namespace(ns, 86_400_000), session_namespace(ns)):
        mine += [space + "u1", store.guard_namespace(space) + "u1", store.objects_namespace(space) + "u1"]
        mine += [space[:-1] + "#epoch", store.lost_key(space)]
    others = [
        store.namespace("v", "abcd") + "u1",
        store.namespace("v2", "abc") + "u1",
        f"{prefix}:v:ab/r3600:u1",
    ]
    for key in mine + others:
        client.set(key, b"x")
    try:
        assert store.delete_namespace(ns) == len(mine)
        assert client.exists(*mine) == 0
        assert client.exists(*others) == len(others)
    finally:
        client.delete(*others)
