"""Drift statistics: pure functions of feature values, no registry or store access.

Statistics of one feature's values (:func:`feature_stats`; NaN and infinities count as nulls):
``n`` values, ``null_rate``, ``mean`` and ``std`` (population) of the non-null ones, a quantile
sketch (``quantiles`` at the 101 probabilities 0, 0.01, ..., 1, linear interpolation) and a
histogram: inner ``edges`` are the baseline's deciles (deduplicated, so point masses stay whole),
the outer bins are open-ended, bin ``i`` holds ``edges[i-1] <= x < edges[i]``; ``counts`` per bin.

Distances (over non-null values; ``None`` when either side has none):

* PSI = sum_i (a_i - e_i) * ln(a_i / e_i) over the baseline's bins, with e_i / a_i the baseline /
  live proportions smoothed as p_i = (c_i / N + eps) / (1 + k * eps), eps = 1e-4, k bins. It is a
  symmetrised KL divergence, so >= 0, and 0 for identical histograms.
* KS = sup_x |F_base(x) - F_live(x)|: F_live is the live sample's ECDF, F_base the piecewise-linear
  CDF through the stored (quantile, probability) points, right-continuous at repeated quantiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.definitions import DriftThresholds

__all__ = ["EPS", "PROBS", "drift_status", "feature_stats", "ks", "psi"]

PROBS = np.linspace(0.0, 1.0, 101)
EPS = 1e-4


def feature_stats(values: Any, edges: Sequence[float] | None = None) -> dict[str, Any]:
    """Statistics of ``values`` (see the module doc); histogram on ``edges`` if given (live side)."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    x = arr[np.isfinite(arr)]
    n = len(arr)
    quantiles = np.quantile(x, PROBS) if len(x) else np.zeros(0)
    if edges is None:
        edges_arr = np.unique(quantiles[10:100:10]) if len(x) else np.zeros(0)
    else:
        edges_arr = np.asarray(edges, dtype=np.float64)
    counts = np.bincount(np.searchsorted(edges_arr, x, side="right"), minlength=len(edges_arr) + 1)
    return {
        "n": n,
        "count": len(x),
        "null_rate": float(1 - len(x) / n) if n else 0.0,
        "mean": float(x.mean()) if len(x) else None,
        "std": float(x.std()) if len(x) else None,
        "quantiles": quantiles.tolist(),
        "edges": edges_arr.tolist(),
        "counts": counts.tolist(),
    }


def _proportions(counts: np.ndarray) -> np.ndarray:
    return (counts / counts.sum() + EPS) / (1 + len(counts) * EPS)


def psi(baseline: dict[str, Any], live: Any) -> float | None:
    """Population stability index of ``live`` (stats on the baseline's edges, or raw values)."""
    if not isinstance(live, dict):
        live = feature_stats(live, baseline["edges"])
    elif list(live["edges"]) != list(baseline["edges"]):
        raise ValueError("live statistics were binned on other edges than the baseline's")
    e_counts = np.asarray(baseline["counts"], dtype=np.float64)
    a_counts = np.asarray(live["counts"], dtype=np.float64)
    if not e_counts.sum() or not a_counts.sum():
        return None
    e, a = _proportions(e_counts), _proportions(a_counts)
    return max(0.0, float(np.sum((a - e) * np.log(a / e))))


def _cdf(q: np.ndarray, x: np.ndarray, left: bool) -> np.ndarray:
    """The baseline CDF at ``x`` (its left limit with ``left``): linear between stored quantiles."""
    j = np.searchsorted(q, x, side="left" if left else "right")
    lo, hi = np.clip(j - 1, 0, len(q) - 1), np.clip(j, 0, len(q) - 1)
    width = q[hi] - q[lo]
    frac = np.divide(x - q[lo], width, out=np.zeros_like(x), where=width > 0)
    inner = PROBS[lo] + (PROBS[hi] - PROBS[lo]) * frac
    return np.where(j == 0, 0.0, np.where(j == len(q), 1.0, inner))


def ks(baseline: dict[str, Any], live: Any) -> float | None:
    """Kolmogorov-Smirnov distance between the baseline sketch and the live values' ECDF."""
    arr = np.asarray(live, dtype=np.float64).ravel()
    x = np.sort(arr[np.isfinite(arr)])
    q = np.asarray(baseline["quantiles"], dtype=np.float64)
    if not len(x) or not len(q):
        return None
    pts, first = np.unique(x, return_index=True)
    below = first / len(x)  # F_live just before each distinct value
    at = np.append(first[1:], len(x)) / len(x)  # F_live at it
    d = max(
        np.abs(_cdf(q, pts, left=False) - at).max(),
        np.abs(_cdf(q, pts, left=True) - below).max(),
    )
    return float(min(1.0, d))


def drift_status(psi_value: float | None, ks_value: float | None, thresholds: DriftThresholds) -> str:
    """``alert`` if PSI or KS reaches its alert threshold, else ``warn`` if either warns, else ``ok``."""

    def reaches(value: float | None, limit: float) -> bool:
        return value is not None and value >= limit

    if reaches(psi_value, thresholds.psi_alert) or reaches(ks_value, thresholds.ks_alert):
        return "alert"
    if reaches(psi_value, thresholds.psi_warn) or reaches(ks_value, thresholds.ks_warn):
        return "warn"
    return "ok"
