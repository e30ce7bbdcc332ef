"""Multi-resolution tiles, unit level: each window's precision, the levels a view keeps, and the
tile ranges a window reads at each level, against the documented rule (tests.multires_helpers)."""

from __future__ import annotations

import hashlib
import itertools
import json
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.definitions import Aggregation, FeatureView, Window
from engine.errors import DefinitionError
from engine.tiles import window_tile_range
from tests.multires_helpers import (
    DAY,
    DAY0,
    HOUR,
    MIN,
    SEC,
    aggregate,
    ladder,
    levels,
    precision,
    span,
    view_of,
    window_aggregations,
    window_of,
)


def _levels() -> ModuleType:
    import engine.levels

    return engine.levels


def _window(kind: str, size_ms: int, hop_ms: int | None = None) -> Window:
    size = f"{size_ms}ms"
    if kind == "sliding":
        return Window.sliding(size)
    if kind == "tumbling":
        return Window.tumbling(size)
    return Window.hopping(size, hop=f"{hop_ms}ms")


def _view(*windows: Window, tile_ms: int = MIN, name: str | None = None) -> FeatureView:
    aggs = tuple(
        Aggregation(function="sum", column="amount", window=w, name=name if i == 0 else None)
        for i, w in enumerate(windows)
    )
    return view_of("levels", "payments.v1", aggs, tile_size=f"{tile_ms // SEC}s")


# ---------------------------------------------------------------------------------------------
# the oracle itself, on cases computed by hand


def test_oracle_rule_on_hand_computed_cases() -> None:
    assert ladder(MIN) == (HOUR, DAY)
    assert ladder(7 * MIN) == ()  # 1h and 1d are not multiples of 7 minutes
    assert ladder(16 * MIN) == (DAY,)  # 86,400 s / 960 s = 90; 3,600 / 960 is not whole
    assert ladder(HOUR) == (DAY,)
    assert precision("sliding", DAY, None, MIN) == MIN  # 1,440 tiles
    assert precision("sliding", 10_000 * MIN, None, MIN) == MIN  # exactly the old limit
    assert precision("sliding", 10_001 * MIN, None, MIN) == HOUR  # 166.7 hours
    assert precision("sliding", 30 * DAY, None, MIN) == HOUR  # 720 hours
    assert precision("sliding", 1_000 * HOUR, None, MIN) == HOUR  # exactly 1,000 hours
    assert precision("sliding", 1_001 * HOUR, None, MIN) == DAY
    assert precision("sliding", 1_000 * HOUR + MIN, None, MIN) == DAY  # 1,000.02 hours
    assert precision("sliding", 90 * DAY, None, MIN) == DAY  # 2,160 hours > 1,000; 90 days
    assert precision("tumbling", 20 * DAY, None, MIN) == HOUR  # 480 hours
    assert precision("tumbling", 10_001 * MIN, None, MIN) is None  # no level divides it
    assert precision("hopping", 90 * DAY, 36 * HOUR, MIN) is None  # 2,160 hours; 1d does not divide 36h
    assert precision("hopping", 60 * DAY, 2 * DAY, MIN) == DAY
    assert precision("sliding", 50 * 365 * DAY, None, MIN) is None  # 18,250 days
    assert precision("sliding", 3 * HOUR, None, SEC) == HOUR  # 10,800 one-second tiles
    assert levels([MIN, DAY], MIN) == (MIN, HOUR, DAY)  # the 1h level comes with the 1d one
    assert levels([MIN], MIN) == (MIN,)
    assert levels([16 * MIN, DAY], 16 * MIN) == (16 * MIN, DAY)
    t = DAY0 + 5 * DAY + 3 * HOUR + 17 * MIN + 5 * SEC
    assert span("sliding", 90 * DAY, None, DAY, t) == (DAY0 - 84 * DAY, t)
    assert span("sliding", 30 * DAY, None, HOUR, t) == (DAY0 - 25 * DAY + 4 * HOUR, t)
    assert span("sliding", 10 * MIN, None, MIN, t) == (t - 5 * SEC - 9 * MIN, t)
    # DAY0 is day 19,723 since the epoch: weeks end on day 19,726, even days on day 19,724.
    assert span("tumbling", 7 * DAY, None, HOUR, t) == (DAY0 - 4 * DAY, DAY0 + 3 * DAY - 1)
    assert span("hopping", 60 * DAY, 2 * DAY, DAY, DAY0 + DAY) == (DAY0 - 59 * DAY, DAY0 + DAY - 1)
    assert span("hopping", 60 * DAY, 2 * DAY, DAY, DAY0 + DAY - 1) == (DAY0 - 61 * DAY, DAY0 - DAY - 1)


def test_oracle_aggregates_on_hand_computed_cases() -> None:
    got = aggregate(np.array([2.0, np.nan, 4.0, 9.0]), ["a", None, "b", "a"])
    assert got == {
        "events": 4,
        "count": 3,
        "sum": 15.0,
        "count_distinct": 2,
        "mean": 5.0,
        "min": 2.0,
        "max": 9.0,
        "last": 9.0,
        "stddev": pytest.approx(((9 + 1 + 16) / 2) ** 0.5),
    }
    empty = aggregate(np.array([np.nan]), [None])
    assert empty["events"] == 1 and empty["count"] == 0 and empty["sum"] == 0.0
    assert empty["mean"] is empty["stddev"] is empty["last"] is None and empty["count_distinct"] == 0
    assert aggregate(np.array([3.0]), ["x"])["stddev"] is None  # sample deviation of one value


# ---------------------------------------------------------------------------------------------
# definitions


@pytest.mark.parametrize(
    ("kind", "size", "hop", "expected"),
    [
        ("sliding", 10 * MIN, None, MIN),
        ("sliding", DAY, None, MIN),
        ("sliding", 10_000 * MIN, None, MIN),
        ("sliding", 10_001 * MIN, None, HOUR),
        ("sliding", 30 * DAY, None, HOUR),
        ("sliding", 1_000 * HOUR, None, HOUR),
        ("sliding", 1_001 * HOUR, None, DAY),
        ("sliding", 1_000 * HOUR + 30 * MIN, None, DAY),  # 1,000.5 hours > 1,000
        ("sliding", 90 * DAY, None, DAY),
        ("tumbling", 20 * DAY, None, HOUR),
        ("tumbling", 7 * DAY, None, HOUR),
        ("tumbling", 90 * DAY, None, DAY),
        ("hopping", 30 * DAY, DAY, HOUR),
        ("hopping", 60 * DAY, 2 * DAY, DAY),
        ("hopping", DAY, 10 * MIN, MIN),
    ],
)
def test_window_precision(kind: str, size: int, hop: int | None, expected: int) -> None:
    assert precision(kind, size, hop, MIN) == expected  # the oracle agrees with the hand value
    agg = Aggregation(function="sum", column="amount", window=_window(kind, size, hop))
    assert _levels().window_precision_ms(agg, MIN) == expected
    view = _view(agg.window)
    assert view.tile_levels_ms == levels([expected], MIN)
    assert _levels().view_levels(view) == view.tile_levels_ms


def test_long_windows_accepted_with_their_levels() -> None:
    ninety = _view(Window.sliding("90d"), Window.sliding("10m"))
    assert ninety.tile_levels_ms == (MIN, HOUR, DAY)
    assert _view(Window.sliding("30d")).tile_levels_ms == (MIN, HOUR)
    assert _view(Window.tumbling("20d")).tile_levels_ms == (MIN, HOUR)
    assert _view(Window.sliding("1d"), Window.tumbling("1h")).tile_levels_ms == (MIN,)
    assert _view(Window.sliding("200d"), tile_ms=16 * MIN).tile_levels_ms == (16 * MIN, DAY)
    assert _view(Window.sliding("3h"), tile_ms=SEC).tile_levels_ms == (SEC, HOUR)


@pytest.mark.parametrize(
    ("window", "tile_ms"),
    [
        (Window.hopping("90d", hop="36h"), MIN),  # 1h: 2,160 tiles; 1d does not divide 36h
        (Window.sliding(f"{50 * 365}d"), MIN),  # 18,250 days
        (Window.tumbling(f"{10_001}m"), MIN),  # neither 1h nor 1d divides it
        (Window.sliding(f"{7 * 10_001}m"), 7 * MIN),  # no coarse level fits 7-minute tiles
        (Window.sliding(f"{10_001}d"), DAY),  # nothing coarser than 1-day tiles
    ],
)
def test_windows_no_level_fits_are_rejected(window: Window, tile_ms: int) -> None:
    with pytest.raises(DefinitionError) as info:
        _view(Window.sliding(f"{tile_ms}ms"), window, tile_ms=tile_ms)
    agg = Aggregation(function="sum", column="amount", window=window)
    assert agg.feature_name in str(info.value)
    with pytest.raises(DefinitionError) as named:
        _view(window, tile_ms=tile_ms, name="lifetime_spend")
    assert "lifetime_spend" in str(named.value)


def test_versions_of_fine_views_unchanged() -> None:
    """Views whose windows all stay at tile precision keep the version they had before coarse
    levels existed (values pinned from the definitions as they were), and no new canonical key."""
    fine = {
        "10m": ("sliding", 10 * MIN, None),
        "1h": ("sliding", HOUR, None),
        "1d": ("sliding", DAY, None),
        "limit": ("sliding", 10_000 * MIN, None),
        "6d_tumbling": ("tumbling", 6 * DAY, None),
        "1d_every_1h": ("hopping", DAY, HOUR),
    }
    a = view_of("multires_fine", "payments.v1", window_aggregations(fine))
    b = view_of("multires_fine", "payments.v1", window_aggregations(fine))
    hourly = {"365d": ("sliding", 365 * DAY, None), "30d_tumbling": ("tumbling", 30 * DAY, None)}
    c = view_of("multires_hourly", "payments.v1", window_aggregations(hourly), tile_size="1h")
    assert a.version == b.version == "b800b5a4ccf4"
    assert c.version == "796527d4dee5"
    for v in (a, c):
        canonical = v.canonical()
        assert "tile_levels_ms" not in canonical
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        assert v.version == hashlib.sha256(blob.encode()).hexdigest()[:12]
        assert v.tile_levels_ms == (round(v.tile_size.total_seconds() * 1000),)
    coarse = view_of(
        "multires_fine", "payments.v1", window_aggregations({**fine, "90d": ("sliding", 90 * DAY, None)})
    )
    assert tuple(coarse.canonical()["tile_levels_ms"]) == (MIN, HOUR, DAY)
    assert coarse.version != a.version


def test_level_namespaces_share_no_key() -> None:
    """No entity id can make one level's key (tiles, guard or objects) equal another's, or a
    session key: no namespace is a prefix of another."""
    from connectors.redis_store import RedisOnlineStore
    from engine.sessions import session_namespace

    ns = RedisOnlineStore.namespace_of("fs", "levels", "0123456789ab")
    spaces = [ns, session_namespace(ns)]
    for level in (HOUR, DAY, 16 * MIN):
        spaces.append(_levels().level_namespace(ns, level))
    spaces += [
        f(s)
        for s in list(spaces)
        for f in (RedisOnlineStore.guard_namespace, RedisOnlineStore.objects_namespace)
    ]
    assert len(set(spaces)) == len(spaces), spaces
    for a, b in itertools.permutations(spaces, 2):
        assert not a.startswith(b), (a, b)


# ---------------------------------------------------------------------------------------------
# window ranges


def test_window_tile_range_starts_at_the_precision() -> None:
    t = np.array([DAY0 + 5 * DAY + 3 * HOUR + 17 * MIN + 5 * SEC, DAY0 + 7 * DAY - 1, DAY0 + 7 * DAY])
    ninety = Aggregation(function="count", window="90d")
    lo, hi, partial = window_tile_range(ninety, MIN, t)
    assert partial
    assert lo.tolist() == [((x - 90 * DAY) // DAY + 1) * DAY // MIN for x in t.tolist()]
    assert hi.tolist() == (t // MIN).tolist()
    thirty = Aggregation(function="count", window="30d")
    lo, _, _ = window_tile_range(thirty, MIN, t)
    assert lo.tolist() == [((x - 30 * DAY) // HOUR + 1) * HOUR // MIN for x in t.tolist()]
    day = Aggregation(function="count", window="1d")  # unchanged: tile precision
    lo, _, _ = window_tile_range(day, MIN, t)
    assert lo.tolist() == ((t - DAY) // MIN + 1).tolist()
    tumbling = Aggregation(function="count", window=Window.tumbling("30d"))
    lo, hi, partial = window_tile_range(tumbling, MIN, t)
    end = (t // (30 * DAY)) * 30 * DAY
    assert not partial
    assert lo.tolist() == ((end - 30 * DAY) // MIN).tolist() and hi.tolist() == (end // MIN - 1).tolist()


COARSE = 1_000  # coarse tiles a window may span
TILES = (SEC, 5 * SEC, 30 * SEC, MIN, 90 * SEC, 5 * MIN, 16 * MIN, HOUR)


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, str, int, int | None]:
    """(tile, kind, size, hop): sizes at every scale, hops that some levels divide and some not."""
    tile = draw(st.sampled_from(TILES))
    kind = draw(st.sampled_from(("sliding", "tumbling", "hopping")))
    unit = draw(st.sampled_from((tile, *ladder(tile))))
    size = unit * draw(st.integers(1, 1_200))
    if draw(st.booleans()):  # not a whole number of coarse tiles
        size += tile * draw(st.integers(0, unit // tile - 1))
    hop = None
    if kind == "hopping":
        d = draw(st.integers(1, 48))
        hop = size // d if (size // d) % tile == 0 else size
    return tile, kind, size, hop


@given(
    w=windows(),
    t=st.integers(0, 4 * 10**12),
    align=st.sampled_from((None, MIN, HOUR, DAY)),
    nudge=st.integers(-1, 1),
    with_longest=st.booleans(),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_window_ranges_cover_the_window_exactly(
    w: tuple[int, str, int, int | None], t: int, align: int | None, nudge: int, with_longest: bool
) -> None:
    """The (level, lo, hi) ranges a window reads are disjoint, cover exactly its span (to the
    level-0 tile holding ``t`` for a sliding window), at levels the view keeps, within the
    count bound; window_tile_range gives the same span in level-0 tiles."""
    tile, kind, size, hop = w
    if align:
        t = max(0, (t // align) * align + nudge)
    window = _window(kind, size, hop)
    extra = []
    longest = ("sliding", COARSE * ladder(tile)[-1], None) if ladder(tile) else None
    if with_longest and longest and longest != (kind, size, hop):  # every level kept
        extra = [_window(*longest)]
    r = precision(kind, size, hop, tile)
    if r is None:
        with pytest.raises(DefinitionError):
            _view(window, *extra, tile_ms=tile)
        return
    view = _view(window, *extra, tile_ms=tile)
    agg = view.aggregations[0]
    assert window_of(agg) == (kind, size, hop if kind == "hopping" else None)
    rs = [r] + [precision(*window_of(a), tile) for a in view.aggregations[1:]]
    assert view.tile_levels_ms == levels(rs, tile)  # type: ignore[arg-type]
    assert _levels().window_precision_ms(agg, tile) == r
    ranges = _levels().window_ranges(view, agg, t)
    start, end = span(kind, size, hop, r, t)
    if kind == "sliding":
        end = (t // tile + 1) * tile - 1  # the level-0 tile holding t, cut at t when read
    pieces = sorted((lo * level, (hi + 1) * level - 1, level) for level, lo, hi in ranges)
    assert all(level in view.tile_levels_ms for _, _, level in pieces), ranges
    assert all(a <= b for a, b, _ in pieces), ranges
    assert pieces[0][0] == start, (ranges, start)
    assert pieces[-1][1] == end, (ranges, end)
    for (_, b, _), (a, _, _) in itertools.pairwise(pieces):
        assert a == b + 1, ranges  # disjoint and without a hole
    lv = view.tile_levels_ms
    bound = size / r + 1 + sum(b // a for a, b in itertools.pairwise(lv))
    assert sum(hi - lo + 1 for _, lo, hi in ranges) <= bound, (len(ranges), bound)
    lo0, hi0, _ = window_tile_range(agg, tile, np.array([t]))
    assert (int(lo0[0]) * tile, (int(hi0[0]) + 1) * tile - 1) == (start, end)


@given(w=windows())
@settings(max_examples=300, deadline=None)
def test_window_precision_follows_the_rule(w: tuple[int, str, int, int | None]) -> None:
    tile, kind, size, hop = w
    agg = Aggregation(function="count", window=_window(kind, size, hop))
    expected = precision(kind, size, hop, tile)
    if expected is None:
        with pytest.raises(DefinitionError) as info:
            _view(agg.window, tile_ms=tile)
        assert "amount_sum_" in str(info.value)
        return
    assert _levels().window_precision_ms(agg, tile) == expected
