"""``featurestream cdc``: change sources that publish Debezium-format events to Kafka."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from engine.errors import FeaturestreamError

console = Console()
cdc_app = typer.Typer(
    no_args_is_help=True, help="Change data capture to Kafka in Debezium's format (without Kafka Connect)."
)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""
    app.add_typer(cdc_app, name="cdc")


@cdc_app.command("postgres")
def postgres(
    dsn: Annotated[str, typer.Option(help="PostgreSQL URL or conninfo (wal_level=logical)")],
    tables: Annotated[list[str], typer.Option(help="tables to capture: schema.table[,schema.table...]")],
    slot: Annotated[str, typer.Option(help="logical replication slot (created on first start)")] = (
        "featurestream_cdc"
    ),
    publication: Annotated[str, typer.Option(help="publication (created or extended)")] = "featurestream_cdc",
    topic_prefix: Annotated[str, typer.Option(help="topics are <prefix>.<schema>.<table>")] = "featurestream",
    schemas: Annotated[
        bool, typer.Option(help="wrap key and value as {schema, payload} (schemas.enable=true)")
    ] = False,
    set_replica_identity: Annotated[
        bool, typer.Option(help="set REPLICA IDENTITY FULL on the tables (full before images)")
    ] = False,
    partitions: Annotated[int, typer.Option(min=1, help="partitions of topics it creates")] = 1,
) -> None:
    """Snapshot the tables, then stream their changes from a replication slot to Kafka, until
    SIGTERM or SIGINT (which finishes the current transaction, flushes and acknowledges)."""
    from connectors.postgres_cdc import CdcConfig, PostgresChangeSource, parse_tables
    from featurestream.cli.core import _fail
    from featurestream.config import Settings
    from featurestream.local.services import ensure_services

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        console.print(f"{signal.Signals(signum).name}: finishing the current transaction and flushing")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        settings = Settings()
        kafka = settings.kafka_bootstrap_servers or ensure_services(settings).kafka_bootstrap_servers
        config = CdcConfig(
            dsn=dsn,
            tables=parse_tables(tables),
            kafka_bootstrap_servers=kafka,
            slot=slot,
            publication=publication,
            topic_prefix=topic_prefix,
            kafka_config=settings.kafka_config,
            schemas=schemas,
            set_replica_identity=set_replica_identity,
            partitions=partitions,
        )
        PostgresChangeSource(config, echo=lambda line: console.print(escape(line), soft_wrap=True)).run(stop)
    except FeaturestreamError as exc:
        raise _fail(exc) from None
    except Exception as exc:  # not one of ours: say why, without secrets
        raise _fail(exc, code=1) from None
