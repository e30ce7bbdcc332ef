"""The events of one shard of entities, and how a source batch is split into them.

Entities are spread over a fixed number of shards by a stable hash (CRC-32, never ``hash()``),
so any worker count or process count works with the same state layout.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine.flow_io import SourceBatch
from engine.sinks import shard_key

__all__ = ["ShardEvents", "shard_of", "split_shards"]


@dataclass
class ShardEvents:
    """The events of one batch that belong to one shard; ``keys[codes[i]]`` is event i's entity."""

    keys: list[str]
    codes: np.ndarray
    ts: np.ndarray
    columns: list[np.ndarray]
    read_at: float = 0.0  # when the batch was read from Kafka (wall clock)
    produced_at: float = float("nan")  # oldest Kafka message timestamp of the source batch
    partition: int = 0
    offsets: np.ndarray | None = None  # source offsets of the events, ascending
    text: dict[str, list] = field(default_factory=dict)  # values of text columns object aggregations read


def shard_of(entity: str, shards: int) -> int:
    return zlib.crc32(entity.encode()) % shards


def split_shards(
    batch: SourceBatch, shards: int, text_columns: tuple[str, ...] = ()
) -> list[tuple[str, ShardEvents]]:
    """The batch's events by shard; ``text_columns`` are text columns whose values go along."""
    if not batch.entity:
        return []
    enc = pa.array(batch.entity, pa.string()).dictionary_encode()
    uniq = enc.dictionary.to_pylist()
    codes = enc.indices.to_numpy()
    shard = np.fromiter((zlib.crc32(k.encode()) % shards for k in uniq), np.int64, len(uniq))[codes]
    order = np.argsort(shard, kind="stable")
    sorted_shards = shard[order]
    cuts = np.flatnonzero(np.concatenate(([True], sorted_shards[1:] != sorted_shards[:-1])))
    bounds = np.concatenate((cuts, [len(order)]))
    text = {c: np.array(batch.text[c], dtype=object) for c in text_columns}
    out = []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        idx = order[a:b]
        used, local = np.unique(codes[idx], return_inverse=True)
        out.append(
            (
                shard_key(int(sorted_shards[a])),
                ShardEvents(
                    keys=[uniq[u] for u in used.tolist()],
                    codes=local,
                    ts=batch.ts[idx],
                    columns=[c[idx] for c in batch.columns],
                    read_at=batch.read_at,
                    produced_at=batch.produced_at,
                    partition=batch.partition,
                    offsets=batch.offsets[idx],
                    text={c: v[idx].tolist() for c, v in text.items()},
                ),
            )
        )
    return out
