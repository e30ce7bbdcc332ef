"""The partition reader's batch read, on a real broker: every message once and in order, tombstones
and null keys kept as such, the oldest timestamp of each batch, and the garbage collector left as
the caller had it."""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from connectors.kafka import PartitionReader
from tests.conftest import Services

BASE_MS = 1_700_000_000_000


def _publish(bootstrap: str, topic: str, n: int) -> list[tuple[bytes | None, bytes | None, int]]:
    """``n`` messages to partition 0: (key, value, timestamp ms), timestamps shuffled, every fifth
    value a tombstone (None) and every seventh key None."""
    rng = random.Random(7)
    stamps = [BASE_MS + i * 10 for i in range(n)]
    rng.shuffle(stamps)
    sent = []
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(n):
        k = None if i % 7 == 3 else b'{"id":%d}' % i
        v = None if i % 5 == 4 else b'{"n":%d}' % i
        p.produce(topic, key=k, value=v, partition=0, timestamp=stamps[i])
        sent.append((k, v, stamps[i]))
    assert p.flush(30) == 0
    return sent


@pytest.mark.parametrize("collecting", [True, False])
def test_batches_hold_every_message_once_in_order_with_the_oldest_timestamp(
    services: Services, topic: Callable[..., str], collecting: bool
) -> None:
    name = topic()
    sent = _publish(services.kafka, name, 700)
    start = 123  # a stored position in the middle of the partition
    reader = PartitionReader(services.kafka, name, 0, start)
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    got: list[tuple[bytes | None, bytes, int]] = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < len(sent) - start and time.monotonic() < deadline:
            batch = reader.read(61, 0.2)  # many small batches, cut anywhere
            assert gc.isenabled() is collecting  # the reader leaves the collector as it was
            if batch is None:
                continue
            offsets = batch.offsets.tolist()
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
            assert reader.position == offsets[-1] + 1
            assert batch.produced_at == min(sent[o][2] for o in offsets) / 1000
            got += zip(batch.keys, batch.values, offsets, strict=True)
    finally:
        (gc.enable if was else gc.disable)()
        reader.close()
    assert [o for _, _, o in got] == list(range(start, len(sent)))
    assert [(k, v) for k, v, _ in got] == [(k, v or b"") for k, v, _ in sent[start:]]
