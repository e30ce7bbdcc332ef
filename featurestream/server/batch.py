"""Online reads of concurrent requests, coalesced: one Redis MGET and one vectorised combine per
view and feature list for every request that reached the same turn of the event loop.

A read of 32 single-entity requests as one batch costs little more than one of them (the fixed
cost of a read is numpy calls and a Redis round trip, not entities), so under concurrency the
server's throughput grows with the batch instead of collapsing under per-request overhead. A
lone request waits for nothing: its batch is flushed as soon as the loop has run the callbacks
that were already ready. Each request still reads "as of now" (the flush time).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from connectors.redis_store import RedisOnlineStore
from engine.errors import StoreError
from engine.online_read import read_view
from engine.redact import redact_text
from featurestream.server.catalog import Selection
from featurestream.server.errors import ApiError
from featurestream.server.metrics import ServerMetrics
from featurestream.server.reads import Block, Plan, ReadCache

__all__ = ["ReadBatcher"]

_Item = tuple[list[str], "asyncio.Future[Block]"]


class ReadBatcher:
    """Collects reads made in one turn of the event loop and runs them together."""

    def __init__(self, store: RedisOnlineStore, cache: ReadCache, metrics: ServerMetrics) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self._pending: dict[tuple[str, int], tuple[Selection, list[_Item]]] = {}
        self._scheduled = False

    async def read(self, sel: Selection, ids: list[str]) -> Block:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Block] = loop.create_future()
        key = (sel.view.version, id(sel.plan))
        self._pending.setdefault(key, (sel, []))[1].append((ids, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        at_ms = int(time.time() * 1000)
        for sel, items in pending.values():
            try:
                blocks = self._read(sel, items, at_ms)
            except Exception as exc:  # every request of the batch gets the error
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), block in zip(items, blocks, strict=True):
                if not future.done():  # the client may have gone
                    future.set_result(block)

    def _read(self, sel: Selection, items: list[_Item], at_ms: int) -> list[Block]:
        ids = [e for item_ids, _ in items for e in item_ids]
        ns = self.store.namespace(sel.view.name, sel.view.version)
        plan = sel.plan or sel.reader.plan(sel.aggs)
        try:
            if plan.general:
                found = self._read_all(sel, ns, ids, plan)
            else:
                found = {"blobs": self.store.read_tiles(ns, ids)}
        except (StoreError, redis.RedisError) as exc:
            self.metrics.redis_errors.inc(len(items))
            raise ApiError(
                503,
                "redis_unavailable",
                f"the online store did not answer: {redact_text(str(exc))}",
                fix="retry shortly; the server reconnects by itself when Redis is back",
                headers={"Retry-After": "1"},
            ) from None
        block = sel.reader.read(
            found["blobs"],
            at_ms,
            plan,
            ids,
            self.cache,
            objects=found.get("objects"),
            sessions=found.get("session_blobs"),
            levels=found.get("levels"),
        )
        self.metrics.batch.observe(len(items))
        if len(items) == 1:
            return [block]
        out, start = [], 0
        for item_ids, _ in items:
            end = start + len(item_ids)
            out.append(
                Block(
                    block.values[:, start:end],
                    block.times[:, start:end],
                    block.status[:, start:end],
                    block.counts,
                    block.types,
                )
            )
            start = end
        return out

    def _read_all(self, sel: Selection, ns: str, ids: list[str], plan: Plan) -> dict[str, Any]:
        """Tile logs, object-tile records, session values and coarse levels the plan needs, in
        one MGET."""
        return read_view(self.store, sel.view, ns, ids, objects=plan.objects, sessions=plan.sessions)
