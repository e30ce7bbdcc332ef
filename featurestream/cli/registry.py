"""Registry commands: plan, apply, versions, deprecate, retire."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from engine.errors import DefinitionError, FeaturestreamError

if TYPE_CHECKING:
    from engine.definitions import FeatureView
    from registry.core import Registry
    from registry.versions import Change, ViewVersion

console = Console()
T = TypeVar("T")
_STYLE = {
    "new": "cyan",
    "additive": "green",
    "metadata": "yellow",
    "breaking": "bold red",
    "removed": "magenta",
}
PathArg = Annotated[Path, typer.Argument(help="a pipeline .py file, or a directory of them")]
NameArg = Annotated[str, typer.Argument(help="feature view name")]
SeqArg = Annotated[int, typer.Argument(help="version number (the n of name@n)")]


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""

    @app.command("plan")
    def plan_cmd(path: PathArg) -> None:
        """Show what `apply` would record for a pipeline's feature views, without recording it."""
        from registry.versions import plan

        changes = _run(lambda reg: plan(reg, load_path(path)))
        console.print(_changes_table(changes, applied=False))
        console.print(f"plan: {_summary(changes)}")

    @app.command("apply")
    def apply_cmd(path: PathArg) -> None:
        """Record a pipeline's feature views: new versions for definition changes, metadata in place."""
        from registry.versions import apply

        changes = _run(lambda reg: apply(reg, load_path(path)))
        console.print(_changes_table(changes, applied=True))
        console.print(f"applied: {_summary(changes)}")

    @app.command("versions")
    def versions_cmd(
        name: Annotated[str | None, typer.Argument(help="feature view name (default: all)")] = None,
    ) -> None:
        """List recorded feature view versions and their status."""
        from registry.versions import versions

        rows = _run(lambda reg: versions(reg, name))
        if not rows:
            console.print("no feature views recorded yet; record some with `featurestream apply <pipeline>`")
            return
        console.print(_versions_table(rows))

    @app.command("deprecate")
    def deprecate_cmd(
        name: NameArg,
        seq: SeqArg,
        retire_after: Annotated[
            str | None, typer.Option(help="date (YYYY-MM-DD, UTC) after which it may be retired")
        ] = None,
    ) -> None:
        """Mark a version deprecated: still served, but consumers should move to a newer one."""
        from registry.versions import deprecate

        try:
            after = datetime.strptime(retire_after, "%Y-%m-%d").replace(tzinfo=UTC) if retire_after else None
        except ValueError:
            raise _fail(
                f"--retire-after {retire_after!r} is not a date; use YYYY-MM-DD, e.g. 2030-01-31"
            ) from None
        v = _run(lambda reg: deprecate(reg, name, seq, after))
        when = f" (may be retired after {_when(v.retire_after)})" if v.retire_after else ""
        console.print(f"deprecated {v.label}{when}")

    @app.command("retire")
    def retire_cmd(name: NameArg, seq: SeqArg) -> None:
        """Mark a version retired: it is no longer served and cannot be applied again."""
        from registry.versions import retire

        v = _run(lambda reg: retire(reg, name, seq))
        console.print(f"retired {v.label}")


def load_path(path: Path) -> list[FeatureView]:
    """Feature views of one pipeline file, or of every ``*.py`` in a directory that defines some."""
    from featurestream.runtime import load_views

    if not path.is_dir():
        return load_views(path)
    views: list[FeatureView] = []
    origin: dict[str, Path] = {}
    for file in sorted(path.glob("*.py")):
        try:
            found = load_views(file)
        except DefinitionError as exc:
            if "defines no FeatureView" in str(exc):
                continue
            raise
        for view in found:
            if view.name in origin:
                raise DefinitionError(
                    f"feature view {view.name!r} is defined in both {origin[view.name]} and {file}; "
                    "keep one definition per name"
                )
            origin[view.name] = file
            views.append(view)
    if not views:
        raise DefinitionError(f"no *.py file in {path} defines a FeatureView")
    return views


@contextmanager
def _open() -> Iterator[Registry]:
    from featurestream.config import Settings
    from registry.core import Registry

    reg = Registry(Settings().resolved_registry_url())
    try:
        yield reg
    finally:
        reg.close()


def _run(action: Callable[[Registry], T]) -> T:
    try:
        with _open() as reg:
            return action(reg)
    except FeaturestreamError as exc:
        raise _fail(str(exc)) from None


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code=2)


def _changes_table(changes: list[Change], applied: bool) -> Table:
    """One row per view; fits 80 columns (reasons wrap at word boundaries, never per letter)."""
    table = Table(title="applied" if applied else "plan")
    table.add_column("view", overflow="fold", ratio=2)
    table.add_column("change", no_wrap=True)
    table.add_column("version", overflow="fold", ratio=2)
    table.add_column("breaking", no_wrap=True)
    table.add_column("reasons", overflow="fold", ratio=4, min_width=16)
    for ch in changes:
        style = _STYLE.get(ch.kind, "")
        kind = f"[{style}]{ch.kind}[/]" if style else ch.kind
        now = ch.current.label if ch.current else "-"
        if applied and ch.result:
            new = ch.result.label
        else:
            new = f"{ch.proposed.version} (new)" if ch.proposed else "-"
        if ch.kind in ("unchanged", "metadata", "removed"):
            version = now
        else:
            version = new if now in ("-", new) else f"{now} -> {new}"
        table.add_row(ch.name, kind, version, "yes" if ch.breaking else "no", "\n".join(ch.reasons) or "-")
    return table


def _summary(changes: list[Change]) -> str:
    counts: dict[str, int] = {}
    for ch in changes:
        counts[ch.kind] = counts.get(ch.kind, 0) + 1
    order = ("new", "breaking", "additive", "metadata", "unchanged", "removed")
    text = ", ".join(f"{counts[k]} {k}" for k in order if k in counts) or "nothing to do"
    breaking = [ch.name for ch in changes if ch.breaking]
    return text + (f"; breaking: {', '.join(breaking)}" if breaking else "")


def _versions_table(rows: list[ViewVersion]) -> Table:
    """Versions with their status history in one column; fits 80 columns."""
    table = Table(title="feature view versions")
    table.add_column("version", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("topic, description", overflow="fold")
    styles = {"active": "green", "deprecated": "yellow", "retired": "dim"}
    for v in rows:
        lines = [f"[{styles[v.status]}]{v.status}[/]" if v.status in styles else v.status]
        if v.retire_after:
            lines.append(f"retire after {_day(v.retire_after)}")
        if v.deprecated_at and v.status != "deprecated":
            lines.append(f"deprecated {_day(v.deprecated_at)}")
        elif v.deprecated_at:
            lines.append(f"since {_day(v.deprecated_at)}")
        if v.retired_at:
            lines.append(f"retired {_day(v.retired_at)}")
        about = "\n".join(x for x in (v.source_topic, v.description, v.owner) if x)
        table.add_row(f"{v.label}\n[dim]{v.version_hash}[/]", "\n".join(lines), _day(v.created_at), about)
    return table


def _day(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d")


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return (
        value.strftime("%Y-%m-%d")
        if value.time() == datetime.min.time()
        else value.strftime("%Y-%m-%d %H:%M")
    )
