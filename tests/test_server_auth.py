"""API keys on the feature server over real HTTP: 401 and 403, revocation and expiry, the audit of
every decision, secrets kept out of logs and metrics, and --no-auth."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from registry.core import Registry
from registry.keys import access_audit_log, create_key, revoke_key
from tests.conftest import Services
from tests.server_helpers import (
    Server,
    clicks_view,
    payment_events,
    serve,
    server_env,
    spend_view,
    wait_for,
    write_pipeline,
)
from tests.support import create_topic, make_runtime, produce, run_views, unique

SPEND = {"features": ["spend:amount_sum"], "entities": {"user_id": ["u1"]}}
CLICKS = {"features": ["clicks"], "entities": {"user_id": ["u1"], "page": [1]}}


@dataclass
class World:
    server: Server
    registry: Registry
    admin: str
    reader: str  # reads spend only
    reader_id: str
    pipeline: Path
    env: dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
def world(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("server-auth")
    topic = create_topic(services.kafka, unique("pay"), 1)
    clicks_topic = create_topic(services.kafka, unique("clicks"), 1)
    produce(services.kafka, topic, payment_events(int(time.time() * 1000)), key_field="user_id")
    runtime = make_runtime(services.kafka, services.redis_url, tmp, "auth")
    run_views([spend_view(topic)], runtime)
    registry_url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(registry_url)
    _, admin = create_key(reg, "admin", read=["*"], produce=["*"])
    reader_key, reader = create_key(reg, "spend-reader", read=["spend"])
    env = server_env(services.kafka, services.redis_url, runtime.redis_prefix, registry_url, tmp / "state")
    pipeline = write_pipeline(tmp, topic, clicks_topic)
    assert clicks_view(clicks_topic).name == "clicks"
    with serve(pipeline, env, tmp / "server.log", "--refresh-seconds", "0.5") as server:
        yield World(server, reg, admin, reader, reader_key.id, pipeline, env, tmp)
    reg.close()


def _read(world: World, body: dict, key: str | None = None, **kw) -> object:  # type: ignore[no-untyped-def]
    return world.server.post("/features/online", key, json=body, **kw)


def _decisions(world: World, **filters: object) -> list:  # type: ignore[type-arg]
    return access_audit_log(world.registry, **filters)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed_key"),
        ({"Authorization": "Bearer not-a-key"}, "malformed_key"),
        ({"Authorization": "Bearer fsk_aaaaaaaaaaaa_" + "A" * 43}, "unknown_key"),
    ],
)
def test_requests_without_a_valid_key_get_401(world: World, headers: dict[str, str], reason: str) -> None:
    resp = world.server.post("/features/online", json=SPEND, headers=headers)
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"].startswith("Bearer")
    err = resp.json()
    assert err["error"] == "unauthorized" and err["field"] == "Authorization" and "keys create" in err["fix"]
    assert world.server.get("/features/spend/u1", headers=headers).status_code == 401
    assert world.server.post("/push/payments", json={}, headers=headers).status_code == 401

    def recorded() -> set[tuple[str, tuple[str, ...]]]:
        return {(r.action, r.resources) for r in _decisions(world, allowed=False) if r.reason == reason}

    wait_for(lambda: {("read", ("spend",)), ("produce", ("payments",))} <= recorded())


def test_a_wrong_secret_is_refused_like_an_unknown_key(world: World) -> None:
    wrong = world.reader[:-4] + ("AAAA" if not world.reader.endswith("AAAA") else "BBBB")
    resp = _read(world, SPEND, wrong)
    assert resp.status_code == 401 and world.reader_id in resp.json()["message"]
    assert wrong not in resp.text
    rows = wait_for(lambda: _decisions(world, key_id=world.reader_id, allowed=False))
    assert any(r.reason == "wrong_secret" for r in rows)


def test_scopes_allow_and_forbid_per_view_and_source(world: World) -> None:
    assert _read(world, SPEND, world.reader).status_code == 200
    assert world.server.get("/features/spend/u1", world.reader).status_code == 200
    assert world.server.get("/features/spend/u1", headers={"X-API-Key": world.reader}).status_code == 200
    for body in (CLICKS, {**CLICKS, "features": ["spend:amount_sum", "clicks"]}):
        resp = _read(world, body, world.reader)
        assert resp.status_code == 403, resp.text
        err = resp.json()
        assert err["error"] == "forbidden" and "'clicks'" in err["message"] and "--read clicks" in err["fix"]
    assert world.server.get("/features/clicks/u1%7C1", world.reader).status_code == 403
    push = world.server.post("/push/payments", world.reader, json={"user_id": "u9", "amount": 1.0, "ts": 1})
    assert push.status_code == 403 and "--produce payments" in push.json()["fix"]
    # Unknown names are listed only from what the key may read.
    unknown = _read(world, {**SPEND, "features": ["nope"]}, world.reader).json()
    assert "spend" in unknown["fix"] and "clicks" not in unknown["fix"]
    assert _read(world, CLICKS, world.admin).status_code == 200
    rows = wait_for(
        lambda: [r for r in _decisions(world, key_id=world.reader_id) if r.reason == "out_of_scope"]
    )
    assert {r.resources for r in rows} >= {("clicks",), ("spend", "clicks"), ("payments",)}
    allowed = _decisions(world, key_id=world.reader_id, allowed=True)
    assert all(r.resources == ("spend",) and r.client == "127.0.0.1" for r in allowed)
    assert sum(r.count for r in allowed) == 3


def test_every_decision_is_counted_in_the_audit(world: World) -> None:
    key, secret = create_key(world.registry, "burst", read=["spend"])
    for _ in range(40):
        assert _read(world, SPEND, secret).status_code == 200
    rows = wait_for(lambda: (r := _decisions(world, key_id=key.id)) and sum(x.count for x in r) == 40 and r)
    assert len(rows) < 40  # identical decisions of one flush interval share a row
    assert all(r.allowed and r.reason == "ok" and r.last_at >= r.at for r in rows)


def test_revoked_key_is_refused_within_the_refresh_interval(world: World) -> None:
    key, secret = create_key(world.registry, "to-revoke", read=["spend"])
    assert _read(world, SPEND, secret).status_code == 200  # a new key works at once
    revoke_key(world.registry, key.id)
    resp = wait_for(lambda: (r := _read(world, SPEND, secret)).status_code == 401 and r, timeout=10)
    assert "was revoked" in resp.json()["message"]
    assert wait_for(lambda: [r for r in _decisions(world, key_id=key.id) if r.reason == "revoked"])


def test_expired_key_is_refused(world: World) -> None:
    key, secret = create_key(world.registry, "short-lived", read=["spend"], expires_in=timedelta(seconds=2))
    assert _read(world, SPEND, secret).status_code == 200
    time.sleep(2.1)
    resp = _read(world, SPEND, secret)
    assert resp.status_code == 401 and "expired" in resp.json()["message"]
    assert wait_for(lambda: [r for r in _decisions(world, key_id=key.id) if r.reason == "expired"])


def test_no_key_or_secret_in_logs_or_metrics(world: World) -> None:
    _read(world, SPEND, world.admin)
    _read(world, SPEND, world.reader[:-1] + "x")
    metrics = world.server.get("/metrics").text
    assert (
        'featurestream_server_access_decisions_total{action="read",allowed="false",reason="wrong_secret"}'
        in (metrics)
    )
    for secret in (world.admin, world.reader):
        for text in (metrics, world.server.log_text()):
            assert secret not in text and secret.rsplit("_", 1)[1] not in text
    assert world.reader_id not in metrics


def test_no_auth_serves_everyone_with_a_warning_and_no_audit(world: World) -> None:
    wait_for(lambda: "featurestream_server_audit_pending 0.0" in world.server.get("/metrics").text)
    before = len(_decisions(world, limit=100_000))
    with serve(world.pipeline, world.env, world.tmp / "noauth.log", "--no-auth") as open_server:
        resp = open_server.post("/features/online", json=SPEND)
        assert resp.status_code == 200, resp.text
        assert open_server.get("/readyz").json()["checks"] == {"redis": "ok", "registry": "ok"}
        schema = open_server.get("/openapi.json").json()
        assert schema["paths"]["/features/online"]["post"]["security"] == []
        log = open_server.log_text()
    assert "API keys are OFF" in log and "local development" in log
    time.sleep(1)
    assert len(_decisions(world, limit=100_000)) == before
