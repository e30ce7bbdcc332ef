"""Algebra of the object-tile states (engine.sketches via engine.object_tiles): merge is
associative and commutative, incremental == batch (any split of a tile's events merged in any
order gives the state built at once), and states survive pickle and the Redis record bytes."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import sketches as sk
from engine.object_tiles import (
    build_states,
    decode_records,
    empty_states,
    encode_record,
    merge_states,
    object_specs,
)
from tests.aggregations_helpers import TEXTS, view

SPECS = object_specs(view())

_event = st.tuples(
    st.integers(0, 20),  # ts: many ties
    st.integers(0, 3),  # partition
    st.one_of(
        st.none(), st.floats(allow_nan=False, allow_infinity=False, width=64), st.sampled_from([0.0, -0.0])
    ),
    st.one_of(st.none(), st.sampled_from(TEXTS), st.text(max_size=8)),
)
_events = st.lists(_event, max_size=40)


def _build(evs: list[tuple], base: int = 0) -> list:
    """States of events numbered from ``base`` (their offsets, so distinct events stay distinct)."""
    ts = [e[0] for e in evs]
    part = [e[1] for e in evs]
    off = [base + i for i in range(len(evs))]
    return build_states(SPECS, ts, part, off, {"x": [e[2] for e in evs], "m": [e[3] for e in evs]})


def _canon(states: list) -> bytes:
    """States as comparable bytes (the Redis record)."""
    return encode_record(SPECS, 0, states)


@settings(max_examples=150, deadline=None)
@given(_events, st.lists(st.integers(0, 40), max_size=4), st.randoms(use_true_random=False))
def test_incremental_equals_batch_in_any_order(evs: list, cuts: list[int], rnd) -> None:
    whole = _build(evs)
    bounds = sorted({0, len(evs), *(min(c, len(evs)) for c in cuts)})
    parts = [_build(evs[a:b], a) for a, b in itertools.pairwise(bounds)]
    rnd.shuffle(parts)
    acc = empty_states(SPECS)
    for p in parts:
        acc = merge_states(SPECS, acc, p)
    assert _canon(acc) == _canon(whole)


@settings(max_examples=100, deadline=None)
@given(_events, _events, _events)
def test_merge_is_associative_and_commutative(a: list, b: list, c: list) -> None:
    sa, sb, sc = _build(a, 0), _build(b, 1000), _build(c, 2000)
    left = merge_states(SPECS, merge_states(SPECS, sa, sb), sc)
    right = merge_states(SPECS, sa, merge_states(SPECS, sb, sc))
    assert _canon(left) == _canon(right)
    assert _canon(merge_states(SPECS, sa, sb)) == _canon(merge_states(SPECS, sb, sa))


@settings(max_examples=100, deadline=None)
@given(_events, st.integers(0, 2**32 - 1))
def test_state_round_trips_pickle_and_record_bytes(evs: list, tile: int) -> None:
    states = _build(evs)
    assert _canon(pickle.loads(pickle.dumps(states))) == _canon(states)
    blob = encode_record(SPECS, tile, states) + encode_record(SPECS, tile + 1, empty_states(SPECS))
    back = decode_records(SPECS, blob)
    assert sorted(back) == [tile, tile + 1]
    assert _canon(back[tile]) == _canon(states)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=0, max_size=3000), st.integers(1, 5))
def test_distinct_is_exact_below_the_bound_and_split_independent(values: list[int], k: int) -> None:
    parts = [values[i::k] for i in range(k)]
    acc = sk.distinct_build([])
    for p in parts:
        acc = sk.distinct_merge(acc, sk.distinct_build([str(v) for v in p]))
    assert acc == sk.distinct_build([str(v) for v in values])
    n = len(set(values))
    if n < sk.DISTINCT_K:
        assert sk.distinct_estimate(acc) == n
    else:
        assert abs(sk.distinct_estimate(acc) - n) <= 0.15 * n


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=1, max_size=300),
    st.floats(0.001, 0.999),
)
def test_percentile_within_relative_accuracy(values: list[float], q: float) -> None:
    got = sk.quantile_value(sk.quantile_build(values), q)
    want = sorted(values)[int(np.floor(q * (len(values) - 1)))]
    tiny = sk._MAPPING.min_possible
    assert abs(got - want) <= sk.QUANTILE_ALPHA * abs(want) + tiny, (got, want)
