"""End to end with bad input: dead letters for bad events, late events and broken message framing.

Real Kafka, Redis and Delta; expected values come from a pandas/numpy oracle over the raw events
(see tests/pipeline_helpers.py for the window semantics it implements). Other timestamp formats and
composite entity keys are in ``tests/test_pipeline_formats.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from confluent_kafka import Producer

from engine.dataflow import RuntimeConfig
from tests.pipeline_faults_helpers import check_against_oracle, delta_positions, make_view
from tests.pipeline_helpers import BASE, MIN, _store, ms_dt
from tests.support import headers, produce, read_topic, run_views

LATENESS = 5 * MIN
_MARK = re.compile(rb"(bad|late)-\d+")


# ---------------------------------------------------------------------------------------------


def _fault_stream(rng: np.random.Generator) -> tuple[list[Any], dict[str, str]]:
    """Good events of 5 entities over an hour with bad ones spread among them."""
    ents = ["a", "b", "c", "d", "e"]
    good: list[Any] = []
    for i in range(400):
        ts = BASE + i * 9 * 1000 + int(rng.integers(0, 2 * MIN))  # disorder up to 2m, within lateness
        ev: dict[str, Any] = {
            "user_id": ents[int(rng.integers(0, 5))],
            "ts": ts,
            "amount": float(np.round(rng.normal(20, 8), 2)),
        }
        if i % 7 == 0:
            ev["note"] = "unknown fields are ignored"
        good.append(ev)
    expected: dict[str, str] = {}
    bad: list[tuple[int, Any]] = []
    for round_ in range(2):
        k = 8 * round_
        t = BASE + (20 + 25 * round_) * MIN
        probes: list[tuple[Any, str]] = [
            (f"not json at all: bad-{k} {{".encode(), "malformed_json"),
            (f'["bad-{k + 1}", 1, 2]'.encode(), "malformed_json"),
            ({"user_id": "a", "ts": t, "note": f"bad-{k + 2}"}, "missing_field"),
            ({"user_id": "b", "ts": t, "amount": "12.5", "note": f"bad-{k + 3}"}, "invalid_type"),
            ({"user_id": "c", "ts": t, "amount": None, "note": f"bad-{k + 4}"}, "invalid_type"),
            ({"user_id": "d", "ts": str(t), "amount": 1.0, "note": f"bad-{k + 5}"}, "bad_timestamp"),
            ({"user_id": "e", "ts": -1000, "amount": 1.0, "note": f"bad-{k + 6}"}, "bad_timestamp"),
            ({"ts": t, "amount": 1.0, "note": f"bad-{k + 7}"}, "missing_field"),
        ]
        for j, (probe, reason) in enumerate(probes):
            expected[f"bad-{k + j}"] = reason
            bad.append((120 + 200 * round_ + 9 * j, probe))
    # Late: far behind what each entity's partition has already seen (every entity is active early).
    for j, ent in enumerate(["a", "b", "c", "d", "e", "a"]):
        expected[f"late-{j}"] = "late"
        late = {"user_id": ent, "ts": BASE + j * MIN, "amount": 1000.0 + j, "note": f"late-{j}"}
        bad.append((250 + 20 * j, late))
    stream = list(good)
    for pos, probe in sorted(bad, key=lambda x: -x[0]):
        stream.insert(pos, probe)
    return stream, expected


def test_bad_events_are_dead_lettered_and_the_good_ones_aggregated(
    services: Any, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(2)
    view = make_view(src, "fault_view")
    stream, expected = _fault_stream(np.random.default_rng(3))
    produce(services.kafka, src, stream, key_field="user_id")
    run_views([view], runtime)

    source = {(m.partition(), m.offset()): m for m in read_topic(services.kafka, src)}
    assert len(source) == len(stream)
    dlq = read_topic(services.kafka, f"{src}.dlq")
    seen: dict[str, str] = {}
    for m in dlq:
        h = headers(m)
        origin = source[(int(h["fs-partition"]), int(h["fs-offset"]))]
        assert m.value() == origin.value()
        assert m.key() == origin.key()
        mark = _MARK.search(m.value())
        assert mark is not None, m.value()
        name = mark.group().decode()
        assert name not in seen, f"{name} dead-lettered twice"
        seen[name] = h["fs-reason"]
        assert h["fs-topic"] == src
        assert h["fs-view"] == view.name
        assert h["fs-detail"]
    assert seen == expected
    assert len(dlq) == len(expected) == 22

    # Oracle: valid events (parsed here, not by the engine), minus the late ones per partition.
    rows = []
    for (p, o), m in sorted(source.items()):
        if _MARK.search(m.value()) and b"late-" not in m.value():
            continue
        e = json.loads(m.value())
        rows.append(
            {
                "entity": e["user_id"],
                "ts": e["ts"],
                "amount": e["amount"],
                "partition": p,
                "offset": o,
                "late_marker": "note" in e and e["note"].startswith("late-"),
            }
        )
    valid = pd.DataFrame(rows).sort_values(["partition", "offset"]).reset_index(drop=True)
    newest = valid.groupby("partition")["ts"].transform(lambda s: s.cummax().shift(fill_value=-(2**62)))
    is_late = valid["ts"] < newest - LATENESS
    assert (is_late == valid["late_marker"]).all()
    good = valid[~is_late]
    assert len(good) == 400
    assert delta_positions(view, runtime) == sorted(zip(good["partition"], good["offset"], strict=True))
    ents = sorted(good["entity"].unique())
    compared = check_against_oracle(view, runtime, good, [{"user_id": e} for e in ents], ents)
    assert compared > 1000


# ---------------------------------------------------------------------------------------------
# Edge cases of message framing.
# ---------------------------------------------------------------------------------------------


def _produce_raw(bootstrap: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for v in values:
        p.produce(topic, value=v, partition=partition)
    assert p.flush(30) == 0


def test_a_message_holding_two_json_objects_is_one_dead_letter(
    services: Any, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(2)
    view = make_view(src, "frame_view")
    ev = {"user_id": "z", "ts": BASE, "amount": 1.0}
    glued = json.dumps(ev).encode() + b"," + json.dumps({**ev, "ts": BASE + 1}).encode()
    _produce_raw(services.kafka, src, [glued], partition=0)  # alone in its partition
    _produce_raw(services.kafka, src, [json.dumps(ev).encode(), glued, json.dumps(ev).encode()], partition=1)
    run_views([view], runtime)
    dlq = read_topic(services.kafka, f"{src}.dlq")
    where = [(h["fs-reason"], h["fs-partition"], h["fs-offset"]) for h in map(headers, dlq)]
    assert sorted(where) == [
        ("malformed_json", "0", "0"),
        ("malformed_json", "1", "1"),
    ]
    assert all(m.value() == glued for m in dlq)
    assert delta_positions(view, runtime) == [(1, 0), (1, 2)]
    feat = f"{view.name}:count_events_sl10m"
    got = _store(view, runtime).get_online_features([feat], ["z"], as_of=ms_dt(BASE))
    assert got.values[feat] == [2]


def test_an_empty_message_is_a_dead_letter(
    services: Any, topic: Callable[..., str], runtime: RuntimeConfig
) -> None:
    src = topic(1)
    view = make_view(src, "empty_view")
    _produce_raw(services.kafka, src, [b""])
    run_views([view], runtime)
    dlq = read_topic(services.kafka, f"{src}.dlq")
    assert [(headers(m)["fs-reason"], headers(m)["fs-offset"], m.value() or b"") for m in dlq] == [
        ("malformed_json", "0", b"")
    ]
