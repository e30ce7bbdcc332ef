"""`featurestream doctor`: check the configured broker, Redis, Delta root and registry, and say
what is wrong and how to fix it, one line each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from featurestream.config import Settings

console = Console()
Check = tuple[str, bool, str]  # (what, ok, detail or fix)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""

    @app.command("doctor")
    def doctor() -> None:
        """Check the settings, broker, Redis, Delta root and registry; print what is wrong and the fix."""
        from featurestream.config import ConfigError, Settings, config_file

        path = config_file()
        source = f"{path} and the environment" if path.is_file() else "the environment (no settings file)"
        console.print(f"settings: from {escape(source)}", soft_wrap=True)
        try:
            settings = Settings()
        except ConfigError as exc:
            _show([("settings", False, str(exc))])
            raise typer.Exit(code=1) from None
        checks = [_kafka(settings), _redis(settings), _delta(settings), _registry(settings)]
        _show(checks)
        bad = sum(not ok for _, ok, _ in checks)
        console.print(
            "all good" if not bad else f"{bad} problem(s); fix them and run `featurestream doctor` again"
        )
        if bad:
            raise typer.Exit(code=1)


def _show(checks: list[Check]) -> None:
    for what, ok, detail in checks:
        mark = "[green]ok  [/]" if ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {what}: {escape(detail)}", soft_wrap=True)


def _embedded(settings: Settings, kind: str, label: str, env: str) -> Check:
    from featurestream.local.services import embedded_status

    info = embedded_status(settings).get(kind)
    if info and info["answers"]:
        return label, True, f"{info['address']} (embedded, pid {info['pid']})"
    why = "recorded but not answering" if info else "not running"
    return (
        label,
        False,
        f"no {env} set and the embedded one is {why}; start it with `featurestream services up`, "
        f"or set {env}",
    )


def _kafka(settings: Settings) -> Check:
    from engine.redact import redact_text
    from featurestream.local.services import kafka_answers

    env = "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS"
    if settings.kafka_bootstrap_servers is None:
        return _embedded(settings, "kafka", "broker", env)
    address = settings.kafka_bootstrap_servers
    try:
        answers = kafka_answers(address, 5.0, settings.kafka_config)
    except Exception as exc:  # an invalid librdkafka setting
        return "broker", False, f"FEATURESTREAM_KAFKA_CONFIG is invalid: {redact_text(str(exc))}"
    if answers:
        return "broker", True, f"{address} ({env})"
    return (
        "broker",
        False,
        f"{address} ({env}) returned no metadata within 5 s; check the broker runs, the address and "
        "its advertised listeners, and FEATURESTREAM_KAFKA_CONFIG (SASL/SSL)",
    )


def _redis(settings: Settings) -> Check:
    from engine.redact import redact_text
    from featurestream.local.services import redis_answers

    env = "FEATURESTREAM_REDIS_URL"
    if settings.redis_url is None:
        return _embedded(settings, "redis", "redis", env)
    shown = redact_text(settings.redis_url)
    if redis_answers(settings.redis_url, 5.0):
        return "redis", True, f"{shown} ({env})"
    return (
        "redis",
        False,
        f"{shown} ({env}) did not answer PING within 5 s; check redis-server runs, the host, port, "
        "db and password in the URL",
    )


def _delta(settings: Settings) -> Check:
    from engine.redact import redact_text

    uri = settings.resolved_delta_uri()
    if "://" in uri and not uri.startswith("file://"):
        return "delta", True, f"{redact_text(uri)} (remote; checked on the first write)"
    root = Path(uri.removeprefix("file://"))
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
    if not probe.is_dir():
        return "delta", False, f"{root} is not a directory; set FEATURESTREAM_DELTA_URI to a directory"
    if not os.access(probe, os.W_OK):
        return "delta", False, f"{probe} is not writable; fix its permissions or set FEATURESTREAM_DELTA_URI"
    tables = len([p for p in root.iterdir() if (p / "_delta_log").is_dir()]) if root.is_dir() else 0
    return "delta", True, f"{root} ({tables} table(s))" if root.exists() else f"{root} (created on first run)"


def _registry(settings: Settings) -> Check:
    from engine.redact import redact_text
    from registry.core import Registry
    from registry.versions import versions

    url = settings.resolved_registry_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return "registry", True, f"{url} (empty: record views with `featurestream apply PIPELINE.py`)"
    try:
        registry = Registry(url)
        try:
            found = versions(registry)
        finally:
            registry.close()
    except Exception as exc:
        return (
            "registry",
            False,
            f"{redact_text(url)}: {redact_text(str(exc)).splitlines()[0]}; check "
            "FEATURESTREAM_REGISTRY_URL (sqlite:///path or postgresql://user@host/db)",
        )
    return "registry", True, f"{redact_text(url)} ({len(found)} view version(s))"
