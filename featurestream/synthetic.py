"""Synthetic card transactions for the demo and benchmarks, with deliberate bad and late events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

__all__ = ["Event", "card_transactions"]

_CATEGORIES = ["grocery", "fuel", "restaurant", "travel", "electronics", "fashion", "pharmacy", "gaming"]
_MEDIANS = np.array([35.0, 55.0, 28.0, 420.0, 310.0, 85.0, 22.0, 15.0])
_COUNTRIES = ["DE", "FR", "GB", "US", "NL", "ES", "IT", "PL"]
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Event:
    """One message to publish; ``kind`` is "ok", "late" or the flaw of a malformed one."""

    key: bytes
    value: bytes
    kind: str
    ts: int


def card_transactions(
    n_events: int,
    n_users: int,
    *,
    end_ms: int,
    span_ms: int = 2 * 3_600_000,
    seed: int = 7,
    malformed_rate: float = 0.0,
    late_rate: float = 0.0,
    late_by_ms: int = 15 * 60_000,
    jitter_ms: int = 20_000,
) -> Iterator[Event]:
    """Events in roughly event-time order over ``[end_ms - span_ms, end_ms]``.

    Users' activity is skewed (a few are very active), amounts are log-normal per merchant
    category, timestamps jitter by up to ``jitter_ms`` (out of order, within lateness), and
    ``late_rate`` of events arrive ``late_by_ms`` or more behind the stream.
    """
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.8, n_users)
    users = rng.choice(n_users, size=n_events, p=weights / weights.sum())
    base = end_ms - span_ms + (np.arange(n_events, dtype=np.int64) * span_ms) // max(n_events, 1)
    ts = base - rng.integers(0, jitter_ms + 1, n_events)
    ts = np.minimum(ts, end_ms)
    late = rng.random(n_events) < late_rate
    ts = np.where(late, ts - late_by_ms - rng.integers(0, late_by_ms, n_events), ts)
    cat = rng.integers(0, len(_CATEGORIES), n_events)
    amount = np.round(_MEDIANS[cat] * rng.lognormal(0.0, 0.6, n_events), 2)
    merchant = rng.integers(0, 2_000, n_events)
    country = rng.integers(0, len(_COUNTRIES), n_events)
    online = rng.random(n_events) < 0.3
    broken = rng.random(n_events) < malformed_rate
    flaw = rng.integers(0, 4, n_events)
    for i in range(n_events):
        uid = f"user_{users[i]:06d}"
        event = {
            "user_id": uid,
            "card_id": f"card_{users[i]:06d}_{users[i] % 3}",
            "merchant": f"m_{merchant[i]:05d}",
            "category": _CATEGORIES[cat[i]],
            "amount": float(amount[i]),
            "country": _COUNTRIES[country[i]],
            "is_online": bool(online[i]),
            "ts": int(ts[i]),
        }
        kind = "late" if late[i] else "ok"
        if broken[i]:
            kind = ("malformed_json", "missing_field", "invalid_type", "bad_timestamp")[flaw[i]]
            if kind == "malformed_json":
                yield Event(uid.encode(), _encode(event)[:-7], kind, int(ts[i]))
                continue
            if kind == "missing_field":
                del event["amount"]
            elif kind == "invalid_type":
                event["amount"] = f"{event['amount']} EUR"
            else:
                event["ts"] = "yesterday"
        yield Event(uid.encode(), _encode(event), kind, int(ts[i]))
