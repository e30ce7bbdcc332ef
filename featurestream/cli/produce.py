"""``featurestream produce``: publish events from a JSONL file or stdin (or synthetic ones).

Every line is validated by the stream's own decoder before it is sent (see
:class:`featurestream.producer.Producer`). By default the command stops at the first invalid line:
events are an ordered stream, so "every line before N was sent, nothing from N on" is a state
that is easy to resume from (fix line N, then ``tail -n +N FILE | featurestream produce ... -``),
while skipping lines would silently leave holes in the stream. ``--skip-invalid`` sends every
valid line and lists the others.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.errors import DefinitionError, FeaturestreamError

if TYPE_CHECKING:
    from engine.definitions import EventSource, FeatureView
    from featurestream.producer import InvalidEvent, Producer

console = Console()

_READ = 1 << 20  # bytes per read: a batch of lines validated by one decoder call
_SHOWN = 20  # invalid lines listed in the summary
_KEPT = 1_000  # invalid lines remembered (the rest are only counted)
_WS = b" \t\r\n"  # JSON whitespace
_CARD_FIELDS = (
    "user_id, card_id, merchant, category, amount (float), country, is_online (bool), ts (epoch ms)"
)


@dataclass
class _Outcome:
    """What a run sent and what it refused."""

    lines: int = 0
    invalid: list[tuple[int, InvalidEvent]] = field(default_factory=list)
    invalid_count: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    stopped_at: int | None = None

    def refuse(self, line: int, exc: InvalidEvent) -> None:
        self.invalid_count += 1
        self.reasons[exc.reason] += 1
        if len(self.invalid) < _KEPT:
            self.invalid.append((line, exc))


def _fail(exc: Exception, code: int = 2) -> typer.Exit:
    """Print why the command stops, without secrets, as exit ``code``."""
    from engine.redact import describe, redact_text

    text = redact_text(str(exc)) if isinstance(exc, FeaturestreamError) else describe(exc, chain=True)
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)
    return typer.Exit(code=code)


def _lines(stream: BinaryIO) -> Iterator[list[tuple[int, bytes]]]:
    """Batches of ``(line number, line)``, non-blank lines only, without their line ends.

    Each batch is what one read returned, so a slow pipe (``tail -f``) is sent line by line as it
    arrives while a file goes in large batches.
    """
    fd, number, tail = stream.fileno(), 0, b""
    while True:
        data = os.read(fd, _READ)
        if not data:
            break
        parts = (tail + data).split(b"\n")
        tail = parts.pop()
        batch = []
        for line in parts:
            number += 1
            line = line.strip(_WS)
            if line:
                batch.append((number, line))
        if batch:
            yield batch
    last = tail.strip(_WS)
    if last:
        yield [(number + 1, last)]


def _pick_source(views: list[FeatureView], name: str | None) -> tuple[EventSource, list[FeatureView]]:
    """The source called ``name`` (the first view's without a name) and the views that read it."""
    if name is None:
        name = views[0].source.name
    readers = [v for v in views if v.source.name == name]
    if not readers:
        known = sorted({v.source.name for v in views})
        raise DefinitionError(f"the pipeline has no source {name!r}; its sources: {known}")
    return readers[0].source, readers


def _keys(readers: list[FeatureView], key: list[str] | None) -> tuple[tuple[str, ...], str]:
    """Key fields (``--key``, else the join keys of the first view reading the source), and why."""
    if key:
        return tuple(key), "--key"
    first = readers[0]
    others = sorted({v.entity.join_keys for v in readers} - {first.entity.join_keys})
    note = f"entity of view {first.name}"
    if others:
        note += f"; other views key by {', '.join('|'.join(k) for k in others)}: use --key to choose"
    return first.entity.join_keys, note


def _progress(total: int | None) -> Progress:
    return Progress(
        TextColumn("sending"),
        BarColumn(),
        TaskProgressColumn() if total else TextColumn(""),
        TextColumn("{task.fields[lines]:,} lines, {task.fields[invalid]:,} invalid"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _send_file(producer: Producer, path: str, skip_invalid: bool) -> _Outcome:
    """Validate and send each line of ``path`` (``-``: stdin) with a progress bar."""
    out = _Outcome()
    stream: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb", buffering=0)
    try:
        size = os.fstat(stream.fileno()).st_size if path != "-" else 0
        with _progress(size or None) as progress:
            task = progress.add_task("send", total=size or None, lines=0, invalid=0)
            for batch in _lines(stream):
                values = [line for _, line in batch]
                bad = producer.send_json(values, stop_at_invalid=not skip_invalid)
                for j, exc in bad:
                    out.refuse(batch[j][0], exc)
                if bad and not skip_invalid:
                    out.stopped_at = batch[bad[0][0]][0]
                    out.lines += bad[0][0]
                    break
                out.lines += len(batch)
                progress.update(
                    task,
                    completed=stream.tell() if size else None,
                    lines=out.lines,
                    invalid=out.invalid_count,
                )
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    return out


def _send_synthetic(producer: Producer, events: int, users: int, skip_invalid: bool) -> _Outcome:
    """Synthetic card transactions (the demo's generator) over the last two hours; event ``n``
    counts as line ``n``."""
    from featurestream.synthetic import card_transactions

    out = _Outcome()
    now = int(datetime.now(UTC).timestamp() * 1000)
    batch: list[bytes] = []
    with _progress(events) as progress:
        task = progress.add_task("send", total=events, lines=0, invalid=0)
        for ev in card_transactions(events, users, end_ms=now):
            batch.append(ev.value)
            if len(batch) < 10_000 and out.lines + len(batch) < events:
                continue
            bad = producer.send_json(batch, stop_at_invalid=not skip_invalid)
            for j, exc in bad:
                out.refuse(out.lines + j + 1, exc)
            if bad and not skip_invalid:
                out.stopped_at = out.lines + bad[0][0] + 1
                out.lines += bad[0][0]
                break
            out.lines += len(batch)
            batch = []
            progress.update(task, completed=out.lines, lines=out.lines, invalid=out.invalid_count)
    return out


def _summary(producer: Producer, out: _Outcome, origin: str) -> None:
    console.print(
        f"sent {producer.sent:,} events to topic {escape(producer.topic)} from {escape(origin)}: "
        f"delivered {producer.delivered:,}, failed {producer.failed:,}",
        soft_wrap=True,
    )
    if not out.invalid_count:
        return
    by_reason = ", ".join(f"{r} {n:,}" for r, n in out.reasons.most_common())
    console.print(f"[yellow]invalid lines: {out.invalid_count:,}[/] ({by_reason}), not sent", soft_wrap=True)
    table = Table("line", "field", "reason", "detail")
    for line, exc in out.invalid[:_SHOWN]:
        table.add_row(str(line), escape(exc.field), exc.reason, escape(exc.detail))
    console.print(table)
    if out.invalid_count > _SHOWN:
        console.print(f"... and {out.invalid_count - _SHOWN:,} more invalid lines")


def produce(
    pipeline: Annotated[Path, typer.Argument(help="pipeline file defining the source")],
    source: Annotated[
        str | None, typer.Argument(help="name of the event source (default with --synthetic: the first)")
    ] = None,
    file: Annotated[
        str | None, typer.Argument(metavar="FILE.jsonl", help="one JSON event per line; - reads stdin")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="send every valid line and list the invalid ones")
    ] = False,
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="key field (repeat for a composite key); default: the entity's join keys"),
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="create a missing topic with this many partitions")
    ] = None,
    synthetic: Annotated[
        int | None,
        typer.Option("--synthetic", "--events", min=0, help="publish N synthetic card transactions instead"),
    ] = None,
    users: Annotated[int, typer.Option(min=1, help="distinct users of --synthetic")] = 5_000,
) -> None:
    """Validate events against a source's schema and publish them to its topic.

    Stops at the first invalid line (nothing from it on is sent) unless --skip-invalid. Blank
    lines are skipped.

    Exit 0 when every sent event was delivered, 1 on an invalid line (without --skip-invalid) or
    an undelivered event, 2 on an error.
    """
    from featurestream.config import Settings
    from featurestream.producer import Producer
    from featurestream.runtime import load_views

    if (file is None) == (synthetic is None):
        console.print(
            "[bold red]error:[/] give either a FILE.jsonl to publish (- for stdin) or --synthetic N, "
            "e.g. `featurestream produce pipeline.py transactions events.jsonl`",
            soft_wrap=True,
        )
        raise typer.Exit(code=2)
    if file is not None and file != "-" and not Path(file).is_file():
        raise _fail(FileNotFoundError(f"{file} does not exist; give a JSONL file, or - to read stdin"))
    try:
        src, readers = _pick_source(load_views(pipeline), source)
        keys, why = _keys(readers, key)
        if partitions is None and synthetic is not None:
            partitions = 4
        with Producer(src, key_fields=keys, settings=Settings(), partitions=partitions) as producer:
            console.print(
                f"source {src.name} -> topic {escape(src.topic)}, keyed by {'|'.join(keys)} ({escape(why)})",
                soft_wrap=True,
            )
            if synthetic is not None:
                out = _send_synthetic(producer, synthetic, users, skip_invalid)
            else:
                assert file is not None
                out = _send_file(producer, file, skip_invalid)
            producer.flush()
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    origin = "stdin" if file == "-" else str(file)
    if synthetic is not None:
        origin = f"{synthetic:,} synthetic events"
    _summary(producer, out, origin)
    if out.stopped_at is not None:
        if synthetic is not None:
            hint = (
                f"synthetic card transactions have the fields {_CARD_FIELDS} and fit sources whose "
                "fields are among them; pick such a source, or --skip-invalid"
            )
        else:
            again = f"tail -n +{out.stopped_at} {file} | " if file != "-" else ""
            hint = (
                f"lines before it were sent, none from it on. Fix it and resume from it: {again}"
                f"featurestream produce {pipeline} {src.name} -  (or pass --skip-invalid to send "
                "every valid line)"
            )
        console.print(f"[bold red]stopped at line {out.stopped_at}[/]: {escape(hint)}", soft_wrap=True)
        raise typer.Exit(code=1)
    if producer.failed:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add ``produce`` to the ``featurestream`` app."""
    app.command()(produce)
