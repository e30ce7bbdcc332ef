"""Lateness is judged per source partition, against that partition's own newest event time: no
global watermark exists, so a partition that idles (or lags) behind another neither holds the
other back nor has its events judged by the other's clock (docs/windows.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
from confluent_kafka import Producer

from engine.dataflow import RuntimeConfig, build_dataflow, run_dataflow
from featurestream.client import FeatureStore
from tests.conftest import Services
from tests.pipeline_helpers import MIN
from tests.support import read_topic
from tests.windowing_helpers import BASE, make_view


def _send(kafka: str, topic: str, partition: int, events: list[dict]) -> None:
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "acks": "all"})
    for e in events:
        p.produce(topic, value=json.dumps(e).encode(), partition=partition)
    assert p.flush(30) == 0


def _event(user: str, ts: int) -> dict:
    return {"user_id": user, "ts": ts, "amount": 1.0, "qty": 1}


def test_an_idle_partition_is_judged_by_its_own_clock(
    services: Services, topic, runtime: RuntimeConfig
) -> None:
    name = topic(partitions=2)
    view = make_view(name)
    _send(services.kafka, name, 1, [_event("quiet", BASE)])
    # Partition 0 runs two hours ahead while partition 1 idles.
    _send(services.kafka, name, 0, [_event("busy", BASE + i * MIN) for i in range(120)])
    # Partition 1 wakes: 3 minutes after its own newest event (accepted, although two hours
    # behind partition 0), then 10 minutes behind its newest (late by its own clock).
    _send(services.kafka, name, 1, [_event("quiet", BASE + 3 * MIN), _event("quiet", BASE + 20 * MIN)])
    _send(services.kafka, name, 1, [_event("quiet", BASE + 9 * MIN)])
    run_dataflow(build_dataflow([view], runtime))

    dlq = [json.loads(m.value()) for m in read_topic(services.kafka, f"{name}.dlq")]
    assert [(d["user_id"], d["ts"]) for d in dlq] == [("quiet", BASE + 9 * MIN)]
    store = FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )
    at = datetime.fromtimestamp((BASE + 25 * MIN) / 1000, UTC)
    df = pd.DataFrame({"user_id": ["quiet", "busy"], "event_timestamp": [pd.Timestamp(at)] * 2})
    offline = store.get_training_set(df, ["win:c1h"]).to_pandas()
    assert offline["win:c1h"].tolist() == [3, 26]  # busy: BASE .. BASE + 25m
    newest = datetime.fromtimestamp((BASE + 119 * MIN) / 1000, UTC)
    online = store.get_online_features(["win:c1h", "win:c10"], ["busy", "quiet"], as_of=newest)
    assert online.values["win:c1h"] == [60, 0]  # busy's last hour; quiet's events are older
    assert online.values["win:c10"] == [10, 0]
