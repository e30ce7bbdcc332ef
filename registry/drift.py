"""Feature drift: baseline statistics from a training set vs live statistics of what the stream wrote.

The statistics and distances (:func:`feature_stats`, :func:`psi`, :func:`ks`, :func:`drift_status`)
are defined, with their formulas, in :mod:`registry.drift_stats`; they are re-exported here.

Live values (:func:`measure_drift`): per time bucket ``[b, b + bucket)`` (buckets aligned to
multiples of ``bucket`` since the epoch), every entity with an accepted event in the bucket,
valued as of the bucket's end (1 ms before it) from the offline store, with the training set's
point-in-time code. A bucket without events is not measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import delete, insert, select

from engine.definitions import FeatureView, duration_ms
from engine.metrics import DRIFT_KS, DRIFT_PSI
from registry.core import Registry, RegistryError, now
from registry.drift_stats import EPS, PROBS, drift_status, feature_stats, ks, psi  # noqa: F401 (re-exported)
from registry.schema import drift_baselines, drift_measurements, view_versions

if TYPE_CHECKING:
    from featurestream.client import FeatureStore

__all__ = [
    "DriftMeasurement",
    "baselines",
    "capture_baseline",
    "drift_history",
    "drift_status",
    "feature_stats",
    "ks",
    "measure_drift",
    "plot_drift",
    "psi",
]


@dataclass(frozen=True)
class DriftMeasurement:
    """Live statistics of one feature in one bucket and their distance to the baseline."""

    view: str
    version: str
    feature: str
    bucket_start: datetime
    bucket_end: datetime
    n: int
    null_rate: float
    mean: float | None
    std: float | None
    psi: float | None
    ks: float | None
    status: str  # ok | warn | alert
    stats: dict[str, Any]


# --- registry ----------------------------------------------------------------------------------


def _version_id(registry: Registry, view: FeatureView) -> int:
    from registry.versions import find_version

    found = find_version(registry, view.name, view.version)
    if found is None:
        raise RegistryError(
            f"feature view {view.name!r} version {view.version} is not in the registry at "
            f"{registry.safe_url}; record it with `featurestream apply PIPELINE.py`"
        )
    return int(found.id)


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def capture_baseline(
    registry: Registry,
    view: FeatureView,
    training_table: pa.Table,
    features: Sequence[str] | None = None,
    training_set_id: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Store baseline stats of each feature column ``"{view}:{feature}"`` of a training set.

    ``features`` defaults to every feature of ``view`` the table has. Later measurements use the
    newest baseline of each feature of this view version. Returns feature -> stats.
    """
    vid = _version_id(registry, view)
    if features is None:
        features = [f for f in view.feature_names if f"{view.name}:{f}" in training_table.column_names]
        if not features:
            raise RegistryError(f"the training table has no column of view {view.name!r}")
    out: dict[str, dict[str, Any]] = {}
    for feature in features:
        view.aggregation(feature)  # raises for an unknown feature
        col = f"{view.name}:{feature}"
        if col not in training_table.column_names:
            raise RegistryError(f"the training table has no column {col!r}")
        values = pc.cast(training_table.column(col), pa.float64()).to_numpy(zero_copy_only=False)
        out[feature] = feature_stats(values)
    with registry.write_lock("drift") as conn:
        for feature, stats in out.items():
            conn.execute(
                insert(drift_baselines).values(
                    view_version_id=vid,
                    feature=feature,
                    training_set_id=training_set_id,
                    stats=stats,
                    created_at=now(),
                )
            )
    return out


def baselines(registry: Registry, view: FeatureView) -> dict[str, dict[str, Any]]:
    """The newest baseline stats of each feature of this view version."""
    vid = _version_id(registry, view)
    t = drift_baselines
    with registry.read() as conn:
        rows = conn.execute(select(t.c.feature, t.c.stats).where(t.c.view_version_id == vid).order_by(t.c.id))
        return {r.feature: r.stats for r in rows}


def measure_drift(
    registry: Registry,
    store: FeatureStore,
    view: FeatureView,
    start: datetime,
    end: datetime,
    bucket: timedelta = timedelta(hours=1),
) -> list[DriftMeasurement]:
    """Measure every baselined feature per bucket in ``[start, end)`` and store it (replacing).

    Sets the DRIFT_PSI / DRIFT_KS gauges to each feature's latest measured bucket.
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise RegistryError("start and end must be timezone-aware")
    if bucket <= timedelta(0) or end <= start:
        raise RegistryError("need a positive bucket and start < end")
    vid = _version_id(registry, view)
    base = baselines(registry, view)
    if not base:
        raise RegistryError(
            f"no drift baseline for {view.name!r} version {view.version}; capture one from a recorded "
            f"training set: `featurestream baseline {view.name} --pipeline PIPELINE.py --training-set ID`"
        )
    features = [f for f in view.feature_names if f in base]
    aggs = [view.aggregation(f) for f in features]
    step = duration_ms(bucket)
    start_ms, end_ms = round(start.timestamp() * 1000), round(end.timestamp() * 1000)
    first = start_ms // step * step
    reach = timedelta(milliseconds=start_ms - first) + view.max_lookback + view.tile_size
    events = store.offline.read(
        store.offline.table_uri(view.name, view.version), start=start - reach, end=end
    )
    if events is None or events.num_rows == 0:
        return []
    ts = pc.cast(events.column("event_ts"), pa.timestamp("ms", "UTC")).cast(pa.int64()).to_numpy()
    ent = events.column("entity").to_numpy(zero_copy_only=False)
    buckets: list[tuple[int, int, int]] = []  # (start ms, end ms, entities)
    ids: list[np.ndarray] = []
    for b in range(first, end_ms, step):
        b_end = min(b + step, end_ms)
        active = np.unique(ent[(ts >= b) & (ts < b_end)])
        if len(active):
            buckets.append((b, b_end, len(active)))
            ids.append(active)
    if not buckets:
        return []
    at = np.repeat(np.array([e - 1 for _, e, _ in buckets], dtype=np.int64), [k for _, _, k in buckets])
    # The training sets' own function, so a baseline period measured live equals its training set.
    from engine.training import training_values  # compiled kernels: imported when drift is measured

    values = training_values(view, events, np.concatenate(ids).tolist(), at, aggs)
    out: list[DriftMeasurement] = []
    offset = 0
    for b, b_end, k in buckets:
        for feature in features:
            vals = values[feature][0][offset : offset + k]
            stats = feature_stats(vals, base[feature]["edges"])
            p, d = psi(base[feature], stats), ks(base[feature], vals)
            out.append(
                DriftMeasurement(
                    view=view.name,
                    version=view.version,
                    feature=feature,
                    bucket_start=datetime.fromtimestamp(b / 1000, UTC),
                    bucket_end=datetime.fromtimestamp(b_end / 1000, UTC),
                    n=stats["n"],
                    null_rate=stats["null_rate"],
                    mean=stats["mean"],
                    std=stats["std"],
                    psi=p,
                    ks=d,
                    status=drift_status(p, d, view.aggregation(feature).drift),
                    stats=stats,
                )
            )
        offset += k
    _store(registry, vid, out)
    for m in out:  # in bucket order, so the latest bucket wins
        if m.psi is not None:
            DRIFT_PSI.labels(view=view.name, feature=m.feature).set(m.psi)
        if m.ks is not None:
            DRIFT_KS.labels(view=view.name, feature=m.feature).set(m.ks)
    return out


_STORED = (
    "feature",
    "bucket_start",
    "bucket_end",
    "n",
    "null_rate",
    "mean",
    "std",
    "psi",
    "ks",
    "status",
    "stats",
)


def _store(registry: Registry, vid: int, measurements: list[DriftMeasurement]) -> None:
    t = drift_measurements
    created = now()
    with registry.write_lock("drift") as conn:
        for m in measurements:
            same = (t.c.view_version_id == vid, t.c.feature == m.feature, t.c.bucket_start == m.bucket_start)
            conn.execute(delete(t).where(*same))
            row = {k: getattr(m, k) for k in _STORED}
            conn.execute(insert(t).values(view_version_id=vid, created_at=created, **row))


def drift_history(
    registry: Registry, view_name: str, feature: str | None = None, version: str | None = None
) -> list[DriftMeasurement]:
    """Stored measurements of a view (all versions unless ``version``), by bucket then feature."""
    t, v = drift_measurements, view_versions
    query = (
        select(t, v.c.name, v.c.version_hash)
        .join(v, v.c.id == t.c.view_version_id)
        .where(v.c.name == view_name)
        .order_by(t.c.bucket_start, v.c.seq, t.c.feature)
    )
    if feature is not None:
        query = query.where(t.c.feature == feature)
    if version is not None:
        query = query.where(v.c.version_hash == version)
    with registry.read() as conn:
        rows = [r._mapping for r in conn.execute(query)]
    return [
        DriftMeasurement(
            view=r["name"],
            version=r["version_hash"],
            **{k: _utc(r[k]) if k.startswith("bucket_") else r[k] for k in _STORED},
        )
        for r in rows
    ]


# --- plot --------------------------------------------------------------------------------------


def _bin_labels(edges: list[float]) -> list[str]:
    if not edges:
        return ["all"]
    inner = [f"{a:.3g}-{b:.3g}" for a, b in pairwise(edges)]
    return [f"<{edges[0]:.3g}", *inner, f">={edges[-1]:.3g}"]


def plot_drift(
    registry: Registry, view: FeatureView, path: str | Path, features: Sequence[str] | None = None
) -> Path:
    """A PNG per feature: baseline vs latest live histogram (baseline bins), and PSI over time."""
    from matplotlib.figure import Figure  # Agg canvas; no global backend state

    base = baselines(registry, view)
    names = [f for f in (features or view.feature_names) if f in base]
    if not names:
        raise RegistryError(f"no drift baseline for {view.name!r} version {view.version}")
    history = drift_history(registry, view.name, version=view.version)
    fig = Figure(figsize=(13, 3.6 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 2, squeeze=False)
    for (hist_ax, psi_ax), feature in zip(axes, names, strict=True):
        b = base[feature]
        mine = [m for m in history if m.feature == feature]
        x = np.arange(len(b["counts"]))
        counts = np.asarray(b["counts"], dtype=np.float64)
        hist_ax.bar(x - 0.2, counts / max(counts.sum(), 1), width=0.4, label="baseline", color="tab:blue")
        if mine and mine[-1].stats["edges"] == b["edges"]:  # else measured against an older baseline
            live = np.asarray(mine[-1].stats["counts"], dtype=np.float64)
            label = f"live {mine[-1].bucket_start:%Y-%m-%d %H:%M}"
            hist_ax.bar(x + 0.2, live / max(live.sum(), 1), width=0.4, label=label, color="tab:orange")
        hist_ax.set_xticks(x, _bin_labels(b["edges"]), rotation=45, ha="right", fontsize=7)
        hist_ax.set_ylabel("share of entities")
        hist_ax.set_title(f"{view.name}:{feature}")
        hist_ax.legend(fontsize=8)
        limits = view.aggregation(feature).drift
        times = [m.bucket_start for m in mine if m.psi is not None]
        psi_ax.plot(times, [m.psi for m in mine if m.psi is not None], marker="o", color="tab:purple")
        psi_ax.axhline(limits.psi_warn, color="orange", linestyle="--", label=f"warn {limits.psi_warn:g}")
        psi_ax.axhline(limits.psi_alert, color="red", linestyle="--", label=f"alert {limits.psi_alert:g}")
        psi_ax.set_ylabel("PSI")
        psi_ax.set_title("PSI per bucket" if times else "PSI per bucket (no measurements yet)")
        psi_ax.legend(fontsize=8)
        psi_ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out
