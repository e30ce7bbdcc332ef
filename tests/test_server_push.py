"""POST /push/{source}: events validated by the stream's decoder, all or nothing, onto the topic, and
from there through a worker into Redis and back out of the server."""

from __future__ import annotations

import time
from pathlib import Path

from registry.core import Registry
from registry.keys import create_key
from tests.conftest import Services
from tests.server_helpers import serve, server_env, spend_view, write_pipeline
from tests.support import create_topic, headers, make_runtime, read_topic, run_views, unique


def test_pushed_events_reach_redis_through_a_worker(services: Services, tmp_path: Path) -> None:
    topic = create_topic(services.kafka, unique("pay"), 2)
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(registry_url)
    _, producer_key = create_key(reg, "pos-terminals", produce=["payments"], read=["spend"])
    _, other_key = create_key(reg, "other-producer", produce=["clicks"])
    reg.close()
    runtime = make_runtime(services.kafka, services.redis_url, tmp_path, "push")
    env = server_env(services.kafka, services.redis_url, runtime.redis_prefix, registry_url, tmp_path / "s")
    pipeline = write_pipeline(tmp_path, topic, unique("clicks"))
    now = int(time.time() * 1000)
    with serve(pipeline, env, tmp_path / "server.log") as server:

        def push(body: object, key: str = producer_key, source: str = "payments"):  # type: ignore[no-untyped-def]
            return server.post(f"/push/{source}", key, json=body)

        one = push({"user_id": "p1", "amount": 2.5, "ts": now - 60_000})
        assert one.status_code == 200, one.text
        assert one.json() == {"source": "payments", "topic": topic, "accepted": 1}
        many = push(
            [
                {"user_id": "p1", "amount": 4.0, "ts": now - 30_000},
                {"user_id": "p2", "amount": 1.0, "ts": now},
            ]
        )
        assert many.status_code == 200 and many.json()["accepted"] == 2

        bad = push(
            [
                {"user_id": "p1", "amount": 100.0, "ts": now},
                {"user_id": "p1", "amount": "12.5", "ts": now},
                {"amount": 1.0, "ts": now},
            ]
        )
        assert bad.status_code == 400, bad.text
        err = bad.json()
        assert err["error"] == "invalid_event" and err["field"] == "events[1].amount"
        assert "nothing was sent" in err["message"] and "2 of 3" in err["message"] and "amount" in err["fix"]
        missing = push({"amount": 1.0, "ts": now})
        assert missing.status_code == 400 and missing.json()["field"] == "events[0].user_id"
        for body, code in (
            (b"[1, 2", "malformed_json"),
            (b"42", "malformed_json"),
            (b"[]", "invalid_request"),
        ):
            resp = server.post("/push/payments", producer_key, content=body)
            assert resp.status_code == 400 and resp.json()["error"] == code, resp.text
        unknown = push({"x": 1}, source="nope")
        assert unknown.status_code == 403  # not in the key's scopes, whether or not it exists
        wildcard_key = _wildcard(registry_url)
        assert push({"x": 1}, key=wildcard_key, source="nope").status_code == 404
        assert push({"user_id": "p1", "amount": 1.0, "ts": now}, key=other_key).status_code == 403

        sent = read_topic(services.kafka, topic)
        assert len(sent) == 3  # the refused batches sent nothing
        assert {m.key() for m in sent} == {b"p1", b"p2"}
        assert not any(headers(m).get("fs-reason") for m in sent)

        run_views([spend_view(topic)], runtime)
        vec = server.get("/features/spend/p1", producer_key)
        assert vec.status_code == 200, vec.text
        assert vec.json()["features"]["amount_sum"] == 6.5 and vec.json()["features"]["tx_count"] == 2
        assert vec.json()["statuses"]["amount_sum"] == "PRESENT"
        metrics = server.get("/metrics").text
        assert 'featurestream_server_pushed_events_total{source="payments"} 3.0' in metrics


def _wildcard(registry_url: str) -> str:
    reg = Registry(registry_url)
    try:
        return create_key(reg, "all-sources", produce=["*"])[1]
    finally:
        reg.close()
