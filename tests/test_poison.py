"""Poison messages: no message stops the worker, and every dead letter reaches its topic.

A corpus of hostile messages (encodings, depth, size, numbers, timestamps, keys, structure; see
``tests/poison_helpers.py``) mixed into good traffic runs through the real dataflow on real Kafka,
Redis and Delta: each bad message is dead-lettered once with its reason, each good event is
stored and counted as a pandas/numpy oracle computes it from the expected values, and the worker
exits normally, also across restarts with a recovery directory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import Producer

from connectors.dead_letters import DeadLetterProducer
from connectors.delta_store import DeltaOfflineStore
from connectors.kafka import ensure_topic
from engine.dataflow import RuntimeConfig
from engine.decode import DeadLetter
from engine.errors import ServiceUnavailable
from featurestream.client import FeatureStore
from featurestream.local.processes import _free_port, _kafka_command, _kafka_env, _port_open, _tansu_bin
from featurestream.runtime import load_views
from tests.conftest import Services
from tests.pipeline_faults_helpers import check_against_oracle, delta_positions
from tests.poison_helpers import BIG, Item, entity_of, poison_view, stream
from tests.support import headers, read_topic, run_views, unique, worker_env

BOUND = DeadLetterProducer.MAX_VALUE_BYTES
KEY_BOUND = DeadLetterProducer.MAX_KEY_BYTES


def _produce(bootstrap: str, topic: str, items: list[Item]) -> list[tuple[int, int]]:
    """Publish ``items`` to their partitions; returns each one's (partition, offset). The producer
    allows messages far over the usual 1 MB, as the broker does."""
    p = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "message.max.bytes": 20_000_000}
    )
    where: list[Any] = [None] * len(items)

    def done(n: int) -> Callable[[Any, Any], None]:
        return lambda err, msg: where.__setitem__(n, err or (msg.partition(), msg.offset()))

    for n, it in enumerate(items):
        p.produce(topic, value=it.value, key=it.key, partition=it.partition, on_delivery=done(n))
        p.poll(0)
    assert p.flush(60) == 0
    assert all(isinstance(w, tuple) for w in where), [w for w in where if not isinstance(w, tuple)]
    return where


def _check_dead_letters(
    dlq: list[Any], items: list[Item], where: list[tuple[int, int]], src: str, view: str
) -> None:
    """Each poison message is dead-lettered exactly once, with its reason, a detail naming its
    field, and its bytes (cut to the bound, with the original's size and hash, when longer)."""
    expected = {where[n]: it for n, it in enumerate(items) if it.poison is not None}
    seen: dict[tuple[int, int], str] = {}
    truncated = 0
    for m in dlq:
        h = headers(m)
        pos = (int(h["fs-partition"]), int(h["fs-offset"]))
        assert pos in expected, (pos, h)
        assert pos not in seen, f"dead-lettered twice: {h}"
        it = expected[pos]
        p = it.poison
        assert p is not None
        seen[pos] = h["fs-reason"]
        assert h["fs-reason"] == p.reason, (p.kind, h["fs-reason"], h["fs-detail"])
        assert h["fs-detail"].startswith(f"{p.field}: "), (p.kind, h["fs-detail"])
        assert (h["fs-topic"], h["fs-view"]) == (src, view)
        original, value = p.value or b"", m.value() or b""
        if len(original) > BOUND:
            truncated += 1
            assert h["fs-truncated"] == "true"
            assert value == original[:BOUND], (len(value), len(original), h)
            assert h["fs-original-size"] == str(len(original))
            assert h["fs-original-sha256"] == hashlib.sha256(original).hexdigest()
        else:
            assert value == original, p.kind
            assert "fs-original-size" not in h
        if p.key is not None and len(p.key) > KEY_BOUND:
            assert h["fs-truncated"] == "true"
            assert m.key() == p.key[:KEY_BOUND]
            assert h["fs-original-key-size"] == str(len(p.key))
            assert h["fs-original-key-sha256"] == hashlib.sha256(p.key).hexdigest()
        else:
            assert (m.key() or b"") == (p.key or b""), p.kind
        if len(original) <= BOUND and (p.key is None or len(p.key) <= KEY_BOUND):
            assert "fs-truncated" not in h
    assert Counter(seen.values()) == Counter(it.poison.reason for it in expected.values() if it.poison)
    assert len(dlq) == len(expected)
    assert truncated >= 3  # the multi-megabyte ones and the one just over the bound


def _good_frame(items: list[Item], where: list[tuple[int, int]]) -> pd.DataFrame:
    rows = [
        {**it.good, "entity": entity_of(it.good), "partition": where[n][0], "offset": where[n][1]}
        for n, it in enumerate(items)
        if it.good is not None
    ]
    return pd.DataFrame(rows)


def test_poison_corpus_through_the_dataflow(
    services: Services, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(2)
    view = poison_view(src)
    items = stream(BOUND)
    kinds = {it.poison.kind for it in items if it.poison is not None}
    assert len(kinds) >= 40
    assert any(it.value is not None and BOUND < len(it.value) and len(it.value) >= BIG for it in items)
    where = _produce(services.kafka, src, items)

    run_views([view], runtime)  # returns: the worker ended normally

    _check_dead_letters(read_topic(services.kafka, f"{src}.dlq"), items, where, src, view.name)
    good = _good_frame(items, where)
    assert len(good) == sum(it.good is not None for it in items) > 250
    assert delta_positions(view, runtime) == sorted(zip(good["partition"], good["offset"], strict=True))
    keys = good.drop_duplicates("entity")
    rows = [{"user_id": u, "shop": s} for u, s in zip(keys["user_id"], keys["shop"], strict=True)]
    assert check_against_oracle(view, runtime, good, rows, keys["entity"].tolist()) > 1000


PIPELINE = """
from featurestream import Aggregation, Entity, EventSource, FeatureView, Field

source = EventSource(
    name="pay", topic="{topic}", timestamp_field="ts",
    fields=(Field(name="user_id", dtype="str"), Field(name="shop", dtype="int"),
            Field(name="amount", dtype="float")),
)
views = [FeatureView(
    name="pay", entity=Entity(name="buyer", join_keys=("user_id", "shop")), source=source,
    aggregations=(
        Aggregation(function="count", window="1d"),
        Aggregation(function="sum", column="amount", window="1d"),
    ),
    tile_size="1m", allowed_lateness="1d",
)]
"""


def _run_worker(pipeline: Path, recovery: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "featurestream.cli", "run", str(pipeline), "--bounded",
           "--recovery-dir", str(recovery), "--snapshot-seconds", "1"]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)


def test_poison_corpus_across_restarts_with_recovery(
    services: Services, topic: Callable[..., str], tmp_path: Path
) -> None:
    """Two bounded runs with a recovery directory, each over half the corpus: both exit 0, and
    the second resumes where the first stopped (nothing dead-lettered or stored twice)."""
    name = topic(2)
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(PIPELINE.format(topic=name))
    view = load_views(pipeline)[0]
    prefix = unique("poison")
    env = worker_env(services.kafka, services.redis_url, tmp_path, prefix)
    items = stream(BOUND, n_good=120, seed=1)
    half = len(items) // 2
    where = _produce(services.kafka, name, items[:half])
    first = _run_worker(pipeline, tmp_path / "rec", env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    where += _produce(services.kafka, name, items[half:])
    second = _run_worker(pipeline, tmp_path / "rec", env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    _check_dead_letters(read_topic(services.kafka, f"{name}.dlq"), items, where, name, view.name)
    good = _good_frame(items, where)
    offline = DeltaOfflineStore(str(tmp_path / "delta"))
    stored = offline.read(offline.table_uri(view.name, view.version))
    pairs = sorted(
        zip(stored.column("_partition").to_pylist(), stored.column("_offset").to_pylist(), strict=True)
    )
    assert pairs == sorted(zip(good["partition"], good["offset"], strict=True))
    store = FeatureStore(
        [view], redis_url=services.redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix
    )
    per = good.groupby("entity").agg(user_id=("user_id", "first"), shop=("shop", "first"), n=("ts", "size"),
                                     total=("amount", "sum"))  # fmt: skip
    at = datetime.fromtimestamp((int(good["ts"].max()) + 1) / 1000, UTC)
    rows = [{"user_id": u, "shop": s} for u, s in zip(per["user_id"], per["shop"], strict=True)]
    online = store.get_online_features(["pay"], rows, as_of=at)
    assert online.values["pay:events_count_1d"] == per["n"].tolist()
    assert all(
        abs(a - b) < 1e-9 for a, b in zip(online.values["pay:amount_sum_1d"], per["total"], strict=True)
    )


# ---------------------------------------------------------------------------------------------
# The dead-letter producer alone, against a real broker.
# ---------------------------------------------------------------------------------------------


def _letter(value: bytes | None, key: bytes | None = None, offset: int = 0) -> DeadLetter:
    return DeadLetter("src", 0, offset, key, value or b"", "malformed_json", "(message): test")


def test_long_letters_are_cut_with_size_and_hash(services: Services, topic: Callable[..., str]) -> None:
    dlq = topic(1)
    producer = DeadLetterProducer(services.kafka, max_value_bytes=1000, max_key_bytes=100)
    long_value, long_key = os.urandom(5000), os.urandom(300)
    producer.send(dlq, _letter(long_value, long_key, 0), "v")
    producer.send(dlq, _letter(b"x" * 1000, b"k" * 100, 1), "v")
    producer.flush()
    cut, whole = sorted(read_topic(services.kafka, dlq), key=lambda m: int(headers(m)["fs-offset"]))
    h = headers(cut)
    assert (cut.value(), cut.key()) == (long_value[:1000], long_key[:100])
    assert h["fs-truncated"] == "true"
    assert (h["fs-original-size"], h["fs-original-key-size"]) == ("5000", "300")
    assert h["fs-original-sha256"] == hashlib.sha256(long_value).hexdigest()
    assert h["fs-original-key-sha256"] == hashlib.sha256(long_key).hexdigest()
    assert (whole.value(), whole.key()) == (b"x" * 1000, b"k" * 100)
    assert "fs-truncated" not in headers(whole)


def test_a_letter_the_client_refuses_is_sent_as_headers_only(
    services: Services, topic: Callable[..., str]
) -> None:
    """Bounds above the producer's message.max.bytes: the long letter is refused as too large
    and replaced by a minimal one; its neighbours are delivered as they are."""
    dlq = topic(1)
    producer = DeadLetterProducer(services.kafka, {"message.max.bytes": 20_000}, max_value_bytes=50_000)
    big = os.urandom(40_000)
    producer.send(dlq, _letter(b"before", offset=0), "v")
    producer.send(dlq, _letter(big, b"key", offset=1), "v")
    producer.send(dlq, _letter(b"after", offset=2), "v")
    producer.flush()
    got = {int(headers(m)["fs-offset"]): m for m in read_topic(services.kafka, dlq)}
    assert sorted(got) == [0, 1, 2]
    assert (got[0].value(), got[2].value()) == (b"before", b"after")
    minimal = got[1]
    h = headers(minimal)
    assert (minimal.value(), minimal.key()) == (None, None)
    assert (h["fs-reason"], h["fs-offset"], h["fs-truncated"]) == ("malformed_json", "1", "true")
    assert h["fs-original-size"] == "40000"
    assert h["fs-original-sha256"] == hashlib.sha256(big).hexdigest()
    assert h["fs-original-key-size"] == "3"


def test_dead_letters_wait_out_a_broker_outage(tmp_path: Path) -> None:
    """The broker is down when letters are sent and their delivery times out; the producer
    retries them until a broker is up, and flush returns once they are delivered."""
    port = _free_port()
    bootstrap = f"127.0.0.1:{port}"
    fast = {"message.timeout.ms": 1500, "reconnect.backoff.max.ms": 300}
    producer = DeadLetterProducer(bootstrap, fast, backoff=(0.2, 1.0))
    broker: list[subprocess.Popen[bytes]] = []

    def start_broker() -> None:
        time.sleep(3)  # delivery times out first
        log = (tmp_path / "tansu.log").open("wb")
        env = {**os.environ, **_kafka_env(None)}
        broker.append(subprocess.Popen(_kafka_command(_tansu_bin(), port), env=env, stdout=log, stderr=log))
        deadline = time.monotonic() + 15
        while not _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        ensure_topic(bootstrap, "letters", 1)

    starter = threading.Thread(target=start_broker)
    try:
        for i in range(3):
            producer.send("letters", _letter(f"bad-{i}".encode(), offset=i), "v")
        starter.start()
        began = time.monotonic()
        producer.flush()
        assert time.monotonic() - began > 2.5  # it did wait for the broker
        starter.join()
        got = read_topic(bootstrap, "letters")
        assert sorted({(headers(m)["fs-offset"], m.value()) for m in got}) == [
            ("0", b"bad-0"),
            ("1", b"bad-1"),
            ("2", b"bad-2"),
        ]
    finally:
        if starter.ident is not None:
            starter.join()
        for proc in broker:  # in-memory and private to this test: nothing to shut down cleanly
            proc.kill()
            proc.wait(10)


def test_a_stop_request_ends_the_retries_after_the_grace() -> None:
    """With the broker gone for good, a stop request makes flush give up after its grace period
    rather than hang the worker's shutdown."""
    stop = threading.Event()
    bootstrap = f"127.0.0.1:{_free_port()}"
    producer = DeadLetterProducer(
        bootstrap, {"message.timeout.ms": 500}, stop=stop, grace=1.0, backoff=(0.1, 0.2)
    )
    producer.send("letters", _letter(b"bad"), "v")
    stop.set()
    began = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="after the stop request"):
        producer.flush()
    assert 1.0 <= time.monotonic() - began < 10
