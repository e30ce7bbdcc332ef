"""``featurestream keys``: API keys of the feature server and the audit of its access decisions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.errors import DefinitionError

if TYPE_CHECKING:
    from registry.core import Registry

console = Console()
T = TypeVar("T")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the feature server (`featurestream serve`).")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""
    app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="who or what uses the key, e.g. fraud-scoring")],
    read: Annotated[
        list[str] | None, typer.Option("--read", help="feature view it may read (repeat; '*' for all)")
    ] = None,
    produce: Annotated[
        list[str] | None, typer.Option("--produce", help="source it may push to (repeat; '*' for all)")
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="expiry: a duration (30d, 12h) or a date (YYYY-MM-DD, UTC)")
    ] = None,
) -> None:
    """Create a key. It is printed once: only its hash is stored."""
    from registry.keys import create_key

    expires_at = _expiry(expires) if expires else None
    key, secret = _run(
        lambda reg: create_key(reg, name, read=read or [], produce=produce or [], expires_at=expires_at)
    )
    console.print(
        f"created API key [bold]{key.id}[/] ({escape(key.name)}); scopes: {_scopes(key)}", soft_wrap=True
    )
    console.print("the key (shown only now; store it in your secret manager):")
    typer.echo(secret)


@keys_app.command("list")
def list_cmd(
    all_: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
) -> None:
    """List keys (ids, names, scopes, expiry and status; never secrets)."""
    from registry.keys import list_keys

    keys = _run(lambda reg: list_keys(reg, include_revoked=all_))
    if not keys:
        console.print("no API keys; create one with `featurestream keys create NAME --read VIEW`")
        return
    table = Table(title="API keys")
    for col in ("id", "name", "read", "produce", "created", "expires", "status"):
        table.add_column(col, overflow="fold")
    at = datetime.now(UTC)
    for k in keys:
        table.add_row(
            k.id,
            escape(k.name),
            ", ".join(k.read) or "-",
            ", ".join(k.produce) or "-",
            _when(k.created_at),
            _when(k.expires_at),
            k.status(at),
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (see `featurestream keys list`)")],
) -> None:
    """Revoke a key for good (running servers refuse it within their refresh interval)."""
    from registry.keys import revoke_key

    key = _run(lambda reg: revoke_key(reg, key_id))
    console.print(f"revoked API key {key.id} ({escape(key.name)}) at {_when(key.revoked_at)}")


@keys_app.command("audit")
def audit(
    key: Annotated[str | None, typer.Option("--key", help="only this key id")] = None,
    since: Annotated[str, typer.Option(help="how far back: a duration (1h, 7d)")] = "24h",
    view: Annotated[
        str | None, typer.Option("--view", help="only decisions about this view or source")
    ] = None,
    denied: Annotated[bool, typer.Option("--denied", help="only refused requests")] = False,
    limit: Annotated[int, typer.Option(help="newest N decisions")] = 100,
) -> None:
    """Show the feature server's access decisions, newest first."""
    from engine.definitions import parse_duration
    from registry.keys import access_audit_log

    try:
        start = datetime.now(UTC) - parse_duration(since)
    except Exception:
        raise DefinitionError(f"--since {since!r} is not a duration; use e.g. 30m, 24h, 7d") from None
    rows = _run(
        lambda reg: access_audit_log(
            reg, key_id=key, since=start, allowed=False if denied else None, resource=view, limit=limit
        )
    )
    if not rows:
        console.print(f"no access decisions since {_when(start)}")
        return
    table = Table(title=f"access decisions since {_when(start)}")
    for col in ("time (UTC)", "count", "key", "action", "views / source", "allowed", "reason", "client"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r.at.strftime("%Y-%m-%d %H:%M:%S"),
            f"{r.count:,}",
            r.key_id or "-",
            r.action,
            escape(", ".join(r.resources)) or "-",
            "[green]yes[/]" if r.allowed else "[red]no[/]",
            r.reason,
            escape(r.client) or "-",
        )
    console.print(table)


def _expiry(text: str) -> datetime:
    from engine.definitions import parse_duration

    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        pass
    try:
        delta = parse_duration(text)
    except Exception:
        delta = None
    if not isinstance(delta, timedelta) or delta <= timedelta(0):
        raise DefinitionError(f"--expires {text!r} is neither a duration (30d, 12h) nor a date (YYYY-MM-DD)")
    return datetime.now(UTC) + delta


def _scopes(key) -> str:  # type: ignore[no-untyped-def]
    parts = []
    if key.read:
        parts.append("read " + ", ".join(key.read))
    if key.produce:
        parts.append("produce " + ", ".join(key.produce))
    expiry = f"; expires {_when(key.expires_at)}" if key.expires_at else "; no expiry"
    return escape("; ".join(parts)) + expiry


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _run(action: Callable[[Registry], T]) -> T:
    """Run ``action`` on the configured registry; errors reach the CLI's handler (one line, exit 2)."""
    from featurestream.config import Settings
    from registry.core import Registry

    reg = Registry(Settings().resolved_registry_url())
    try:
        return action(reg)
    finally:
        reg.close()
