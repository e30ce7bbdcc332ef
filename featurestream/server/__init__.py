"""The HTTP feature server (``featurestream serve``): online features for services, with API keys.

Stack: Starlette on uvicorn with httptools and uvloop, chosen by measurement on this project's
2-core machine (the same small JSON answer, keep-alive, one process, load generator alongside):
Starlette + uvicorn answered in about 70-80 us at p50 with one connection; FastAPI on the same
server took about twice as long per request (its validation and serialisation layers) and
reached about half the requests/s; granian's ASGI mode added about 20 us per request with one
connection (the hop from its Rust threads to Python) and was not clearly faster with 32.
Request bodies are decoded and validated by msgspec (one pass; errors name the path), answers
encoded by msgspec or Arrow IPC, and the OpenAPI schema is generated from the same msgspec models.

Most of a read's time is not HTTP but the Redis round trip and numpy's per-call cost, so reads
of concurrent requests are coalesced (:mod:`.batch`), every window of a view is combined in one
pass (:mod:`.reads`), and computed values are reused while an entity's tiles and the current
tile are unchanged (:class:`.reads.ReadCache`, exact).

Modules: :mod:`.app` (routes and the request path), :mod:`.catalog` (served views and versions),
:mod:`.reads` and :mod:`.batch` (online reads with statuses), :mod:`.encode` (JSON and Arrow
answers), :mod:`.auth` (API keys and the access audit), :mod:`.push` (events to Kafka),
:mod:`.metrics`, :mod:`.models`, :mod:`.openapi`, :mod:`.errors`, :mod:`.config`.
"""

from typing import Any

__all__ = ["FeatureServer", "ServerConfig", "ServerDeps", "create_app"]


def __getattr__(name: str) -> Any:
    """The server's classes, imported on first use: the client and the CLI import
    ``featurestream.server.reads`` without paying for the HTTP stack and the registry."""
    if name in ("FeatureServer", "create_app"):
        from featurestream.server import app

        return getattr(app, name)
    if name in ("ServerConfig", "ServerDeps"):
        from featurestream.server import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
