"""The demo: embedded services, a synthetic card stream, the pipeline, and what it produced."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
from confluent_kafka import Producer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from connectors.kafka import PartitionReader, ensure_topic
from engine.dataflow import build_dataflow, run_dataflow
from engine.metrics import DEAD_LETTERS, EVENTS_IN, total
from engine.redact import redact_url
from featurestream.config import Settings
from featurestream.local.services import embedded_status, stop_embedded
from featurestream.runtime import feature_store, runtime_config
from featurestream.synthetic import card_transactions
from pipelines.transactions import user_spend


def run_demo(events: int, users: int, partitions: int, keep_services: bool, console: Console) -> None:
    settings = Settings()
    already = {k for k, v in embedded_status(settings).items() if v.get("answers")}
    console.rule("[bold]featurestream demo")
    runtime = runtime_config(settings, stop_at_end=True)
    console.print(
        f"Kafka  {runtime.kafka_bootstrap_servers}\nRedis  {redact_url(runtime.redis_url)}\n"
        f"Delta  {redact_url(runtime.delta_uri)}"
    )
    run_id = uuid.uuid4().hex[:8]
    source = user_spend.source.model_copy(update={"topic": f"demo-transactions-{run_id}"})
    view = user_spend.model_copy(update={"source": source})
    ensure_topic(runtime.kafka_bootstrap_servers, source.topic, partitions)
    ensure_topic(runtime.kafka_bootstrap_servers, source.dlq_topic, 1)
    now_ms = int(time.time() * 1000)
    kinds: Counter[str] = Counter()
    active: Counter[bytes] = Counter()
    producer = Producer({"bootstrap.servers": runtime.kafka_bootstrap_servers, "linger.ms": 20})
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("produce ", total=events)
        stream = card_transactions(
            events, users, end_ms=now_ms, malformed_rate=0.002, late_rate=0.002, seed=int(now_ms % 10_000)
        )
        for i, ev in enumerate(stream, 1):
            producer.produce(source.topic, key=ev.key, value=ev.value)
            kinds[ev.kind] += 1
            active[ev.key] += ev.kind == "ok"
            if i % 5_000 == 0:
                producer.poll(0)
                progress.update(task, completed=i)
        producer.flush(60)
        del producer  # closed now, so it does not log the broker going away when the demo stops it
        progress.update(task, completed=events)

        task = progress.add_task("pipeline", total=events)
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                progress.update(task, completed=int(total(EVENTS_IN, topic=source.topic)))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        run_dataflow(build_dataflow([view], runtime))
        elapsed = time.perf_counter() - started
        done.set()
        watcher.join()
        progress.update(task, completed=int(total(EVENTS_IN, topic=source.topic)))
    console.print(f"pipeline: {events:,} events in {elapsed:.1f} s ({events / elapsed:,.0f} events/s)")

    store = feature_store(view, settings=settings)
    top = [u.decode() for u, _ in active.most_common(3)]
    shown = [
        "events_count_10m",
        "amount_sum_10m",
        "amount_sum_1h",
        "amount_mean_1d",
        "amount_max_1d",
        "amount_last_1d",
        "online_tx_1h",
    ]
    online = store.get_online_features([f"{view.name}:{f}" for f in shown], top)
    table = Table(title="online features as of now (Redis)")
    table.add_column("feature")
    for u in top:
        table.add_column(u, justify="right")
    for f in shown:
        table.add_row(f, *[_fmt(v) for v in online.values[f"{view.name}:{f}"]])
    console.print(table)

    by_reason = {
        r: int(total(DEAD_LETTERS, view=view.name, reason=r))
        for r in ("malformed_json", "missing_field", "invalid_type", "bad_timestamp", "late")
    }
    published = _topic_size(runtime.kafka_bootstrap_servers, source.dlq_topic)
    console.print(
        f"dead letters: {published} on {source.dlq_topic} ("
        + ", ".join(f"{k} {v}" for k, v in by_reason.items() if v)
        + ")"
    )
    injected = sum(v for k, v in kinds.items() if k != "ok")
    if published != injected:
        console.print(f"[yellow]note: the generator injected {injected} bad or late events")

    rng = np.random.default_rng(1)
    when = [
        datetime.fromtimestamp(now_ms / 1000, UTC) - timedelta(minutes=int(m))
        for m in rng.integers(0, 120, 6)
    ]
    entity_df = pa.table(
        {
            "user_id": [top[i % len(top)] for i in range(6)],
            "event_timestamp": pa.array(when, pa.timestamp("ms", "UTC")),
        }
    )
    train = store.get_training_set(entity_df, [f"{view.name}:amount_sum_1h", f"{view.name}:events_count_1h"])
    table = Table(title="training set sample, point in time (Delta)")
    for name in train.column_names:
        table.add_column(name.split(":")[-1], justify="right")
    for row in train.to_pylist():
        table.add_row(*[_fmt(v) for v in row.values()])
    console.print(table)

    if not keep_services and not already:
        gc.collect()  # close every Kafka client first: librdkafka logs a broker that goes away
        stopped = stop_embedded(settings)
        if stopped:
            console.print("stopped the embedded services it started: " + "; ".join(stopped))
    console.rule("[bold green]done")


def _topic_size(bootstrap: str, topic: str) -> int:
    """Messages in a one-partition topic, counted by reading it."""
    reader = PartitionReader(bootstrap, topic, 0, None, stop_at_end=True)
    n, deadline = 0, time.monotonic() + 30
    try:
        while not reader.at_end and time.monotonic() < deadline:
            batch = reader.read(10_000, 0.5)
            n += len(batch.values) if batch else 0
    finally:
        reader.close()
    return n


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(v)
