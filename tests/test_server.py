"""The feature server over real HTTP: online reads (JSON, Arrow), vectors, versions, errors, docs,
health and metrics, against the test broker and Redis with features computed by a real dataflow."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from featurestream.client import FeatureStore
from registry.core import Registry
from registry.keys import create_key
from registry.versions import apply, deprecate, retire
from tests.conftest import Services
from tests.server_helpers import (
    CLI,
    MIN,
    Server,
    clicks_view,
    payment_events,
    serve,
    server_env,
    server_views,
    spend_view,
    write_pipeline,
)
from tests.support import create_topic, make_runtime, produce, run_views, unique

ARROW = "application/vnd.apache.arrow.stream"
USERS = ["u1", "u2", "u3", "u4"]


@dataclass
class World:
    server: Server
    store: FeatureStore
    key: str
    now_ms: int


@pytest.fixture(scope="module")
def world(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("server")
    topic = create_topic(services.kafka, unique("pay"), 2)
    clicks_topic = create_topic(services.kafka, unique("clicks"), 1)
    now = int(time.time() * 1000)
    produce(services.kafka, topic, payment_events(now), key_field="user_id")
    produce(
        services.kafka,
        clicks_topic,
        [{"user_id": "u1", "page": p, "ts": now - (p + 1) * MIN} for p in (3, 3, 4)],
    )
    registry_url = f"sqlite:///{tmp / 'registry.db'}"
    reg = Registry(registry_url)
    clicks = clicks_view(clicks_topic)
    apply(reg, [spend_view(topic, "2h"), clicks])  # spend@1, retired below
    apply(reg, [spend_view(topic, "3h"), clicks])  # spend@2, deprecated below
    apply(reg, server_views(topic, clicks_topic))  # spend@3: the served definition
    retire(reg, "spend", 1)
    deprecate(reg, "spend", 2)
    runtime = make_runtime(services.kafka, services.redis_url, tmp, "srv")
    run_views([spend_view(topic), spend_view(topic, "3h"), clicks], runtime)
    _, key = create_key(reg, "test-admin", read=["*"], produce=["*"])
    env = server_env(services.kafka, services.redis_url, runtime.redis_prefix, registry_url, tmp / "state")
    pipeline = write_pipeline(tmp, topic, clicks_topic)
    store = FeatureStore(
        server_views(topic, clicks_topic),
        redis_url=runtime.redis_url,
        delta_uri=runtime.delta_uri,
        redis_prefix=runtime.redis_prefix,
        registry=reg,
    )
    with serve(
        pipeline, env, tmp / "server.log", "--max-entities", "5", "--refresh-seconds", "0.5"
    ) as server:
        yield World(server, store, key, now)
    reg.close()


def _same_minute(fetch: Any) -> Any:
    """Run ``fetch(at)`` until the read and the reference fall in the same 1-minute tile."""
    for _ in range(5):
        at = datetime.now(UTC)
        got = fetch(at)
        if int(time.time() // 60) == int(at.timestamp() // 60):
            return got, at
    raise AssertionError("could not read within one tile")


def _online(world: World, body: dict[str, Any], **kw: Any) -> Any:
    return world.server.post("/features/online", world.key, json=body, **kw)


def test_online_read_equals_the_client_with_a_status_per_value(world: World) -> None:
    (resp, at) = _same_minute(
        lambda at: _online(world, {"features": ["spend"], "entities": {"user_id": USERS}})
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    names = body["metadata"]["feature_names"]
    view = spend_view("t")
    assert names == ["user_id", *[a.feature_name for a in view.aggregations]]
    cols = dict(zip(names, body["results"], strict=True))
    assert cols["user_id"]["values"] == USERS
    expected = world.store.get_online_features(["spend"], USERS, as_of=at)
    for a in view.aggregations:
        assert cols[a.feature_name]["values"] == expected.values[f"spend:{a.feature_name}"], a.feature_name
        want_times = [
            None if t is None else t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            for t in expected.event_times[f"spend:{a.feature_name}"]
        ]
        assert cols[a.feature_name]["event_timestamps"] == want_times, a.feature_name
    # u1 is live, u2 idle for 3 days (past the 1d + 1m TTL), u3 unknown, u4 idle for 40 minutes.
    assert cols["tx_count"]["values"][0] == 3  # the null amount is an event too
    assert cols["amount_sum"]["values"][0] == 15.0
    assert cols["tx_count"]["statuses"] == ["PRESENT", "OUTSIDE_MAX_AGE", "NOT_FOUND", "PRESENT"]
    assert cols["amount_max_10m"]["statuses"] == ["PRESENT", "OUTSIDE_MAX_AGE", "NOT_FOUND", "NULL_VALUE"]
    assert cols["amount_max_10m"]["values"] == [10.0, None, None, None]
    newest = datetime.fromtimestamp((world.now_ms - 5 * MIN) / 1000, UTC)
    assert cols["amount_last"]["event_timestamps"][0] == newest.isoformat(timespec="milliseconds")[:-6] + "Z"


def test_full_feature_names_versions_and_composite_keys(world: World) -> None:
    body = {
        "features": ["spend:amount_sum", "spend@2:amount_sum", "clicks:clicks_1d"],
        "entities": {"user_id": ["u1", "u4"], "page": [3, 4]},
        "full_feature_names": True,
    }
    (resp, at) = _same_minute(lambda at: _online(world, body))
    assert resp.status_code == 200, resp.text
    names = resp.json()["metadata"]["feature_names"]
    assert names == ["user_id", "page", "spend__amount_sum", "spend@2__amount_sum", "clicks__clicks_1d"]
    cols = dict(zip(names, resp.json()["results"], strict=True))
    with pytest.warns(DeprecationWarning):
        expected = world.store.get_online_features(
            ["spend:amount_sum", "spend@2:amount_sum", "clicks:clicks_1d"],
            [{"user_id": "u1", "page": 3}, {"user_id": "u4", "page": 4}],
            as_of=at,
        )
    assert cols["spend@2__amount_sum"]["values"] == expected.values["spend@2:amount_sum"]
    assert cols["spend__amount_sum"]["values"] == expected.values["spend:amount_sum"]
    assert cols["clicks__clicks_1d"]["values"] == [2, 0]  # (u1, page 3) clicked twice; (u4, 4) never
    assert cols["clicks__clicks_1d"]["statuses"] == ["PRESENT", "NOT_FOUND"]
    assert resp.headers["deprecation"] == "true" and "spend@2 is deprecated" in resp.headers["warning"]


def test_arrow_answer_has_the_same_values(world: World) -> None:
    body = {"features": ["spend:amount_sum", "spend:amount_max_10m"], "entities": {"user_id": USERS}}
    (resp, _) = _same_minute(lambda at: _online(world, body, headers={"Accept": ARROW}))
    assert resp.status_code == 200 and resp.headers["content-type"] == ARROW
    table = pa.ipc.open_stream(resp.content).read_all()
    as_json = _online(world, body).json()
    cols = dict(zip(as_json["metadata"]["feature_names"], as_json["results"], strict=True))
    assert table.column("user_id").to_pylist() == USERS
    assert table.column("amount_sum").to_pylist() == cols["amount_sum"]["values"]
    assert table.column("amount_max_10m").to_pylist() == cols["amount_max_10m"]["values"]
    assert table.column("amount_max_10m__status").to_pylist() == cols["amount_max_10m"]["statuses"]
    assert table.schema.field("amount_sum__event_timestamp").type == pa.timestamp("ms", "UTC")
    ts = table.column("amount_sum__event_timestamp").to_pylist()
    assert ts[2] is None and ts[0] == datetime.fromtimestamp((world.now_ms - 5 * MIN) / 1000, UTC)


def test_one_vector_by_get(world: World) -> None:
    (resp, at) = _same_minute(lambda at: world.server.get("/features/spend/u1", world.key))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = world.store.get_online_features(["spend"], ["u1"], as_of=at)
    assert body["view"] == "spend" and body["entity"] == "u1"
    assert body["version"] == world.store.views["spend"].version
    assert body["features"] == {k.split(":")[1]: v[0] for k, v in expected.values.items()}
    assert body["statuses"]["amount_max_10m"] == "PRESENT"
    some = world.server.get("/features/spend/u3?features=amount_sum,tx_count", world.key).json()
    assert some["features"] == {"amount_sum": 0.0, "tx_count": 0}
    assert some["statuses"] == {"amount_sum": "NOT_FOUND", "tx_count": "NOT_FOUND"}
    assert some["event_timestamps"] == {"amount_sum": None, "tx_count": None}
    old = world.server.get("/features/spend@2/u1", world.key)
    assert old.status_code == 200 and old.json()["view"] == "spend@2"
    assert old.headers["deprecation"] == "true"
    composite = world.server.get("/features/clicks/u1%7C3", world.key)
    assert composite.json()["features"] == {"clicks_1d": 2}
    arrow = world.server.get("/features/spend/u1", world.key, headers={"Accept": ARROW})
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.num_rows == 1 and table.column("user_id").to_pylist() == ["u1"]
    assert table.column("tx_count").to_pylist() == [body["features"]["tx_count"]]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/features/nope/u1", 404, "unknown_view"),
        ("/features/spend@9/u1", 404, "unknown_version"),
        ("/features/spend@x/u1", 404, "unknown_version"),
        ("/features/spend@1/u1", 410, "retired_version"),
        ("/features/spend/u1?features=nope", 400, "unknown_feature"),
    ],
)
def test_vector_errors(world: World, path: str, status: int, code: str) -> None:
    resp = world.server.get(path, world.key)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == code and resp.json()["fix"]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{not json", 400, "malformed_json", None),
        (b"[1, 2]", 400, "invalid_request", None),
        (
            b'{"features": ["spend"], "entities": {"user_id": ["u1"]}, "extra": 1}',
            400,
            "invalid_request",
            "extra",
        ),
        (b'{"features": "spend", "entities": {"user_id": ["u1"]}}', 400, "invalid_request", "features"),
        (
            b'{"features": ["spend"], "entities": {"user_id": [1.5]}}',
            400,
            "invalid_request",
            "entities.user_id[0]",
        ),
        (
            b'{"features": ["spend"], "entities": {"user_id": [true]}}',
            400,
            "invalid_request",
            "entities.user_id[0]",
        ),
        (b'{"features": [], "entities": {"user_id": ["u1"]}}', 400, "invalid_request", "features"),
        (b'{"features": ["spend"], "entities": {}}', 400, "invalid_request", "entities"),
        (b'{"features": ["spend"], "entities": {"user_id": []}}', 400, "invalid_request", "entities"),
        (
            b'{"features": ["spend"], "entities": {"user_id": ["a","b","c","d","e","f"]}}',
            400,
            "too_many_entities",
            "entities",
        ),
        (
            b'{"features": ["clicks"], "entities": {"user_id": ["u1"], "page": [1, 2]}}',
            400,
            "invalid_request",
            "entities.page",
        ),
        (
            b'{"features": ["spend", "nope:x"], "entities": {"user_id": ["u1"]}}',
            400,
            "unknown_view",
            "features[1]",
        ),
        (
            b'{"features": ["spend:nope"], "entities": {"user_id": ["u1"]}}',
            400,
            "unknown_feature",
            "features[0]",
        ),
        (
            b'{"features": ["spend@7:tx_count"], "entities": {"user_id": ["u1"]}}',
            400,
            "unknown_version",
            "features[0]",
        ),
        (
            b'{"features": ["spend@1:tx_count"], "entities": {"user_id": ["u1"]}}',
            410,
            "retired_version",
            "features[0]",
        ),
        (
            b'{"features": ["clicks"], "entities": {"user_id": ["u1"]}}',
            400,
            "missing_join_key",
            "entities.page",
        ),
        (
            b'{"features": ["spend:amount_sum", "spend@2:amount_sum"], "entities": {"user_id": ["u1"]}}',
            400,
            "ambiguous_names",
            "full_feature_names",
        ),
    ],
)
def test_bad_requests_name_the_field_and_the_fix(
    world: World, body: bytes, status: int, code: str, field: str | None
) -> None:
    resp = world.server.post(
        "/features/online", world.key, content=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert err["error"] == code, err
    assert err.get("field") == field, err
    assert err["message"] and (err.get("fix") or code == "malformed_json"), err


def test_body_size_is_bounded(world: World) -> None:
    resp = world.server.post(
        "/features/online", world.key, content=b" " * (9 << 20), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 413 and resp.json()["error"] == "body_too_large"


def test_docs_health_readiness_and_metrics(world: World) -> None:
    schema = world.server.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    assert {"/features/online", "/features/{view}/{entity}", "/push/{source}", "/readyz"} <= set(
        schema["paths"]
    )
    assert "OnlineRequest" in schema["components"]["schemas"]
    docs = world.server.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "swagger" in docs.text.lower()
    assert world.server.get("/healthz").json() == {"status": "ok"}
    ready = world.server.get("/readyz").json()
    assert ready == {"status": "ready", "checks": {"redis": "ok", "registry": "ok", "keys": "ok"}}
    _online(world, {"features": ["spend:amount_sum"], "entities": {"user_id": ["u1"]}})
    _online(world, {"features": ["spend:nope"], "entities": {"user_id": ["u1"]}})
    metrics = world.server.get("/metrics").text
    ok = (
        'featurestream_server_request_seconds_bucket{code="200",le="0.01",'
        'route="/features/online",view="spend"}'
    )
    assert ok in metrics
    assert 'code="400"' in metrics and 'route="/features/online",view="-"' in metrics
    assert "featurestream_server_access_decisions_total" in metrics
    assert world.key not in metrics and world.key.split("_")[1] not in metrics
    assert world.key not in world.server.log_text()


def test_serve_refuses_to_start_with_a_clear_error(services: Services, tmp_path: Path) -> None:
    env = server_env(services.kafka, services.redis_url, "x", f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
    missing = subprocess.run(
        [*CLI, "serve", str(tmp_path / "nope.py")], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "does not exist" in missing.stdout, missing.stdout + missing.stderr
    pipeline = write_pipeline(tmp_path, "t", "c")
    env["FEATURESTREAM_REGISTRY_URL"] = "postgresql://fs:hunter2-secret@127.0.0.1:1/none?connect_timeout=2"
    down = subprocess.run([*CLI, "serve", str(pipeline)], env=env, capture_output=True, text=True, timeout=60)
    out = down.stdout + down.stderr
    assert down.returncode == 2 and "unreachable" in out, out
    assert "hunter2-secret" not in out
