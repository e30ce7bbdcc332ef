"""``featurestream serve``: the HTTP feature server (see :mod:`featurestream.server`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""

    @app.command("serve")
    def serve(
        path: Annotated[Path, typer.Argument(help="a pipeline .py file, or a directory of them")],
        host: Annotated[
            str | None, typer.Option(help="address to bind (default 127.0.0.1, FEATURESTREAM_SERVE_HOST)")
        ] = None,
        port: Annotated[int | None, typer.Option(help="port (default 6566)")] = None,
        no_auth: Annotated[
            bool, typer.Option("--no-auth", help="serve without API keys: local development only")
        ] = False,
        max_entities: Annotated[int | None, typer.Option(help="entities per read (default 1000)")] = None,
        read_cache_mib: Annotated[
            float, typer.Option(help="memory (MiB) for computed values of unchanged entities; 0 disables")
        ] = 64,
        refresh_seconds: Annotated[
            float, typer.Option(help="how often API keys and registered versions are re-read")
        ] = 5.0,
    ) -> None:
        """Serve online features over HTTP: POST /features/online, GET /features/{view}/{entity},
        POST /push/{source}; docs at /docs, health at /healthz and /readyz, metrics at /metrics."""
        import uvicorn

        from featurestream.cli.registry import load_path
        from featurestream.config import Settings
        from featurestream.local.services import ensure_services
        from featurestream.server import ServerConfig, ServerDeps, create_app

        settings = Settings()
        auth = settings.serve_auth and not no_auth
        views = load_path(path)
        eps = ensure_services(settings)
        config = ServerConfig(
            auth=auth,
            max_entities=max_entities or settings.serve_max_entities,
            refresh_seconds=refresh_seconds,
            read_cache_mib=read_cache_mib,
        )
        deps = ServerDeps(
            views=views,
            redis_url=eps.redis_url,
            redis_prefix=settings.redis_prefix,
            registry_url=_registry_url(settings, auth),
            kafka_bootstrap_servers=eps.kafka_bootstrap_servers,
            kafka_config=dict(settings.kafka_config),
            config=config,
        )
        app_ = create_app(deps)  # errors (pipeline, registry, services) reach the CLI's handler
        bind_host = host or settings.serve_host
        bind_port = settings.serve_port if port is None else port
        if not auth:
            console.print(
                "[bold yellow]warning:[/] API keys are OFF (--no-auth / FEATURESTREAM_SERVE_AUTH=false): "
                "any client that reaches this port reads every view and pushes to every source. "
                "Use this for local development only.",
                soft_wrap=True,
            )
        console.print(
            f"serving {', '.join(v.name for v in views)} on http://{bind_host}:{bind_port} "
            f"(docs: /docs, metrics: /metrics)",
            soft_wrap=True,
        )
        uvicorn.run(
            app_,
            host=bind_host,
            port=bind_port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="info",
            timeout_graceful_shutdown=10,
        )


def _registry_url(settings, auth: bool) -> str | None:  # type: ignore[no-untyped-def]
    """The registry: always with auth (keys live there), else only if one exists already."""
    url = settings.resolved_registry_url()
    if auth or not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).exists():
        return url
    return None
