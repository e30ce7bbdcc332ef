"""``featurestream services up|down|status``: the embedded broker and Redis for local use."""

from __future__ import annotations

import typer
from rich.console import Console

from engine.errors import FeaturestreamError
from featurestream.cli.core import _fail

console = Console()


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""
    services_app = typer.Typer(no_args_is_help=True, help="Embedded Kafka (Tansu) and Redis for local use.")
    app.add_typer(services_app, name="services")
    services_app.command("up")(services_up)
    services_app.command("down")(services_down)
    services_app.command("status")(services_status)


def services_up() -> None:
    """Start (or reuse) the embedded broker and Redis, and print their addresses."""
    from featurestream.config import Settings
    from featurestream.local.services import broker_generation, ensure_services

    try:
        settings = Settings()
        before = broker_generation(settings)
        eps = ensure_services(settings)
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    console.print(f"FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS={eps.kafka_bootstrap_servers}")
    console.print(f"FEATURESTREAM_REDIS_URL={eps.redis_url}")
    console.print(f"FEATURESTREAM_DELTA_URI={eps.delta_uri}")
    if eps.kafka_generation:
        console.print(f"broker generation {eps.kafka_generation} (see `featurestream services status`)")
    if before and eps.kafka_generation and before != eps.kafka_generation:
        console.print(
            f"note: the broker started empty (generation {before} is gone with its topics); "
            "pipelines that read those topics stop until `featurestream reset PIPELINE.py`",
            soft_wrap=True,
        )


def services_down() -> None:
    """Stop the embedded services."""
    from featurestream.config import Settings
    from featurestream.local.services import stop_embedded

    for line in stop_embedded(Settings()) or ["nothing was running"]:
        console.print(line)


def services_status() -> None:
    """Show the broker and Redis in use: configured ones, or the embedded ones and whether they answer."""
    from engine.redact import redact_text
    from featurestream.config import Settings
    from featurestream.local.services import embedded_status

    settings = Settings()
    found = embedded_status(settings)
    configured = {
        "kafka": ("FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
        "redis": ("FEATURESTREAM_REDIS_URL", settings.redis_url),
    }
    for kind, (env, value) in configured.items():
        if value is not None:
            console.print(
                f"{kind}: configured, {env}={redact_text(value)} (`featurestream doctor` checks it)",
                soft_wrap=True,
            )
        elif kind not in found:
            console.print(
                f"{kind}: not running (embedded, state dir {settings.state_dir.resolve()})", soft_wrap=True
            )
    for kind, info in found.items():
        state = (
            "answers" if info["answers"] else "running but not answering" if info["running"] else "stopped"
        )
        console.print(f"{kind}: {info['address']} {state} (embedded, pid {info['pid']})", soft_wrap=True)
        if kind == "kafka":
            console.print(
                f"  storage {info.get('storage')}, generation {info.get('generation')}", soft_wrap=True
            )
        console.print(f"  log {info['log']}", soft_wrap=True)
    if not found or not all(info["answers"] for info in found.values()):
        if any(value is None for _, value in configured.values()):
            console.print("start the embedded services with `featurestream services up`", soft_wrap=True)
