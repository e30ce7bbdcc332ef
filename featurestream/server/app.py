"""The ASGI application: routes, the request path of an online read, health and lifecycle.

An online read runs on the event loop without a thread hop: reads of concurrent requests are
coalesced (:mod:`featurestream.server.batch`) into one Redis MGET through
:class:`connectors.redis_store.RedisOnlineStore` (tens of microseconds on a local network, less
than handing the call to a thread) and one vectorised combine (:mod:`featurestream.server.reads`).
The Redis client's timeouts (``redis_timeout_seconds``) bound how long a dead Redis can hold the
loop; Redis errors answer 503 and the client reconnects on the next request once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from connectors.redis_store import RedisOnlineStore
from engine.decode import entity_id
from engine.definitions import FeatureView
from engine.errors import FeaturestreamError
from engine.redact import describe, redact_text
from featurestream.server.auth import AuditLog, KeyRing
from featurestream.server.batch import ReadBatcher
from featurestream.server.catalog import Catalog, Selection
from featurestream.server.config import ServerDeps
from featurestream.server.encode import ARROW, Answer, arrow_bytes, arrow_table, json_online, json_vector
from featurestream.server.errors import ApiError
from featurestream.server.metrics import ServerMetrics
from featurestream.server.models import decode_online
from featurestream.server.openapi import DOCS_HTML, openapi
from featurestream.server.push import PushGate, split_events
from featurestream.server.reads import Block, ReadCache
from registry.core import Registry
from registry.keys import ApiKey

__all__ = ["FeatureServer", "create_app"]

log = logging.getLogger("featurestream.server")
_JSON = "application/json"
_NO_VIEW = ["-"]
_peek = msgspec.json.Decoder(dict[str, Any])

Handler = Callable[[Request, list[str]], Awaitable[Response]]


def _version() -> str:
    try:
        return version("featurestream")
    except PackageNotFoundError:
        return "0"


class FeatureServer:
    """State shared by the routes: catalog, Redis, keys, audit, producers, metrics."""

    def __init__(self, deps: ServerDeps) -> None:
        cfg = deps.config
        self.deps = deps
        self.cfg = cfg
        self.metrics = ServerMetrics()
        self.catalog = Catalog(deps.views)
        self.store = RedisOnlineStore(
            deps.redis_url,
            deps.redis_prefix,
            socket_timeout=cfg.redis_timeout_seconds,
            connect_timeout=cfg.redis_timeout_seconds,
        )
        hits, misses = self.metrics.cache.labels("hit"), self.metrics.cache.labels("miss")
        self.cache = ReadCache(int(cfg.read_cache_mib * (1 << 20)), lambda h, m: (hits.inc(h), misses.inc(m)))
        self.batcher = ReadBatcher(self.store, self.cache, self.metrics)
        self.registry = Registry(deps.registry_url) if deps.registry_url else None
        if cfg.auth and self.registry is None:
            raise FeaturestreamError("API keys live in the registry: give a registry URL, or turn auth off")
        self.audit: AuditLog | None = None
        self.keys: KeyRing | None = None
        if cfg.auth and self.registry is not None:
            self.audit = AuditLog(self.registry, self.metrics, cfg.audit_flush_seconds, cfg.audit_max_pending)
            self.keys = KeyRing(self.registry, self.audit, self.metrics)
        self.push = PushGate(
            self.catalog.sources, deps.kafka_bootstrap_servers, deps.kafka_config, cfg.push_flush_seconds
        )
        self.openapi = msgspec.json.encode(openapi(_version(), cfg.auth))
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="fs-registry-poll", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._refresh(raise_errors=True)
        if self.audit is not None:
            self.audit.start()
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        self.push.close()
        if self.audit is not None:
            self.audit.close()
        if self.registry is not None:
            self.registry.close()

    def _refresh(self, raise_errors: bool = False) -> None:
        try:
            self.catalog.refresh(self.registry)
            if self.keys is not None:
                self.keys.refresh()
        except Exception as exc:
            if raise_errors:
                raise
            log.warning("cannot re-read the registry (keeping what was loaded): %s", describe(exc))

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.refresh_seconds):
            self._refresh()

    # -- helpers --------------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413,
                "body_too_large",
                f"the body has {declared} bytes; at most {limit} are read",
                fix="send fewer entities or events per request",
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413,
                    "body_too_large",
                    f"the body exceeds {limit} bytes",
                    fix="send fewer entities or events per request",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def _key(self, request: Request, action: str, resources: Callable[[], list[str]]) -> ApiKey | None:
        if self.keys is None:
            return None
        return await self.keys.authenticate(request.headers, action, _client(request), resources)

    def _authorize(self, key: ApiKey | None, action: str, names: list[str], request: Request) -> None:
        if key is not None and self.keys is not None:
            self.keys.authorize(key, action, names, _client(request))

    # -- routes ---------------------------------------------------------------------------------

    async def online(self, request: Request, labels: list[str]) -> Response:
        body = await self._body(request)
        key = await self._key(request, "read", lambda: _views_in(body))
        req = decode_online(body, self.cfg.max_entities)
        readable = None if key is None else set(key.read)
        sels = self.catalog.resolve(req.features, readable)
        names = list(dict.fromkeys(s.view.name for s in sels))
        labels[:] = names
        out_names, aggs = [], []
        for sel in sels:
            for a in sel.aggs:
                out_names.append(f"{sel.ref}__{a.feature_name}" if req.full_feature_names else a.feature_name)
                aggs.append(a)
        if not req.full_feature_names and len(set(out_names)) < len(out_names):
            dup = next(n for n in out_names if out_names.count(n) > 1)
            raise ApiError(
                400,
                "ambiguous_names",
                f"feature {dup!r} is requested from more than one view",
                field="full_feature_names",
                fix='set "full_feature_names": true',
            )
        ids = [_entity_ids(sel.view, req.entities) for sel in sels]
        self._authorize(key, "read", names, request)
        self.metrics.entities.observe(len(ids[0]))
        reads = [self.batcher.read(sel, sel_ids) for sel, sel_ids in zip(sels, ids, strict=True)]
        blocks = [await reads[0]] if len(reads) == 1 else list(await asyncio.gather(*reads))
        answer = Answer(out_names, aggs, _stack(blocks))
        headers = _deprecations(sels)
        if _wants_arrow(request):
            keys: dict[str, list[Any]] = dict(req.entities)
            return Response(arrow_bytes(arrow_table(keys, answer)), media_type=ARROW, headers=headers)
        return Response(json_online(dict(req.entities), answer), media_type=_JSON, headers=headers)

    async def vector(self, request: Request, labels: list[str]) -> Response:
        view_ref = request.path_params["view"]
        entity = request.path_params["entity"]
        key = await self._key(request, "read", lambda: [view_ref.partition("@")[0]])
        readable = None if key is None else set(key.read)
        sel = self.catalog.select(view_ref, "view", readable)
        labels[:] = [sel.view.name]
        self._authorize(key, "read", [sel.view.name], request)
        wanted = request.query_params.get("features")
        if wanted:
            by_name = {a.feature_name: a for a in sel.view.features}
            for name in wanted.split(","):
                if name not in by_name:
                    raise ApiError(
                        400,
                        "unknown_feature",
                        f"feature view {sel.ref!r} has no feature {name!r}",
                        field="features",
                        fix=f"use names from {list(by_name)}",
                    )
                sel.aggs.append(by_name[name])
        else:
            sel.aggs.extend(sel.view.features)
        sel.plan = sel.reader.plan(sel.aggs)
        block = await self.batcher.read(sel, [entity])
        answer = Answer([a.feature_name for a in sel.aggs], sel.aggs, block)
        headers = _deprecations([sel])
        if _wants_arrow(request):
            keys = {
                "entity" if len(sel.view.entity.join_keys) > 1 else sel.view.entity.join_keys[0]: [entity]
            }
            return Response(arrow_bytes(arrow_table(keys, answer)), media_type=ARROW, headers=headers)
        return Response(
            json_vector(sel.ref, sel.view.version, entity, answer), media_type=_JSON, headers=headers
        )

    async def push_events(self, request: Request, labels: list[str]) -> Response:
        source = request.path_params["source"]
        body = await self._body(request)
        key = await self._key(request, "produce", lambda: [source])
        if source in self.push.sources:
            labels[:] = [source]
        self._authorize(key, "produce", [source], request)
        pushable = sorted(s for s in self.push.sources if key is None or key.may("produce", s))
        view = self.push.view_of(source, pushable)
        events = split_events(body, self.cfg.max_push_events)
        self.push.check(source, view, events)
        topic = await self.push.send(source, view, events)
        self.metrics.pushed.labels(source).inc(len(events))
        return Response(
            msgspec.json.encode({"source": source, "topic": topic, "accepted": len(events)}), media_type=_JSON
        )

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            self.store.ping()
            checks["redis"] = "ok"
        except FeaturestreamError as exc:
            checks["redis"] = redact_text(str(exc))
        checks["registry"] = "ok" if self.catalog.loaded else "not loaded"
        if self.keys is not None:
            checks["keys"] = "ok" if self.keys.loaded else "not loaded"
        ready = all(v == "ok" for v in checks.values())
        body = msgspec.json.encode({"status": "ready" if ready else "not ready", "checks": checks})
        return Response(body, status_code=200 if ready else 503, media_type=_JSON)

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(self, request: Request) -> Response:
        return Response(self.openapi, media_type=_JSON)

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_HTML)

    def timed(self, route: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Run ``handler``, turn ApiErrors into JSON answers, observe latency by view and code."""
        hist = self.metrics.latency
        children: dict[tuple[str, str], Any] = {}  # (view, code) -> histogram child: labels() is slow

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            labels = list(_NO_VIEW)
            try:
                response = await handler(request, labels)
            except ApiError as exc:
                response = Response(exc.body(), status_code=exc.status, media_type=_JSON, headers=exc.headers)
            except Exception as exc:  # a bug: answer 500 without internals, log without secrets
                log.error("%s %s failed: %s", request.method, route, describe(exc, chain=True))
                err = ApiError(500, "internal_error", "the server failed on this request; see its log")
                response = Response(err.body(), status_code=500, media_type=_JSON)
            elapsed = time.perf_counter() - start
            code = str(response.status_code)
            for view in labels or _NO_VIEW:
                child = children.get((view, code))
                if child is None:
                    child = children[(view, code)] = hist.labels(route, view, code)
                child.observe(elapsed)
            return response

        return endpoint


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _wants_arrow(request: Request) -> bool:
    return ARROW in request.headers.get("accept", "")


def _views_in(body: bytes) -> list[str]:
    """The views a (possibly invalid) body names, for the audit of a refused request."""
    try:
        features = _peek.decode(body).get("features") or []
    except msgspec.DecodeError:
        return []
    if not isinstance(features, list):
        return []
    names = [f.partition(":")[0].partition("@")[0] for f in features[:100] if isinstance(f, str)]
    return [n[:128] for n in dict.fromkeys(names)]


def _entity_ids(view: FeatureView, entities: dict[str, list[str | int]]) -> list[str]:
    keys = view.entity.join_keys
    missing = [k for k in keys if k not in entities]
    if missing:
        raise ApiError(
            400,
            "missing_join_key",
            f"feature view {view.name!r} is keyed by {list(keys)}; entities lacks {missing[0]!r}",
            field=f"entities.{missing[0]}",
            fix=f"give one {missing[0]!r} value per entity",
        )
    if len(keys) == 1:
        return [str(v) for v in entities[keys[0]]]
    return [entity_id(list(parts)) for parts in zip(*(entities[k] for k in keys), strict=True)]


def _stack(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    return Block(
        np.concatenate([b.values for b in blocks]),
        np.concatenate([b.times for b in blocks]),
        np.concatenate([b.status for b in blocks]),
        np.concatenate([b.counts for b in blocks]),
        _types(blocks),
    )


def _types(blocks: list[Block]) -> tuple[Any, ...]:
    """Arrow types of object features over stacked blocks (none when no block has any)."""
    if not any(b.types for b in blocks):
        return ()
    return tuple(t for b in blocks for t in (b.types or (None,) * len(b.counts)))


def _deprecations(sels: list[Selection]) -> dict[str, str]:
    notes = [s.deprecation for s in sels if s.deprecation]
    if not notes:
        return {}
    return {"Deprecation": "true", "Warning": ", ".join(f'299 featurestream "{n}"' for n in notes)}


def create_app(deps: ServerDeps) -> Starlette:
    """The server as an ASGI app; registry and keys are loaded at startup (lifespan)."""
    server = FeatureServer(deps)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.start()
        if not deps.config.auth:
            log.warning(
                "API keys are OFF (--no-auth): every client may read every view; local development only"
            )
        try:
            yield
        finally:
            server.stop()

    routes = [
        Route("/features/online", server.timed("/features/online", server.online), methods=["POST"]),
        Route(
            "/features/{view}/{entity}",
            server.timed("/features/{view}/{entity}", server.vector),
            methods=["GET"],
        ),
        Route("/push/{source}", server.timed("/push/{source}", server.push_events), methods=["POST"]),
        Route("/healthz", server.healthz, methods=["GET"]),
        Route("/readyz", server.readyz, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
        Route("/openapi.json", server.openapi_json, methods=["GET"]),
        Route("/docs", server.docs, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
