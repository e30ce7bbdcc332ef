"""``featurestream training-set``: invoked as a user would, on events written to the Delta offline
store (no stream needed), checked against the events path row by row; entity files in Parquet
and CSV, rows streamed in small chunks, bad input named with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from connectors.delta_store import DeltaOfflineStore, event_schema
from engine.reads import point_in_time_values
from featurestream.runtime import load_views
from tests.support import pay_pipeline

T0 = 1_700_000_000_000


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FEATURESTREAM_DELTA_URI": str(tmp / "delta"),
        "FEATURESTREAM_STATE_DIR": str(tmp / "state"),
        "COLUMNS": "200",
    }
    cmd = [sys.executable, "-m", "featurestream.cli", "training-set", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp)


def _store_events(tmp: Path, view, rng: np.random.Generator, n: int) -> pa.Table:  # type: ignore[no-untyped-def]
    ts = T0 + rng.integers(0, 3 * 86_400_000, n)
    users = rng.choice(["007", "u1", "u2", "u3"], n)
    amount = np.round(rng.normal(30, 20, n), 2)
    part = rng.integers(0, 4, n).astype(np.int32)
    events = pa.table(
        {
            "entity": pa.array(users.tolist(), pa.string()),
            "event_ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
            "amount": pa.array(amount),
            "_topic": pa.array(["pay"] * n),
            "_partition": pa.array(part),
            "_offset": pa.array(np.arange(n, dtype=np.int64)),
            "date": pa.array([datetime.fromtimestamp(t / 1000, UTC).date() for t in ts.tolist()]),
        },
        schema=event_schema(view.columns),
    )
    store = DeltaOfflineStore(str(tmp / "delta"))
    assert store.append(store.table_uri(view.name, view.version), events, f"{view.name}:{view.version}") == n
    return events


def test_training_set_cli_streams_parquet_equal_to_the_events_path(tmp_path: Path) -> None:
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pay_pipeline("pay", ("count", "sum", "mean", "max", "last", "stddev")))
    (view,) = load_views(pipeline)
    rng = np.random.default_rng(3)
    events = _store_events(tmp_path, view, rng, 3000)
    q = 1000
    at = T0 + rng.integers(-86_400_000, 4 * 86_400_000, q)
    at[:100] = (at[:100] // 60_000) * 60_000  # on tile edges
    users = rng.choice(["007", "u1", "u2", "u3", "nobody"], q)
    rows = pa.table({"user_id": users.tolist(), "at": pa.array(at, pa.timestamp("ms", "UTC"))})
    pq.write_table(rows, tmp_path / "rows.parquet")
    csv_rows = pa.table(
        {
            "user_id": users.tolist(),
            "at": [datetime.fromtimestamp(t / 1000, UTC).isoformat() for t in at.tolist()],
        }
    )
    pcsv.write_csv(csv_rows, tmp_path / "rows.csv")
    features = ",".join(f"pay:{f}" for f in view.feature_names)
    expected = point_in_time_values(view, events, users.tolist(), at, list(view.aggregations))

    for source in ("rows.parquet", "rows.csv"):
        out = tmp_path / f"out-{source}.parquet"
        args = ["pay.py", "--entities", source, "--features", features, "--timestamp-column", "at"]
        done = _cli(tmp_path, *args, "--out", str(out), "--chunk-rows", "64")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"wrote {q:,} rows" in done.stdout
        meta = pq.ParquetFile(out).metadata
        assert meta.num_rows == q and meta.num_row_groups > 1  # written chunk by chunk
        got = pq.read_table(out)
        assert got.column("user_id").to_pylist() == users.tolist()  # "007" stays a string key
        for agg in view.aggregations:
            col = got.column(f"pay:{agg.feature_name}").to_numpy(zero_copy_only=False).astype(float)
            want = expected[agg.feature_name][0]
            np.testing.assert_allclose(
                col, want, rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=agg.feature_name
            )


def test_training_set_cli_names_bad_input(tmp_path: Path) -> None:
    pipeline = tmp_path / "pay.py"
    pipeline.write_text(pay_pipeline("pay"))
    pq.write_table(
        pa.table({"user_id": ["u1"], "ts": pa.array([T0], pa.timestamp("ms"))}), tmp_path / "naive.parquet"
    )
    done = _cli(tmp_path, "pay.py", "--entities", "naive.parquet", "--features", "pay", "--out", "o.parquet")
    assert done.returncode == 2 and "event_timestamp" in done.stdout
    done = _cli(
        tmp_path,
        "pay.py",
        "--entities",
        "naive.parquet",
        "--features",
        "pay",
        "--timestamp-column",
        "ts",
        "--out",
        "o.parquet",
    )
    assert done.returncode == 2 and "timezone-aware" in done.stdout
    done = _cli(tmp_path, "pay.py", "--entities", "missing.csv", "--features", "pay", "--out", "o.parquet")
    assert done.returncode == 2 and "--entities" in done.stdout
    done = _cli(
        tmp_path, "pay.py", "--entities", "naive.parquet", "--features", "nope:x", "--out", "o.parquet"
    )
    assert done.returncode == 2 and "unknown feature view" in done.stdout
