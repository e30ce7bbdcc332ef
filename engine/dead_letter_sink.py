"""The Bytewax sink of dead letters: decode and validation failures to the source's ``.dlq`` topic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.dead_letters import DeadLetterProducer
from engine.decode import DeadLetter
from engine.flow_io import STOP
from engine.writer import STOP_GRACE_SECONDS

__all__ = ["DeadLetterSink"]


class _DeadLetterPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        view: str,
        version: str,
        config: Mapping[str, Any] | None = None,
        limits: tuple[int | None, int | None] = (None, None),
    ) -> None:
        self.producer = DeadLetterProducer(
            bootstrap,
            dict(config or {}),
            max_value_bytes=limits[0],
            max_key_bytes=limits[1],
            stop=STOP,
            grace=STOP_GRACE_SECONDS,
        )
        self.topic = topic
        self.view = view
        self.version = version
        self.failed = False

    def write_batch(self, items: list[DeadLetter]) -> None:
        for letter in items:
            self.producer.send(self.topic, letter, self.view, self.version)
        try:
            self.producer.flush()
        except Exception:
            self.failed = True
            raise

    def close(self) -> None:
        if not self.failed:  # a second error while the dataflow unwinds would hide the first
            self.producer.flush()


class DeadLetterSink(DynamicSink[DeadLetter]):
    """Dead letters to ``<topic>.dlq``. Delivery: at least once (flushed per batch).

    Payloads over ``max_value_bytes``/``max_key_bytes`` are truncated, broker outages retried,
    letters the broker refuses sent as headers only: see
    :class:`~connectors.dead_letters.DeadLetterProducer`. A bad message never stops the flow.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        view: str,
        version: str = "",
        config: Mapping[str, Any] | None = None,
        *,
        max_value_bytes: int | None = None,
        max_key_bytes: int | None = None,
    ) -> None:
        self.args = (bootstrap, topic, view, version, config, (max_value_bytes, max_key_bytes))

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        return _DeadLetterPartition(*self.args)
