"""Verify a feature view against its raw events: online, offline and a recomputation agree.

For a sample of entities, each feature is read online (as of now), offline (a training set at
the same time) and recomputed here from the source topic, read independently of the dataflow
(every partition from its log start, :mod:`engine.verify_source`) and aggregated with numpy
following docs/windows.md (:mod:`engine.verify_recompute`: time, session and object windows).

Tolerance: counts, ``min``, ``max``, ``first``, ``last``, ``last_n`` and ``count_distinct``
(below its sketch's bound) must be equal; ``sum``, ``mean``, ``variance``, ``stddev`` and
``duration`` within a relative 1e-9 (and absolute 1e-9), as float sums may add in another order.
``percentile`` and ``top_k`` (approximate sketches) are listed as not checked.

On a live pipeline, an entity with events that reached the topic while its stores were read
cannot be judged (the worker may or may not have applied them): it is counted as unsettled, not
compared. Freshness is the newest accepted event time in the source minus the newest event time
the online store shows for the sampled entities (the entity of the newest event is always sampled).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from engine.definitions import FeatureView
from engine.verify_recompute import NOT_JUDGED, RECOMPUTED, checkable, recompute, same
from engine.verify_source import SourceEvents, moved_entities, read_source

__all__ = ["RECOMPUTED", "FeatureCheck", "VerifyReport", "recompute", "same", "verify_view"]


@dataclass
class FeatureCheck:
    feature: str
    compared: int = 0
    mismatched: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.mismatched / self.compared if self.compared else 0.0


@dataclass
class VerifyReport:
    view: str
    version: str
    sampled: int
    unsettled: int
    checks: dict[str, FeatureCheck]
    freshness_seconds: float | None
    newest_source: datetime | None
    source: SourceEvents
    not_checked: list[str] = field(default_factory=list)  # features verify cannot recompute

    @property
    def mismatches(self) -> int:
        return sum(c.mismatched for c in self.checks.values())


def _sample(events: SourceEvents, n: int, seed: int | None) -> list[str]:
    entities = sorted(set(events.entity.tolist()))
    rng = random.Random(seed)
    chosen = entities if len(entities) <= n else rng.sample(entities, n)
    if len(events.ts):
        newest = str(events.entity[int(np.argmax(events.ts))])
        if newest not in chosen:
            chosen = [*chosen[: max(0, n - 1)], newest]
    return chosen


def verify_view(
    store: Any,
    view: FeatureView,
    bootstrap: str,
    *,
    sample: int = 100,
    seed: int | None = None,
    kafka_config: dict[str, Any] | None = None,
    at: datetime | None = None,
    max_examples: int = 5,
) -> VerifyReport:
    """Compare every aggregation of ``view`` online, offline and recomputed, for ``sample``
    entities as of ``at`` (default now). ``store`` is a :class:`featurestream.client.FeatureStore`."""
    events = read_source(view, bootstrap, kafka_config)
    entities = _sample(events, sample, seed)
    at = at or datetime.now(UTC)
    t = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    aggs = [a for a in view.aggregations if checkable(view, a)]
    names = [f"{view.name}:{a.feature_name}" for a in aggs]
    keys = list(view.entity.join_keys)
    checks = {a.feature_name: FeatureCheck(a.feature_name) for a in aggs}
    skipped = [a.feature_name for a in view.aggregations if a not in aggs]
    if not entities or not aggs:
        return VerifyReport(view.name, view.version, 0, 0, checks, None, None, events, skipped)
    rows = [events.keys[e] for e in entities]
    online = store.get_online_features(names, rows, as_of=at)
    times = online.event_times
    frame = pa.table(
        {
            **{k: [r[k] for r in rows] for k in keys},
            "event_timestamp": pa.array([at] * len(entities), pa.timestamp("us", tz="UTC")),
        }
    )
    offline = store.get_training_set(frame, names).to_pydict()
    moved = moved_entities(view, bootstrap, kafka_config, events)
    starts = np.searchsorted(events.entity, np.array(entities, dtype=object), side="left")
    stops = np.searchsorted(events.entity, np.array(entities, dtype=object), side="right")
    unsettled = 0
    newest_online = -np.inf
    for i, entity in enumerate(entities):
        for name in names:
            stamp = times[name][i]
            if stamp is not None:
                newest_online = max(newest_online, stamp.timestamp() * 1000)
        if entity in moved:
            unsettled += 1
            continue
        sl = slice(int(starts[i]), int(stops[i]))
        for agg, name in zip(aggs, names, strict=True):
            column = None if agg.column is None else events.columns[agg.column][sl]
            want = recompute(view, agg, events.ts[sl], column, t)
            if want is NOT_JUDGED:
                continue
            check = checks[agg.feature_name]
            reads = [("online", online.values[name][i]), ("offline", offline[name][i])]
            check.compared += 1
            wrong = [f"{where} {got!r}" for where, got in reads if not same(agg.function, got, want)]
            if wrong:
                check.mismatched += 1
                if len(check.examples) < max_examples:
                    check.examples.append(f"{entity}: {', '.join(wrong)}; from the events {want!r}")
    newest = float(events.ts.max()) if len(events.ts) else None
    fresh = None
    if newest is not None:
        fresh = max(0.0, (newest - newest_online) / 1000) if newest_online > -np.inf else float("inf")
    return VerifyReport(
        view.name,
        view.version,
        len(entities),
        unsettled,
        checks,
        fresh,
        datetime.fromtimestamp(newest / 1000, UTC) if newest is not None else None,
        events,
        skipped,
    )
