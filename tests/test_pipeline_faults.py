"""End to end with bad input: dead letters, other timestamp formats, composite entity keys.

Real Kafka, Redis and Delta; expected values come from a pandas/numpy oracle over the raw events
(see tests/test_pipeline.py for the window semantics it implements).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from confluent_kafka import Producer
from deltalake import DeltaTable

from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from featurestream.client import FeatureStore
from tests.support import headers, produce, read_topic, run_views
from tests.test_pipeline import BASE, MIN, Spec, ms_dt, oracle_value, same

LATENESS = 5 * MIN
SECOND_MS = 1000
SPECS = [
    Spec("count_events_sl10m", "count", None, "sliding", 10 * MIN, None),
    Spec("sum_amount_sl10m", "sum", "amount", "sliding", 10 * MIN, None),
    Spec("mean_amount_tu15m", "mean", "amount", "tumbling", 15 * MIN, 15 * MIN),
    Spec("last_amount_sl1h", "last", "amount", "sliding", 60 * MIN, None),
    Spec("stddev_amount_ho20m10m", "stddev", "amount", "hopping", 20 * MIN, 10 * MIN),
]
_MARK = re.compile(rb"(bad|late)-\d+")


def _window(s: Spec) -> Window:
    if s.kind == "sliding":
        return Window.sliding(f"{s.size // MIN}m")
    if s.kind == "tumbling":
        return Window.tumbling(f"{s.size // MIN}m")
    return Window.hopping(f"{s.size // MIN}m", hop=f"{s.hop // MIN}m")  # type: ignore[operator]


def make_view(
    topic: str,
    name: str,
    *,
    keys: tuple[Field, ...] = (Field(name="user_id", dtype="str"),),
    ts_field: str = "ts",
    ts_format: str = "epoch_millis",
) -> FeatureView:
    source = EventSource(
        name=f"{name}_src",
        topic=topic,
        timestamp_field=ts_field,
        timestamp_format=ts_format,
        fields=(*keys, Field(name="amount", dtype="float")),
    )
    return FeatureView(
        name=name,
        entity=Entity(name="ent", join_keys=tuple(k.name for k in keys)),
        source=source,
        aggregations=tuple(
            Aggregation(function=s.function, column=s.column, window=_window(s), name=s.name) for s in SPECS
        ),
        tile_size="1m",
        allowed_lateness="5m",
    )


def _store(view: FeatureView, runtime: RuntimeConfig) -> FeatureStore:
    return FeatureStore(
        [view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri, redis_prefix=runtime.redis_prefix
    )


def _by_entity(events: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Oracle input: each entity's events sorted by (event time, partition, offset)."""
    events = events.sort_values(["entity", "ts", "partition", "offset"], kind="stable")
    return {k: g.reset_index(drop=True) for k, g in events.groupby("entity", sort=False)}


def _empty() -> pd.DataFrame:
    return pd.DataFrame({"ts": pd.Series([], dtype="int64"), "amount": pd.Series([], dtype="float64")})


def check_against_oracle(
    view: FeatureView,
    runtime: RuntimeConfig,
    events: pd.DataFrame,
    entity_rows: list[dict[str, Any]],
    entity_ids: list[str],
) -> int:
    """Online at the newest event time (and later) and offline at every event time (also 1 ms before
    and 10 min after) equal the oracle; online equals offline. Returns how many non-empty values
    were compared."""
    store = _store(view, runtime)
    by = _by_entity(events)
    newest = int(events["ts"].max())
    feats = [f"{view.name}:{s.name}" for s in SPECS]
    compared = 0
    for t in [newest, newest + 3 * MIN + 17, (newest // MIN) * MIN - 1]:
        got = store.get_online_features(feats, entity_rows, as_of=ms_dt(t))
        for s in SPECS:
            vals = got.values[f"{view.name}:{s.name}"]
            times = got.event_times[f"{view.name}:{s.name}"]
            for ent, v, when in zip(entity_ids, vals, times, strict=True):
                want, wt = oracle_value(by.get(ent, _empty()), t, s)
                assert same(v, want), (s.name, ent, t, v, want)
                assert when == (None if wt is None else ms_dt(wt)), (s.name, ent, t, when, wt)
                compared += want not in (None, 0)
    # Offline: at each event's time, 1 ms before it and 10 minutes after it.
    q = events[["entity", "ts"]].to_numpy().tolist()
    q_ent = [e for e, _ in q for _ in range(3)]
    q_t = [int(t) + d for _, t in q for d in (0, -1, 10 * MIN)]
    ident = {i: r for i, r in zip(entity_ids, entity_rows, strict=True)}
    keys = list(view.entity.join_keys)
    df = pd.DataFrame({k: [ident[e][k] for e in q_ent] for k in keys})
    df["event_timestamp"] = pd.to_datetime(np.asarray(q_t, np.int64), unit="ms", utc=True)
    out = store.get_training_set(df, feats).to_pandas()
    for s in SPECS:
        col = [None if isinstance(v, float) and np.isnan(v) else v for v in out[f"{view.name}:{s.name}"]]
        for ent, t, v in zip(q_ent, q_t, col, strict=True):
            want, _ = oracle_value(by[ent], t, s)
            assert same(v, want), ("offline", s.name, ent, t, v, want)
            compared += want not in (None, 0)
    # Online equals offline at the newest event time.
    on = store.get_online_features(feats, entity_rows, as_of=ms_dt(newest))
    df = pd.DataFrame({k: [r[k] for r in entity_rows] for k in keys})
    df["event_timestamp"] = pd.Timestamp(newest, unit="ms", tz="UTC")
    off = store.get_training_set(df, feats).to_pandas()
    for f in feats:
        offv = [None if isinstance(v, float) and np.isnan(v) else v for v in off[f]]
        assert all(same(a, b) and same(b, a) for a, b in zip(on.values[f], offv, strict=True)), f
    return compared


def _delta(view: FeatureView, runtime: RuntimeConfig) -> pa.Table:
    return DeltaTable(_store(view, runtime).offline.table_uri(view.name, view.version)).to_pyarrow_table()


def delta_positions(view: FeatureView, runtime: RuntimeConfig) -> list[tuple[int, int]]:
    t = _delta(view, runtime)
    return sorted(zip(t.column("_partition").to_pylist(), t.column("_offset").to_pylist(), strict=True))


def delta_times(view: FeatureView, runtime: RuntimeConfig) -> list[int]:
    col = _delta(view, runtime).column("event_ts")
    return sorted(col.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_pylist())


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


# ---------------------------------------------------------------------------------------------
# Edge cases of message framing and key encoding.
# ---------------------------------------------------------------------------------------------


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
