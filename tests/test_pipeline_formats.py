"""End to end with other input formats: ISO 8601 and epoch-seconds timestamps, composite entity keys.

Real Kafka, Redis and Delta; expected values come from a pandas/numpy oracle over the raw events
(see tests/pipeline_helpers.py for the window semantics it implements).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from engine.dataflow import RuntimeConfig
from engine.definitions import Field
from tests.pipeline_faults_helpers import check_against_oracle, delta_times, make_view
from tests.pipeline_helpers import BASE, MIN, _store, ms_dt
from tests.support import headers, produce, read_topic, run_views

SECOND_MS = 1000


def test_iso8601_timestamps_end_to_end(
    services: Any, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(1)
    view = make_view(src, "iso_view", ts_field="at", ts_format="iso8601")
    rng = np.random.default_rng(8)
    offsets = ["Z", "+00:00", "+02:00", "-05:30", "+05:45"]
    events: list[Any] = []
    for i in range(120):
        ms = BASE + i * 10_000 + int(rng.integers(0, 60_000))
        if i % 3 == 0:  # no fractional part: whole seconds
            ms -= ms % 1000
        off = offsets[i % len(offsets)]
        local = pd.Timestamp(ms, unit="ms") + pd.Timedelta(_offset_minutes(off), "min")
        text = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{ms % 1000:03d}" if i % 3 else "") + off
        events.append({"user_id": f"k{i % 4}", "at": text, "amount": float(i % 17) + 0.25})
    events.insert(30, {"user_id": "k0", "at": "2024-03-10T23:30:00", "amount": 5.0})  # no zone
    events.insert(60, {"user_id": "k1", "at": "2024-13-45T99:00:00Z", "amount": 5.0})  # not a date
    produce(services.kafka, src, events, key_field="user_id")
    run_views([view], runtime)

    dlq = read_topic(services.kafka, f"{src}.dlq")
    assert sorted((headers(m)["fs-reason"], int(headers(m)["fs-offset"])) for m in dlq) == [
        ("bad_timestamp", 30),
        ("bad_timestamp", 60),
    ]
    good = [e for j, e in enumerate(events) if j not in (30, 60)]
    ts = [int(pd.Timestamp(e["at"]).tz_convert("UTC").value // 1_000_000) for e in good]
    df = pd.DataFrame(
        {
            "entity": [e["user_id"] for e in good],
            "ts": ts,
            "amount": [e["amount"] for e in good],
            "partition": 0,
            "offset": [j for j in range(len(events)) if j not in (30, 60)],
        }
    )
    assert delta_times(view, runtime) == sorted(ts)
    ents = sorted(df["entity"].unique())
    assert check_against_oracle(view, runtime, df, [{"user_id": e} for e in ents], ents) > 300


def _offset_minutes(off: str) -> int:
    if off in ("Z", "+00:00"):
        return 0
    sign = 1 if off[0] == "+" else -1
    h, m = off[1:].split(":")
    return sign * (int(h) * 60 + int(m))


def test_epoch_seconds_timestamps_end_to_end(
    services: Any, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(2)
    view = make_view(src, "secs_view", ts_format="epoch_seconds")
    rng = np.random.default_rng(9)
    base_s = BASE // 1000
    events: list[Any] = []
    for i in range(150):
        whole = base_s + i * 8 + int(rng.integers(0, 30))
        match i % 4:
            case 0:
                stamp: Any = whole  # an int
            case 1:
                stamp = float(f"{whole}.{int(rng.integers(0, 1000)):03d}")
            case 2:
                stamp = float(whole - whole % 60)  # exactly a tile start, as a float
            case _:
                stamp = float(f"{whole - whole % 60 + 59}.999")  # last millisecond of a tile
        events.append({"user_id": f"s{i % 5}", "ts": stamp, "amount": float(i % 11) - 3.5})
    events.insert(40, {"user_id": "s0", "ts": -5.0, "amount": 1.0})
    events.insert(80, {"user_id": "s1", "ts": "1710111111", "amount": 1.0})
    produce(services.kafka, src, events, key_field="user_id")
    run_views([view], runtime)

    dlq = read_topic(services.kafka, f"{src}.dlq")
    assert sorted(headers(m)["fs-reason"] for m in dlq) == ["bad_timestamp", "bad_timestamp"]
    assert sorted(repr(json.loads(m.value())["ts"]) for m in dlq) == ["'1710111111'", "-5.0"]
    source = read_topic(services.kafka, src)
    rows = []
    for m in source:
        e = json.loads(m.value())
        if isinstance(e["ts"], str) or e["ts"] < 0:
            continue
        ms = int(Decimal(repr(e["ts"])) * 1000)
        rows.append(
            {
                "entity": e["user_id"],
                "ts": ms,
                "amount": e["amount"],
                "partition": m.partition(),
                "offset": m.offset(),
            }
        )
    df = pd.DataFrame(rows)
    assert len(df) == 150
    assert ((df["ts"] % MIN) == 0).sum() > 30 and ((df["ts"] % MIN) == MIN - 1).sum() > 30
    assert delta_times(view, runtime) == sorted(df["ts"])
    ents = sorted(df["entity"].unique())
    assert check_against_oracle(view, runtime, df, [{"user_id": e} for e in ents], ents) > 300


def test_composite_entity_key_end_to_end(
    services: Any, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(3)
    keys = (Field(name="merchant_id", dtype="int"), Field(name="country", dtype="str"))
    view = make_view(src, "merchant_view", keys=keys)
    combos = [(1, "DE"), (1, "FR"), (2, "DE"), (2, "FR"), (10, "DE"), (12, "NL")]
    rng = np.random.default_rng(10)
    events = []
    for i in range(240):
        m, c = combos[int(rng.integers(0, len(combos)))]
        events.append(
            {
                "merchant_id": m,
                "country": c,
                "ts": BASE + i * 7_000 + int(rng.integers(0, 90_000)),
                "amount": float(np.round(rng.uniform(-10, 90), 2)),
            }
        )
    produce(services.kafka, src, events, key_field="merchant_id")
    run_views([view], runtime)

    assert read_topic(services.kafka, f"{src}.dlq") == []
    rows = []
    for msg in read_topic(services.kafka, src):
        e = json.loads(msg.value())
        rows.append(
            {
                "entity": f"{e['merchant_id']}/{e['country']}",
                "ts": e["ts"],
                "amount": e["amount"],
                "partition": msg.partition(),
                "offset": msg.offset(),
            }
        )
    df = pd.DataFrame(rows)
    wanted = [*combos, (3, "DE"), (1, "NL")]  # the last two have no events
    entity_rows = [{"merchant_id": m, "country": c} for m, c in wanted]
    ids = [f"{m}/{c}" for m, c in wanted]
    got = _store(view, runtime).get_online_features(
        [f"{view.name}:count_events_sl10m"], entity_rows, as_of=ms_dt(int(df["ts"].max()))
    )
    assert got.entities == entity_rows
    assert got.to_dict()["merchant_id"] == [m for m, _ in wanted]
    assert got.values[f"{view.name}:count_events_sl10m"][-2:] == [0, 0]
    assert check_against_oracle(view, runtime, df, entity_rows[:-2], ids[:-2]) > 300


def test_composite_key_values_containing_the_separator_stay_distinct(
    services: Any, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(1)
    keys = (Field(name="x", dtype="str"), Field(name="y", dtype="str"))
    view = make_view(src, "sep_view", keys=keys)
    one, two = {"x": "a|b", "y": "c"}, {"x": "a", "y": "b|c"}
    events = [{**one, "ts": BASE + i * SECOND_MS, "amount": 1.0} for i in range(3)]
    events += [{**two, "ts": BASE + i * SECOND_MS, "amount": 10.0} for i in range(5)]
    produce(services.kafka, src, events)
    run_views([view], runtime)
    feats = [f"{view.name}:count_events_sl10m", f"{view.name}:sum_amount_sl10m"]
    got = _store(view, runtime).get_online_features(feats, [one, two], as_of=ms_dt(BASE + MIN))
    # Two different entities: 3 events of 1.0 and 5 events of 10.0, never merged.
    assert got.values[f"{view.name}:count_events_sl10m"] == [3, 5]
    assert got.values[f"{view.name}:sum_amount_sl10m"] == [3.0, 50.0]
