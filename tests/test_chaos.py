"""Hostile restarts: one entity's events spread over several partitions, workers stopped at random.

Producers keyed by something else than the entity (or round-robin) put one entity's events in
every partition. After a restart, a replay reads those partitions in its own order, so the online
store must order writes coming from different partitions of one entity. Every test checks Delta
(each (partition, offset) exactly once, right content), a training set and the online values
against a numpy oracle of every produced event: nothing lost, nothing counted twice.

The scenarios spend most of their time waiting on worker processes, so they run two at a time
(each with its own topic, Redis prefix and Delta root); each is still reported as its own test.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tests.chaos_helpers import (
    BASE,
    MIN,
    Chaos,
    Events,
    PacedProducer,
    chaos_run,
    compare,
    make_events,
    start_ready,
)
from tests.conftest import Services


def _assert_exact(chaos: Chaos, events: Events, produced: np.ndarray) -> None:
    result = compare(chaos, events, produced)
    report = result.text()
    print(report)
    assert result.delta_clean(), report
    assert result.clean("training set"), report
    assert result.clean("online"), report


def _publish(chaos: Chaos, events: Events) -> np.ndarray:
    producer = PacedProducer(chaos.kafka, chaos.topic, events, seconds=0.0)
    producer.start()
    producer.finish()
    return np.frombuffer(producer.produced, np.int64)


def _slice(events: Events, sel: slice) -> Events:
    return Events(events.entity[sel], events.ts[sel], events.amount[sel], events.partition[sel], events.names)


def _two_partitions(services: Services, tmp_path: Path, recovery: bool) -> None:
    """10 events of `u` in partition 1 are stored; the worker stops; 5 earlier ones arrive in
    partition 0; after the restart online, Delta and the training set all hold 15.

    With recovery the kill lands after the store write and before any snapshot (an hour apart),
    so the restart replays partition 1 next to the new events of partition 0.
    """
    chaos = Chaos(services.kafka, services.redis_url, tmp_path, 2, recovery, snapshot_seconds=3600)
    events = Events(
        entity=np.zeros(15, np.int64),
        ts=np.concatenate((BASE + 60 * MIN + np.arange(10) * 1000, BASE + np.arange(5) * 1000)),
        amount=np.concatenate((np.arange(1.0, 11.0), np.arange(100.0, 105.0))),
        partition=np.array([1] * 10 + [0] * 5),
        names=["u"],
    )
    produced = _publish(chaos, _slice(events, slice(0, 10)))
    worker = start_ready(chaos)
    try:
        store = chaos.store()
        at = datetime.fromtimestamp((BASE + 61 * MIN) / 1000, UTC)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = store.get_online_features(["chaos:count_2h"], ["u"], as_of=at)
            if got.values["chaos:count_2h"] == [10]:
                break
            time.sleep(0.1)
        assert got.values["chaos:count_2h"] == [10], "the first 10 events never reached Redis"
        worker.send_signal(signal.SIGKILL if recovery else signal.SIGTERM)
        code = worker.wait(60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert code == (-signal.SIGKILL if recovery else 0), chaos.tail()
    produced = np.concatenate((produced, _publish(chaos, _slice(events, slice(10, 15)))))
    final = chaos.start(bounded=True)
    assert final.wait(120) == 0, chaos.tail()
    _assert_exact(chaos, events, produced)


def _random_stops(services: Services, tmp_path: Path, recovery: bool) -> None:
    """4 partitions, every entity in all of them, events out of order within the lateness; the
    worker is stopped at seeded random moments (at least 12 times, and until the producer is
    done) while events keep arriving: kill -9 resuming from 1 s snapshots, or SIGTERM rebuilding
    from the topic's start. Then a bounded run catches up."""
    chaos = Chaos(services.kafka, services.redis_url, tmp_path, 4, recovery, snapshot_seconds=1)
    events = make_events(60_000, 300, 4, seed=7 if recovery else 11)
    outcome = chaos_run(
        chaos, events, stops=12, seed=3 if recovery else 5, max_delay=2.5, produce_seconds=20.0, say=print
    )
    print(f"{outcome.stops} stops; chaos and final run {outcome.seconds:.1f} s")
    assert outcome.stops >= 12
    _assert_exact(chaos, events, outcome.produced)


def _two_processes(services: Services, tmp_path: Path, recovery: bool) -> None:
    """The same with ``featurestream run -p 2``: every process of the group killed at once (resuming
    from the shared recovery dir), or the launcher asked to stop cleanly, at least 10 times."""
    chaos = Chaos(services.kafka, services.redis_url, tmp_path, 4, recovery, snapshot_seconds=1, processes=2)
    events = make_events(30_000, 200, 4, seed=13 if recovery else 17)
    outcome = chaos_run(
        chaos, events, stops=10, seed=19 if recovery else 23, max_delay=2.0, produce_seconds=15.0, say=print
    )
    assert outcome.stops >= 10
    _assert_exact(chaos, events, outcome.produced)


_SCENARIOS: dict[str, Callable[[Services, Path, bool], None]] = {
    "test_entity_in_two_partitions_survives_a_restart": _two_partitions,
    "test_random_stops_while_events_arrive_lose_and_duplicate_nothing": _random_stops,
    "test_two_processes_stopped_again_and_again_lose_and_duplicate_nothing": _two_processes,
}
_RECOVERY = {
    "kill-9-recovery-dir": True,
    "kill-9-group-recovery-dir": True,
    "sigterm-no-recovery": False,
}


@pytest.fixture(scope="module")
def scenarios(
    request: pytest.FixtureRequest, services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """The selected tests' scenarios, started in test order, two at a time; keyed by test id."""
    here = [item for item in request.session.items if item.module is request.module]
    with ThreadPoolExecutor(2, thread_name_prefix="chaos") as pool:
        futures = {}
        for item in here:
            run = _SCENARIOS[item.originalname]
            recovery = _RECOVERY[item.callspec.id]
            futures[item.name] = pool.submit(run, services, tmp_path_factory.mktemp("chaos"), recovery)
        yield futures
        for future in futures.values():
            future.cancel()


def _await(scenarios: dict[str, Future], request: pytest.FixtureRequest) -> None:
    scenarios[request.node.name].result(timeout=540)


@pytest.mark.parametrize("recovery", ["kill-9-recovery-dir", "sigterm-no-recovery"])
def test_entity_in_two_partitions_survives_a_restart(
    scenarios: dict[str, Future], request: pytest.FixtureRequest, recovery: str
) -> None:
    _await(scenarios, request)


@pytest.mark.parametrize("recovery", ["kill-9-recovery-dir", "sigterm-no-recovery"])
def test_random_stops_while_events_arrive_lose_and_duplicate_nothing(
    scenarios: dict[str, Future], request: pytest.FixtureRequest, recovery: str
) -> None:
    _await(scenarios, request)


@pytest.mark.parametrize("recovery", ["kill-9-group-recovery-dir", "sigterm-no-recovery"])
def test_two_processes_stopped_again_and_again_lose_and_duplicate_nothing(
    scenarios: dict[str, Future], request: pytest.FixtureRequest, recovery: str
) -> None:
    _await(scenarios, request)
