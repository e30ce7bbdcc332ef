"""Prometheus metrics of a ``featurestream verify`` run, for a textfile collector or a Pushgateway.

A verify run is a batch job, not a server: its gauges live in their own registry (not the
worker's), written once per run. Labels are bounded: a view and a feature, never an entity.
"""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

from engine.verify import VerifyReport

__all__ = ["metrics_registry", "push_metrics", "write_metrics"]


def metrics_registry(report: VerifyReport) -> CollectorRegistry:
    registry = CollectorRegistry()
    ratio = Gauge(
        "featurestream_verify_mismatch_ratio",
        "Share of sampled entities whose online or offline value differs from the raw events",
        ["view", "feature"],
        registry=registry,
    )
    for check in report.checks.values():
        ratio.labels(view=report.view, feature=check.feature).set(check.ratio)
    fresh = Gauge(
        "featurestream_verify_freshness_seconds",
        "Newest event time in the source topic minus the newest the online store shows",
        ["view"],
        registry=registry,
    )
    fresh.labels(view=report.view).set(
        math.nan if report.freshness_seconds is None else report.freshness_seconds
    )
    return registry


def write_metrics(report: VerifyReport, path: Path) -> None:
    """Write atomically (the collector never reads half a file)."""
    write_to_textfile(str(path), metrics_registry(report))


def push_metrics(report: VerifyReport, gateway: str) -> None:
    push_to_gateway(
        gateway,
        job="featurestream_verify",
        registry=metrics_registry(report),
        grouping_key={"view": report.view},
    )
