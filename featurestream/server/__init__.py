"""The HTTP feature server (``featurestream serve``): online features for services, with API keys.

Stack: Starlette on uvicorn with httptools and uvloop. Measured on this project's 2-core machine
(same JSON answer, keep-alive, one process), Starlette + uvicorn answered in about 70 us at p50
and 11-14k requests/s, FastAPI on the same server took about 2x longer per request (its
validation and serialisation layers) and granian's ASGI mode added about 20 us per request at
concurrency 1 (the hop from its Rust threads to Python). Request bodies are decoded and
validated by msgspec (one pass, errors name the path), answers encoded by msgspec or Arrow IPC.
The OpenAPI schema is generated from the same msgspec models.

Modules: :mod:`.app` (routes and the request path), :mod:`.catalog` (served views and versions),
:mod:`.reads` (vectorised online reads with statuses), :mod:`.encode` (JSON and Arrow answers),
:mod:`.auth` (API keys and the access audit), :mod:`.push` (events to Kafka), :mod:`.metrics`,
:mod:`.models`, :mod:`.openapi`, :mod:`.errors`, :mod:`.config`.
"""

from featurestream.server.app import FeatureServer, create_app
from featurestream.server.config import ServerConfig, ServerDeps

__all__ = ["FeatureServer", "ServerConfig", "ServerDeps", "create_app"]
