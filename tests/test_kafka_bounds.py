"""A bounded read that resumes inside the partition's last batch still reads to the real end.

Some brokers (Tansu) answer ListOffsets with the last batch's base offset + 1, not the log end. A
bounded reader whose stored position equals that understated end must not conclude it is done
(it would skip the rest of the batch in this run), and a reader placed past the understated end,
inside the batch, must not be refused as "beyond the end"."""

from __future__ import annotations

from confluent_kafka import Producer

from connectors.kafka import PartitionReader
from tests.conftest import Services


def _one_batch(kafka: str, topic: str, n: int) -> None:
    p = Producer({"bootstrap.servers": kafka, "linger.ms": 200, "batch.num.messages": 10_000})
    for i in range(n):
        p.produce(topic, value=f"m{i}".encode(), partition=0)
    assert p.flush(30) == 0


def _drain(reader: PartitionReader) -> list[int]:
    seen: list[int] = []
    for _ in range(200):
        if reader.at_end:
            break
        batch = reader.read(1_000, 0.1)
        if batch is not None:
            seen.extend(batch.offsets.tolist())
    return seen


def test_resuming_at_each_offset_of_the_last_batch_reads_to_the_end(services: Services, topic) -> None:
    name = topic(partitions=1)
    _one_batch(services.kafka, name, 10)
    for start in (0, 1, 5, 9):
        reader = PartitionReader(services.kafka, name, 0, start, stop_at_end=True)
        try:
            assert _drain(reader) == list(range(start, 10)), start
        finally:
            reader.close()
    at_end = PartitionReader(services.kafka, name, 0, 10, stop_at_end=True)
    try:
        assert at_end.at_end and _drain(at_end) == []
    finally:
        at_end.close()
