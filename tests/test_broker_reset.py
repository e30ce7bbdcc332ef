"""A broker that lost its data, or a recreated topic, is noticed: the worker stops with the fix
instead of skipping new events or dropping them as replays; `featurestream reset` then lets a
rerun store the new events exactly. Kafka client settings reach every client, secrets redacted.

These tests restart their broker, so they use their own (not the session's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.delta_store import DeltaOfflineStore
from connectors.kafka import PartitionReader, TopicChangedError, topic_id
from engine.definitions import FeatureView
from featurestream.client import FeatureStore
from featurestream.local.ephemeral import EphemeralServices
from featurestream.local.services import _free_port
from featurestream.runtime import load_views
from tests.support import (
    create_topic,
    make_runtime,
    pay_pipeline,
    produce,
    read_topic,
    run_views,
    unique,
    worker_env,
)

T0 = 1_700_000_000_000
CLI = [sys.executable, "-m", "featurestream.cli"]


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EphemeralServices]:
    with EphemeralServices(tmp_path_factory.mktemp("reset-services")) as eps:
        yield eps


def _events(n: int, amount: float, users: int = 20) -> list[dict]:
    return [{"user_id": f"u{i % users}", "amount": amount, "ts": T0 + i * 1000} for i in range(n)]


def _pipeline(tmp_path: Path, topic: str) -> tuple[Path, FeatureView]:
    path = tmp_path / "pay.py"
    path.write_text(pay_pipeline(topic, ("count", "sum")))
    return path, load_views(path)[0]


def _stored(tmp_path: Path, view: FeatureView) -> list[tuple[int, int, float]]:
    offline = DeltaOfflineStore(str(tmp_path / "delta"))
    table = offline.read(offline.table_uri(view.name, view.version))
    if table is None:
        return []
    cols = [table.column(c).to_pylist() for c in ("_partition", "_offset", "amount")]
    return sorted(zip(*cols, strict=True))


def _cause(exc: BaseException) -> TopicChangedError:
    """The error the dataflow raised, under Bytewax's wrapping."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, TopicChangedError):
        seen = seen.__cause__ or seen.__context__
    assert seen is not None, exc
    return seen


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=180)


def test_reader_refuses_a_position_past_the_end(own: EphemeralServices) -> None:
    """Offsets going backwards (no topic id needed): a stored position past the end stops the
    reader, while the exact end (a caught-up reader) is fine even where ListOffsets understates it."""
    topic = create_topic(own.kafka_bootstrap_servers, unique("short"), 1)
    produce(own.kafka_bootstrap_servers, topic, _events(120, 1.0))
    with pytest.raises(TopicChangedError) as err:
        PartitionReader(own.kafka_bootstrap_servers, topic, 0, 5_000)
    text = str(err.value)
    assert f"topic {topic!r} partition 0" in text
    assert "offset 5000" in text and "offsets 0 to 120" in text
    assert "featurestream reset" in text
    for position in (0, 119, 120):  # inside the last batch, and exactly at the end
        reader = PartitionReader(own.kafka_bootstrap_servers, topic, 0, position, stop_at_end=True)
        reader.close()


def test_recovered_worker_stops_on_a_reset_broker_and_reset_recomputes(
    own: EphemeralServices, tmp_path: Path
) -> None:
    topic = unique("pay")
    create_topic(own.kafka_bootstrap_servers, topic, 1)
    pipeline, view = _pipeline(tmp_path, topic)
    prefix = unique("reset")
    run = [
        "run",
        str(pipeline),
        "--bounded",
        "--recovery-dir",
        str(tmp_path / "rec"),
        "--snapshot-seconds",
        "1",
    ]
    produce(own.kafka_bootstrap_servers, topic, _events(3_000, 1.0))
    env = worker_env(own.kafka_bootstrap_servers, own.redis_url, tmp_path, prefix)
    first = _cli(run, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(_stored(tmp_path, view)) == 3_000
    old_id = topic_id(own.kafka_bootstrap_servers, topic)

    own.restart_kafka()  # memory storage: the broker comes back empty
    create_topic(own.kafka_bootstrap_servers, topic, 1)
    assert topic_id(own.kafka_bootstrap_servers, topic) not in (None, old_id)
    produce(own.kafka_bootstrap_servers, topic, _events(2_000, 5.0))
    env = worker_env(own.kafka_bootstrap_servers, own.redis_url, tmp_path, prefix)

    stopped = _cli(run, env)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, out
    assert f"topic {topic!r} partition 0 changed" in out, out
    assert "position 3000" in out and old_id in out  # what is stored, and of which topic
    assert "featurestream reset" in out
    assert len(_stored(tmp_path, view)) == 3_000  # nothing new written on stale positions

    reset = _cli(["reset", str(pipeline), "--recovery-dir", str(tmp_path / "rec"), "--yes"], env)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert "moved offline table" in reset.stdout and "recovery snapshot files" in reset.stdout

    again = _cli(run, env)
    assert again.returncode == 0, again.stdout + again.stderr
    stored = _stored(tmp_path, view)
    assert stored == [(0, i, 5.0) for i in range(2_000)]  # the new events, each once
    store = FeatureStore(
        [view], redis_url=own.redis_url, delta_uri=str(tmp_path / "delta"), redis_prefix=prefix
    )
    at = datetime.fromtimestamp((T0 + 2_000 * 1000) / 1000, UTC)
    online = store.get_online_features(["pay"], ["u0", "u1"], as_of=at)
    assert online.values["pay:events_count_1d"] == [100, 100]
    assert online.values["pay:amount_sum_1d"] == [500.0, 500.0]


def test_recreated_topic_is_not_dropped_as_replays_without_recovery(
    own: EphemeralServices, tmp_path: Path
) -> None:
    """Delta holds offsets 0..499 of the old topic; the new one has 800 events, so its offsets
    pass the stored ones: only the topic id tells them apart, and it does."""
    topic = unique("pay")
    create_topic(own.kafka_bootstrap_servers, topic, 1)
    _, view = _pipeline(tmp_path, topic)
    runtime = make_runtime(own.kafka_bootstrap_servers, own.redis_url, tmp_path, "replay")
    produce(own.kafka_bootstrap_servers, topic, _events(500, 1.0))
    run_views([view], runtime)
    assert len(_stored(tmp_path, view)) == 500

    own.restart_kafka()
    create_topic(own.kafka_bootstrap_servers, topic, 1)
    produce(own.kafka_bootstrap_servers, topic, _events(800, 7.0))
    runtime = runtime.model_copy(update={"kafka_bootstrap_servers": own.kafka_bootstrap_servers})
    with pytest.raises(Exception) as err:
        run_views([view], runtime)
    text = str(_cause(err.value))
    assert f"topic {topic!r} partition 0 changed" in text and "recorded for another topic id" in text
    assert "up to offset 499" in text
    assert len(_stored(tmp_path, view)) == 500  # not one new row dropped or mixed in

    env = {
        **worker_env(own.kafka_bootstrap_servers, own.redis_url, tmp_path, runtime.redis_prefix),
        "FEATURESTREAM_DELTA_URI": runtime.delta_uri,
    }
    pipeline = tmp_path / "pay.py"
    reset = _cli(["reset", str(pipeline), "--yes"], env)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    run_views([view], runtime)
    assert _stored(tmp_path, view) == [(0, i, 7.0) for i in range(800)]


def _services(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _cli(["services", *args], env)


def _generation(state: Path) -> str:
    return json.loads((state / "services.json").read_text())["kafka"]["generation"]


def test_memory_broker_restart_is_a_new_generation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "FEATURESTREAM_STATE_DIR": str(state)}
    for key in (
        "FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS",
        "FEATURESTREAM_REDIS_URL",
        "FEATURESTREAM_BROKER_STORAGE",
    ):
        env.pop(key, None)
    try:
        assert _services(env, "up").returncode == 0
        first = _generation(state)
        assert _services(env, "down").returncode == 0
        up = _services(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert _generation(state) != first
        assert f"generation {first} is gone" in up.stdout  # recognised as a new, empty broker
        status = _services(env, "status")
        assert "memory://" in status.stdout and _generation(state) in status.stdout
    finally:
        _services(env, "down")


@pytest.fixture
def s3_bucket() -> Iterator[tuple[str, dict[str, str]]]:
    """A bucket on a local S3 endpoint (moto's server) and the environment that reaches it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": "featurestream",
        "AWS_SECRET_ACCESS_KEY": "featurestream-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        bucket = unique("broker")
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/", env
    finally:
        server.stop()


def test_broker_storage_keeps_topics_across_services_down_and_up(
    tmp_path: Path, s3_bucket: tuple[str, dict[str, str]]
) -> None:
    storage, aws = s3_bucket
    state = tmp_path / "state"
    env = {
        **os.environ,
        **aws,
        "FEATURESTREAM_STATE_DIR": str(state),
        "FEATURESTREAM_BROKER_STORAGE": storage,
    }
    env.pop("FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS", None)
    try:
        assert _services(env, "up").returncode == 0
        first = _generation(state)
        kafka = json.loads((state / "services.json").read_text())["kafka"]["address"]
        topic = create_topic(kafka, unique("kept"), 2)
        produce(kafka, topic, _events(400, 3.0), key_field="user_id")
        assert _services(env, "down").returncode == 0
        up = _services(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert _generation(state) == first  # same storage: the same broker generation
        kafka = json.loads((state / "services.json").read_text())["kafka"]["address"]
        kept = read_topic(kafka, topic)  # every message, each once, after the restart
        assert sorted(json.loads(m.value())["ts"] for m in kept) == [T0 + i * 1000 for i in range(400)]
    finally:
        _services(env, "down")


def test_unsupported_broker_storage_is_a_clear_error_without_its_password(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FEATURESTREAM_STATE_DIR": str(tmp_path / "state"),
        "FEATURESTREAM_BROKER_STORAGE": "postgres://postgres:pg-s3cret-pw@127.0.0.1:5432/postgres",
    }
    env.pop("FEATURESTREAM_KAFKA_BOOTSTRAP_SERVERS", None)
    try:
        up = _services(env, "up")
        out = up.stdout + up.stderr
        assert up.returncode == 2, out
        assert "does not support that storage engine" in out and "FEATURESTREAM_BROKER_STORAGE" in out
        assert "pg-s3cret-pw" not in out
    finally:
        _services(env, "down")


def test_kafka_config_reaches_every_client_and_invalid_ones_are_named(
    own: EphemeralServices, tmp_path: Path
) -> None:
    topic = unique("cfg")
    pipeline, view = _pipeline(tmp_path, topic)
    client_id = unique("fs-client")
    config = {"client.id": client_id, "debug": "generic", "sasl.password": "never-shown-pw"}
    env = {
        **worker_env(own.kafka_bootstrap_servers, own.redis_url, tmp_path, unique("cfg")),
        "FEATURESTREAM_KAFKA_CONFIG": json.dumps(config),
    }
    produced = _cli(["produce", str(pipeline), "--events", "300", "--partitions", "1"], env)
    assert produced.returncode == 0, produced.stdout + produced.stderr
    assert f"{client_id}#producer" in produced.stderr  # librdkafka names each client in its log
    ran = _cli(["run", str(pipeline), "--bounded"], env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"{client_id}#consumer" in ran.stderr and f"{client_id}#producer" in ran.stderr
    assert len(_stored(tmp_path, view)) == 300
    for out in (produced, ran):
        assert "never-shown-pw" not in out.stdout + out.stderr

    bad = {**env, "FEATURESTREAM_KAFKA_CONFIG": json.dumps({"no.such.option": 1, "sasl.password": "pw-9x"})}
    failed = _cli(["run", str(pipeline), "--bounded"], bad)
    out = failed.stdout + failed.stderr
    assert failed.returncode == 2, out
    assert "no.such.option" in out and "FEATURESTREAM_KAFKA_CONFIG" in out
    assert "pw-9x" not in out
