"""The change source's state record: whether a replication slot's initial snapshot finished.

It lives in a compacted topic ``<prefix>.cdc-state`` keyed by slot name, so the latest record per
slot outlives any retention and a restart knows whether to redo the snapshot.
"""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from connectors.cdc_config import CdcConfig, CdcError
from connectors.kafka import admin_client, ensure_topic

__all__ = ["ensure_state_topic", "read_state", "state_topic"]

_STATE_SUFFIX = ".cdc-state"


def state_topic(config: CdcConfig) -> str:
    return config.topic_prefix + _STATE_SUFFIX


def ensure_state_topic(config: CdcConfig) -> None:
    """The state topic, compacted: its latest record per slot must outlive any retention."""
    topic = state_topic(config)
    admin = admin_client(config.kafka_bootstrap_servers, config.kafka_config)
    if topic in admin.list_topics(timeout=10).topics:
        return
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=-1, config={"cleanup.policy": "compact"})]
    )
    try:
        futures[topic].result(10)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise CdcError(f"cannot create the state topic {topic}: {exc}") from None
    ensure_topic(config.kafka_bootstrap_servers, topic, 1, config=config.kafka_config)


def read_state(config: CdcConfig) -> dict[str, Any] | None:
    """The latest state record of ``config.slot`` (``None`` if none)."""
    topic = state_topic(config)
    consumer = Consumer(
        {
            **config.kafka_config,
            "bootstrap.servers": config.kafka_bootstrap_servers,
            "group.id": "featurestream-cdc-state",
            "enable.auto.commit": False,
        }
    )
    try:
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        latest, last_offset = None, -1
        # To the high watermark, then on until nothing more comes (a broker may report the
        # watermark before its newest batch is readable).
        while True:
            msgs = consumer.consume(500, 5.0 if last_offset < high - 1 else 0.5)
            if not msgs:
                if last_offset < high - 1:
                    raise CdcError(f"cannot read the state topic {topic} to its end ({high})")
                return latest
            for m in msgs:
                if m.error() is not None:
                    continue
                last_offset = max(last_offset, m.offset())
                if m.key() == config.slot.encode() and m.value():
                    latest = json.loads(m.value())
    finally:
        consumer.close()
