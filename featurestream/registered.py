"""Registry-aware serving: which view versions a worker computes, and its periodic drift job.

A worker computes the pipeline's current definitions plus every registered version of the same
views that is not retired, so a breaking change runs side by side with the version it replaces
until that one is retired.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.definitions import FeatureView
from featurestream.config import Settings
from registry.core import Registry

__all__ = ["DriftWatch", "open_registry", "served_views", "start_drift_watch"]

log = logging.getLogger(__name__)


def open_registry(settings: Settings | None = None) -> Registry:
    """The registry the settings name (default: a SQLite file under the state dir)."""
    return Registry((settings or Settings()).resolved_registry_url())


def _registry_if_any(settings: Settings) -> Registry | None:
    url = settings.resolved_registry_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None  # nothing was ever applied here; do not create a registry just to look
    return Registry(url)


def served_views(views: list[FeatureView], settings: Settings) -> list[FeatureView]:
    """``views`` plus the other non-retired registered versions of the same names."""
    registry = _registry_if_any(settings)
    if registry is None:
        return list(views)
    from registry.versions import find_version, serving_views

    try:
        retired = [
            found
            for v in views
            if (found := find_version(registry, v.name, v.version)) and found.status == "retired"
        ]
        known = {v.version for v in views}
        names = [v.name for v in views]
        registered = [v for v in serving_views(registry, names) if v.version not in known]
    finally:
        registry.close()
    for found in retired:
        log.warning("%s is retired: not computed (its definition is still in the pipeline)", found.label)
    gone = {f.version_hash for f in retired}
    return [*(v for v in views if v.version not in gone), *registered]


class DriftWatch:
    """Measures drift of the views that have baselines every ``interval``, in a daemon thread.

    Each round measures the last two complete buckets (so a bucket is measured once more after
    late data settled), stores them in the registry and updates the drift gauges this worker
    exposes on ``/metrics``.
    """

    def __init__(
        self, views: list[FeatureView], settings: Settings, interval: float, bucket: timedelta
    ) -> None:
        self.views = views
        self.settings = settings
        self.interval = interval
        self.bucket = bucket
        self.stopped = threading.Event()
        self.rounds = 0
        self.thread = threading.Thread(target=self._loop, name="drift-watch", daemon=True)

    def start(self) -> DriftWatch:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def run_once(self) -> int:
        """One round; returns how many measurements were stored."""
        from featurestream.runtime import feature_store
        from registry.drift import baselines, measure_drift

        registry = _registry_if_any(self.settings)
        if registry is None:
            return 0
        stored = 0
        try:
            b = self.bucket.total_seconds()
            end = datetime.fromtimestamp((datetime.now(UTC).timestamp() // b) * b, UTC)
            for view in self.views:
                if not baselines(registry, view):
                    continue
                store = feature_store(view, settings=self.settings, start_services=False)
                stored += len(measure_drift(registry, store, view, end - 2 * self.bucket, end, self.bucket))
        finally:
            registry.close()
        self.rounds += 1
        return stored

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # drift monitoring must never stop the worker
                log.exception("drift measurement failed; retrying in %.0f s", self.interval)


def start_drift_watch(views: list[FeatureView], settings: Settings) -> DriftWatch | None:
    """Start the worker's drift job, unless ``drift_interval_seconds`` is 0."""
    if settings.drift_interval_seconds <= 0:
        return None
    bucket = timedelta(seconds=settings.drift_bucket_seconds)
    return DriftWatch(views, settings, settings.drift_interval_seconds, bucket).start()
