"""The Delta tile table the stream writes, read by DuckDB (not our code) and checked against an
oracle recomputed from the raw events with pandas.

Events of each entity land on all 4 partitions (unkeyed) and arrive out of order; the worker runs
twice (the second run replays the topic from its start, so every tile row is written again, some
with more events). Read by the documented rule (per entity and tile, the row with the most events),
the table must hold exactly the oracle's partials, and a window computed in SQL over it must equal
the training set and the oracle.
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from deltalake import DeltaTable

from connectors.delta_store import DeltaOfflineStore
from connectors.delta_tiles import tiles_uri
from engine.dataflow import RuntimeConfig
from engine.definitions import Aggregation, Entity, EventSource, FeatureView, Field, Window
from featurestream.client import FeatureStore
from tests.conftest import Services
from tests.support import produce, run_views

T0 = 1_700_000_000_000
TILE_MS = 10_000
USERS = [f"u{i}" for i in range(6)]
HOP = Window.hopping("2m", "30s")


def _view(topic: str) -> FeatureView:
    return FeatureView(
        name="taps",
        entity=Entity(name="user", join_keys=("user_id",)),
        source=EventSource(
            name="taps",
            topic=topic,
            timestamp_field="ts",
            fields=(
                Field(name="user_id", dtype="str"),
                Field(name="x", dtype="float", nullable=True),
                Field(name="y", dtype="float", nullable=True),
            ),
        ),
        aggregations=(
            Aggregation(function="count", window="1m"),
            Aggregation(function="sum", column="x", window=HOP, name="x_sum_hop"),
            Aggregation(function="stddev", column="y", window="1m"),
            Aggregation(function="last", column="x", window="1m"),
        ),
        tile_size="10s",
        allowed_lateness="1h",  # every event is accepted, so tiles hold exactly the raw events
    )


def _events(rng: np.random.Generator, n: int) -> pd.DataFrame:
    ts = T0 + rng.choice(600_000, n, replace=False)  # distinct times: `last` is unambiguous
    ts[: n // 10] = (ts[: n // 10] // TILE_MS) * TILE_MS  # first ms of a tile
    ts = np.unique(ts)
    rng.shuffle(ts)  # arrival out of event-time order
    n = len(ts)
    x = np.round(rng.normal(20, 10, n), 3)
    y = rng.normal(1e6, 1, n)
    x[rng.random(n) < 0.2] = np.nan
    y[rng.random(n) < 0.2] = np.nan
    return pd.DataFrame({"user_id": rng.choice(USERS, n), "x": x, "y": y, "ts": ts})


def _records(df: pd.DataFrame) -> list[dict]:
    return [
        {
            "user_id": r.user_id,
            "ts": int(r.ts),
            "x": None if np.isnan(r.x) else r.x,
            "y": None if np.isnan(r.y) else r.y,
        }
        for r in df.itertuples()
    ]


def _oracle_tiles(df: pd.DataFrame) -> pd.DataFrame:
    df = df.assign(tile_no=df.ts // TILE_MS).sort_values("ts")
    g = df.groupby(["user_id", "tile_no"])
    out = g.agg(n_events=("ts", "size"), max_ts=("ts", "max"))
    for c in ("x", "y"):
        out[f"{c}__count"] = g[c].count()
        out[f"{c}__sum"] = g[c].sum()
        out[f"{c}__min"] = g[c].min()
        out[f"{c}__max"] = g[c].max()
        out[f"{c}__m2"] = g[c].apply(lambda s: float(((s.dropna() - s.dropna().mean()) ** 2).sum()))
        out[f"{c}__last"] = g[c].apply(lambda s: s.dropna().iloc[-1] if s.notna().any() else np.nan)
    return out.reset_index().rename(columns={"user_id": "entity"})


def _duckdb_tiles(uri: str) -> tuple[pd.DataFrame, int]:
    """The tile table by the documented rule, read by DuckDB from the table's Parquet files."""
    files = DeltaTable(uri).file_uris()
    con = duckdb.connect()
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    con.execute(f"CREATE VIEW tiles AS SELECT * FROM read_parquet([{listed}])")
    raw = con.execute("SELECT count(*) FROM tiles").fetchone()[0]
    latest = con.execute(
        """
        SELECT * EXCLUDE (rn) FROM (
            SELECT *, row_number() OVER (
                PARTITION BY entity, tile_no ORDER BY n_events DESC, _written_at DESC) AS rn
            FROM tiles)
        WHERE rn = 1 ORDER BY entity, tile_no
        """
    ).df()
    return latest, raw


def test_tile_table_read_by_duckdb_equals_oracle_after_a_replay(
    services: Services, topic, runtime: RuntimeConfig
) -> None:
    rng = np.random.default_rng(11)
    name = topic(partitions=4)
    view = _view(name)
    df = _events(rng, 500)
    half = len(df) * 3 // 5
    produce(services.kafka, name, _records(df.iloc[:half]))  # unkeyed: each user on every partition
    run_views([view], runtime)
    produce(services.kafka, name, _records(df.iloc[half:]))
    run_views([view], runtime)  # a restart: replays the topic from its start

    uri = tiles_uri(DeltaOfflineStore(runtime.delta_uri), view.name, view.version)
    got, raw_rows = _duckdb_tiles(uri)
    want = _oracle_tiles(df)
    assert raw_rows > len(got), "the second run should have rewritten tiles (a replay)"
    assert len(got) == len(want)
    got = got.sort_values(["entity", "tile_no"]).reset_index(drop=True)
    want = want.sort_values(["entity", "tile_no"]).reset_index(drop=True)
    assert got.entity.tolist() == want.entity.tolist()
    assert got.tile_no.tolist() == want.tile_no.tolist()
    assert got.n_events.tolist() == want.n_events.tolist()
    assert (got.tile_start == pd.to_datetime(got.tile_no * TILE_MS, unit="ms", utc=True)).all()
    max_ts = got.max_event_ts.astype("int64") // 1_000_000 if got.max_event_ts.dt.unit == "ns" else None
    if max_ts is None:
        max_ts = (got.max_event_ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    assert max_ts.tolist() == want.max_ts.tolist()
    for c in ("x", "y"):
        assert got[f"{c}__count"].tolist() == want[f"{c}__count"].tolist(), c
        for part in ("min", "max", "last"):  # picks: exact
            np.testing.assert_array_equal(
                got[f"{c}__{part}"].to_numpy(float), want[f"{c}__{part}"], err_msg=part
            )
        np.testing.assert_allclose(got[f"{c}__sum"], want[f"{c}__sum"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got[f"{c}__m2"], want[f"{c}__m2"], rtol=1e-6, atol=1e-9)

    # A hopping window computed in SQL over the tiles == the training set == the oracle.
    at = T0 + rng.integers(-60_000, 700_000, 60)
    at[:15] = (at[:15] // 30_000) * 30_000  # on hop boundaries
    rows = pa.table(
        {
            "user_id": rng.choice([*USERS, "nobody"], len(at)),
            "event_timestamp": pa.array(at, pa.timestamp("ms", "UTC")),
        }
    )
    store = FeatureStore([view], redis_url=runtime.redis_url, delta_uri=runtime.delta_uri)
    training = store.get_training_set(rows, ["taps:x_sum_hop"]).to_pandas()
    con = duckdb.connect()
    con.register("rows", rows.append_column("at_ms", pa.array(at)))
    con.register("tiles", got)
    sql = con.execute(
        """
        SELECT r.rowid_, coalesce(sum(t.x__sum), 0) AS s FROM
            (SELECT *, row_number() OVER () - 1 AS rowid_, (at_ms // 30000) * 30000 AS end_ms FROM rows) r
        LEFT JOIN tiles t ON t.entity = r.user_id
            AND t.tile_no * 10000 >= r.end_ms - 120000 AND t.tile_no * 10000 < r.end_ms
        GROUP BY r.rowid_ ORDER BY r.rowid_
        """
    ).df()
    ends = (at // 30_000) * 30_000
    oracle = [
        float(np.nansum(df.x[(df.user_id == u) & (df.ts >= e - 120_000) & (df.ts < e)]))
        for u, e in zip(rows.column("user_id").to_pylist(), ends.tolist(), strict=True)
    ]
    np.testing.assert_allclose(sql.s, oracle, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(training["taps:x_sum_hop"], oracle, rtol=1e-9, atol=1e-9)
    assert datetime.fromtimestamp(T0 / 1000, UTC).year == 2023


def test_a_stale_replayed_row_written_last_does_not_win(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A replay can append a tile's older, smaller partial after its complete one: the reading
    rule (most events) must still give the complete one, in our reader and in DuckDB."""
    from connectors.delta_tiles import append_tiles, read_tiles, tile_table
    from engine.tiles import TileLayout, partials_from_events

    layout = TileLayout(columns=("x", "y"), tile_ms=TILE_MS)
    store = DeltaOfflineStore(str(tmp_path / "delta"))
    uri = tiles_uri(store, "taps", "v1")
    rng = np.random.default_rng(5)
    ts = T0 + np.sort(rng.choice(60_000, 40, replace=False))
    x, y = rng.normal(0, 1, 40), rng.normal(5, 2, 40)
    tile = ts // TILE_MS
    early = slice(0, 25)
    _, first = partials_from_events(layout, tile[early], tile[early], ts[early], [x[early], y[early]])
    _, full = partials_from_events(layout, tile, tile, ts, [x, y])
    names = pa.array(["u0"] * len(full))
    append_tiles(store, uri, tile_table(layout, names, full))
    append_tiles(store, uri, tile_table(layout, pa.array(["u0"] * len(first)), first))  # the stale replay
    got = read_tiles(store, uri)
    assert got is not None
    assert got.column("n_events").to_pylist() == full[:, 1].astype(int).tolist()
    np.testing.assert_allclose(got.column("x__sum").to_numpy(), full[:, layout.base("x") + 1])
    duck, raw = _duckdb_tiles(uri)
    assert raw == len(full) + len(first)
    assert duck.n_events.tolist() == full[:, 1].astype(int).tolist()
