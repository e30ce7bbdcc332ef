"""The OpenAPI 3.1 description of the server, built from the msgspec models, and its /docs page."""

from __future__ import annotations

from typing import Any

import msgspec

from featurestream.server.models import (
    ErrorResponse,
    OnlineRequest,
    OnlineResponse,
    PushResponse,
    VectorResponse,
)

__all__ = ["DOCS_HTML", "openapi"]

_REF = "#/components/schemas/{name}"
_ARROW = "application/vnd.apache.arrow.stream"


def _errors(*codes: int) -> dict[str, Any]:
    what = {
        400: "bad request: the body names the field and the fix",
        401: "no valid API key (missing, malformed, unknown, revoked or expired)",
        403: "the key's scopes do not cover this view or source",
        404: "unknown view, version or source",
        410: "the version is retired",
        503: "Redis, the broker or the audit log is unavailable; retry (the server recovers by itself)",
    }
    ref = {"$ref": _REF.format(name="ErrorResponse")}
    return {str(c): {"description": what[c], "content": {"application/json": {"schema": ref}}} for c in codes}


def _ok(model: str, arrow: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(name=model)}}}
    if arrow:
        content[_ARROW] = {"schema": {"type": "string", "format": "binary"}}
    return {
        "200": {"description": "OK (Arrow IPC stream when the Accept header asks for it)", "content": content}
    }


def openapi(version: str, auth: bool) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [OnlineRequest, OnlineResponse, VectorResponse, PushResponse, ErrorResponse], ref_template=_REF
    )
    security = [{"bearer": []}, {"apiKey": []}] if auth else []
    event = {"type": "object", "additionalProperties": True, "description": "one event of the source"}
    paths: dict[str, Any] = {
        "/features/online": {
            "post": {
                "summary": "Feature values of many entities (Feast's get-online-features body)",
                "description": "Values as of now. Each value has a status: PRESENT, NOT_FOUND, "
                "OUTSIDE_MAX_AGE (older than the view's TTL) or NULL_VALUE.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF.format(name="OnlineRequest")}}},
                },
                "responses": {**_ok("OnlineResponse", True), **_errors(400, 401, 403, 410, 503)},
                "security": security,
            }
        },
        "/features/{view}/{entity}": {
            "get": {
                "summary": "One entity's feature vector of one view (view or view@N)",
                "parameters": [
                    {"name": "view", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "entity",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "the entity key; composite keys joined with | (URL-encoded %7C)",
                    },
                    {
                        "name": "features",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "comma-separated feature names (default: all of the view)",
                    },
                ],
                "responses": {**_ok("VectorResponse", True), **_errors(400, 401, 403, 404, 410, 503)},
                "security": security,
            }
        },
        "/push/{source}": {
            "post": {
                "summary": "Publish events to a source's topic (validated like the stream decodes them)",
                "parameters": [
                    {"name": "source", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"oneOf": [event, {"type": "array", "items": event}]}}
                    },
                },
                "responses": {**_ok("PushResponse", False), **_errors(400, 401, 403, 404, 503)},
                "security": security,
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers and the registry is loaded",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready, with why"}},
            }
        },
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "featurestream feature server", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key: fsk_<id>_<secret>",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


DOCS_HTML = """<!doctype html>
<html><head><title>featurestream feature server</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
<noscript>The schema is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""
