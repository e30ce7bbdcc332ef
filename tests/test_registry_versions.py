"""Feature view versions: classification, immutable versions and their lifecycle.

Every registry test runs on SQLite and on PostgreSQL (see tests/registry_fixtures.py). Concurrent
applies are in ``tests/test_registry_versions_concurrency.py``, the CLI in
``tests/test_registry_versions_cli.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from engine.definitions import Aggregation, Derived, DriftThresholds, Entity, FeatureView, Field, Window
from registry.core import Registry, RegistryError
from registry.diff import diff_views
from registry.schema import view_versions
from registry.versions import (
    apply,
    deprecate,
    find_version,
    get_version,
    plan,
    retire,
    serving_views,
    versions,
)
from tests.registry_fixtures import *  # noqa: F403
from tests.registry_helpers import AMOUNT, COUNT_1H, SUM_1H, USER, _change_kinds, make_view


def _count(registry: Registry, table: Any = view_versions) -> int:
    with registry.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


# --- classification (pure) ---------------------------------------------------------------------------


def test_classification_rules_and_reasons() -> None:
    base = make_view()
    assert diff_views(base, make_view()).kind == "unchanged"
    meta = diff_views(base, make_view(owner="ml", ttl="2d"))
    assert meta.kind == "metadata" and meta.reasons == ("owner: risk -> ml", "ttl: unset -> 2d")
    drift = make_view(aggs=(SUM_1H.model_copy(update={"drift": DriftThresholds(psi_alert=0.3)}), COUNT_1H))
    assert diff_views(base, drift).reasons == ("drift thresholds of amount_sum_1h: psi_alert 0.25 -> 0.3",)

    added = diff_views(
        base,
        make_view(
            aggs=(SUM_1H, COUNT_1H, Aggregation(function="max", column="fee", window="1d")),
            fields=(USER, AMOUNT, Field(name="fee", dtype="float", nullable=True)),
        ),
    )
    assert added.kind == "additive"
    assert added.reasons == (
        "field fee: added (float, nullable)",
        "aggregation fee_max_1d: added (max of fee over 1d)",
    )
    assert diff_views(base, make_view(aggs=(COUNT_1H, SUM_1H))).kind == "additive"  # reorder only
    # A 90-day window adds coarse tile levels (engine.levels): no existing feature changes.
    longer = diff_views(base, make_view(aggs=(SUM_1H, COUNT_1H, Aggregation(function="count", window="90d"))))
    assert longer.kind == "additive"
    assert longer.reasons == (
        "aggregation events_count_90d: added (count over 90d)",
        "coarse tile levels (long windows): none -> 1h, 1d",
    )

    def breaking(view: FeatureView) -> tuple[str, ...]:
        d = diff_views(base, view)
        assert d.kind == "breaking", d
        return d.reasons

    assert breaking(make_view(aggs=(SUM_1H.model_copy(update={"window": "2h"}), COUNT_1H))) == (
        "aggregation amount_sum_1h: window 1h -> 2h",
    )
    # A default-named feature renamed by its new window is reported as the same feature redefined.
    hop = Aggregation(function="count", window=Window.hopping("2h", hop="30m"))
    assert breaking(make_view(aggs=(SUM_1H, hop))) == (
        "aggregation events_count_1h: window 1h -> 2h every 30m (now events_count_2h_every_30m)",
    )
    assert breaking(make_view(aggs=(SUM_1H,))) == ("aggregation events_count_1h: removed",)
    assert breaking(make_view(fields=(USER, Field(name="amount", dtype="int")))) == (
        "field amount: float -> int",
    )
    assert breaking(make_view(fields=(USER, AMOUNT.model_copy(update={"nullable": True})))) == (
        "field amount: required -> nullable",
    )
    assert breaking(make_view(topic="payments_v2")) == ("source topic: payments -> payments_v2",)
    assert breaking(make_view(tile_size="30s")) == ("tile size: 1m -> 30s",)
    assert breaking(make_view(allowed_lateness="5m", description="x")) == (
        "allowed lateness: 2m -> 5m",
        "description: Spend per user. -> x",
    )
    card = make_view(fields=(USER, AMOUNT, Field(name="card", dtype="str")))
    keyed = card.model_copy(update={"entity": Entity(name="card", join_keys=("card",))})
    rekeyed = diff_views(card, keyed)
    assert rekeyed.kind == "breaking"
    assert rekeyed.reasons == ("entity join keys: user_id -> card", "entity name: user -> card")


def test_derived_features_added_are_additive_and_changed_or_removed_are_breaking() -> None:
    avg = Derived(name="avg_1h", expression="amount_sum_1h / events_count_1h")
    base = make_view()
    added = diff_views(base, make_view(derived=(avg,)))
    assert added.kind == "additive"
    assert added.reasons == ("derived avg_1h: added (amount_sum_1h / events_count_1h)",)
    with_avg = make_view(derived=(avg,))
    changed = diff_views(
        with_avg, make_view(derived=(avg.model_copy(update={"expression": "amount_sum_1h"}),))
    )
    assert changed.kind == "breaking"
    assert changed.reasons == ("derived avg_1h: amount_sum_1h / events_count_1h -> amount_sum_1h",)
    removed = diff_views(with_avg, base)
    assert removed.kind == "breaking" and removed.reasons == ("derived avg_1h: removed",)


# --- apply / plan on both backends ----------------------------------------------------------------


def test_apply_new_then_reapply_is_unchanged(registry: Registry) -> None:
    view = make_view()
    [planned] = plan(registry, [view])
    assert (planned.kind, planned.current, planned.creates_version) == ("new", None, True)
    assert _count(registry) == 0  # plan records nothing

    [ch] = apply(registry, [view])
    assert ch.kind == "new" and ch.result is not None
    assert (ch.result.label, ch.result.status, ch.result.version_hash) == ("spend@1", "active", view.version)
    assert ch.result.created_at.tzinfo is not None

    [again] = apply(registry, [make_view()])
    assert again.kind == "unchanged" and not again.creates_version and again.reasons == []
    assert again.result is not None and again.result.id == ch.result.id
    assert _count(registry) == 1
    assert _change_kinds(registry) == ["new"]


def test_metadata_edit_keeps_the_version_and_its_definition(registry: Registry) -> None:
    view = make_view()
    [first] = apply(registry, [view])
    stored = get_version(registry, "spend").definition
    edited = make_view(owner="ml-platform", description="Spend, v2 docs.", tags={"tier": "gold"}, ttl="7d")

    [ch] = apply(registry, [edited])
    assert ch.kind == "metadata" and not ch.breaking and not ch.creates_version
    assert "owner: risk -> ml-platform" in ch.reasons and "ttl: unset -> 1w" in ch.reasons
    v = get_version(registry, "spend")
    assert (v.seq, v.id, v.version_hash) == (1, first.result.id, view.version)  # type: ignore[union-attr]
    assert (v.owner, v.description, v.tags) == ("ml-platform", "Spend, v2 docs.", {"tier": "gold"})
    assert v.definition == stored == view.model_dump(mode="json")  # immutable
    served = v.view()
    assert served.version == v.version_hash and served.ttl is not None and served.owner == "ml-platform"

    [again] = apply(registry, [edited])
    assert again.kind == "unchanged"
    assert _count(registry) == 1
    assert _change_kinds(registry) == ["new", "metadata"]


def test_additive_and_breaking_changes_create_versions_served_side_by_side(registry: Registry) -> None:
    apply(registry, [make_view()])
    more = (SUM_1H, COUNT_1H, Aggregation(function="max", column="amount", window="1d"))
    [add] = apply(registry, [make_view(aggs=more)])
    assert (add.kind, add.breaking, add.result.label) == ("additive", False, "spend@2")  # type: ignore[union-attr]
    assert add.current is not None and add.current.label == "spend@1"
    assert add.reasons == ["aggregation amount_max_1d: added (max of amount over 1d)"]

    wider = (SUM_1H.model_copy(update={"window": "2h"}), *more[1:])
    [brk] = apply(registry, [make_view(aggs=wider)])
    assert (brk.kind, brk.breaking, brk.result.label) == ("breaking", True, "spend@3")  # type: ignore[union-attr]
    assert brk.reasons == ["aggregation amount_sum_1h: window 1h -> 2h"]

    [typed] = apply(registry, [make_view(aggs=wider, fields=(USER, Field(name="amount", dtype="int")))])
    assert typed.kind == "breaking" and typed.reasons == ["field amount: float -> int"]

    rows = versions(registry, "spend")
    assert [(v.seq, v.status) for v in rows] == [(s, "active") for s in (1, 2, 3, 4)]
    assert len({v.version_hash for v in rows}) == 4
    assert _change_kinds(registry) == ["new", "additive", "breaking", "breaking"]


def test_plan_reports_removed_views_and_apply_keeps_them(registry: Registry) -> None:
    apply(registry, [make_view(), make_view(name="other")])
    changes = plan(registry, [make_view()])
    assert [(c.name, c.kind) for c in changes] == [("spend", "unchanged"), ("other", "removed")]
    removed = changes[1]
    assert removed.proposed is None and removed.current is not None and removed.current.label == "other@1"
    assert "featurestream retire other" in removed.reasons[0]
    applied = apply(registry, [make_view()])
    assert [c.kind for c in applied] == ["unchanged", "removed"]
    assert get_version(registry, "other").status == "active"  # apply reports, never retires


def test_deprecate_retire_and_serving_views(registry: Registry) -> None:
    v1, v2, v3 = make_view(), make_view(aggs=(SUM_1H,)), make_view(aggs=(COUNT_1H,))
    for view in (v1, v2, v3):
        apply(registry, [view])
    with pytest.raises(RegistryError, match="no time zone"):
        deprecate(registry, "spend", 1, retire_after=datetime(2030, 1, 1))
    when = datetime(2030, 1, 31, tzinfo=UTC)
    dep = deprecate(registry, "spend", 1, retire_after=when)
    assert (dep.status, dep.retire_after) == ("deprecated", when) and dep.deprecated_at is not None
    ret = retire(registry, "spend", 2)
    assert ret.status == "retired" and ret.retired_at is not None
    assert retire(registry, "spend", 2).retired_at == ret.retired_at  # idempotent
    with pytest.raises(RegistryError, match="already retired"):
        deprecate(registry, "spend", 2)

    served = serving_views(registry, ["spend"])
    assert [s.version for s in served] == [v1.version, v3.version]  # deprecated still served
    stored = {v.version_hash for v in versions(registry, "spend") if v.status != "retired"}
    assert {s.version for s in served} == stored
    assert get_version(registry, "spend").label == "spend@3"

    with pytest.raises(RegistryError, match=r"spend@2 .*retired"):
        apply(registry, [v2])  # a retired definition cannot come back
    retire(registry, "spend", 1)
    retire(registry, "spend", 3)
    with pytest.raises(RegistryError, match="every version of feature view 'spend' is retired"):
        serving_views(registry, ["spend"])
    assert get_version(registry, "spend", 3).status == "retired"
    [ch] = apply(
        registry, [make_view(aggs=(SUM_1H, Aggregation(function="min", column="amount", window="1h")))]
    )
    assert (ch.kind, ch.result.label) == ("new", "spend@4")  # type: ignore[union-attr]
    assert _change_kinds(registry) == ["new", "breaking", "breaking", "deprecated", *["retired"] * 3, "new"]


def test_rollback_reuses_and_reactivates_the_old_version(registry: Registry) -> None:
    old, new = make_view(), make_view(aggs=(SUM_1H,))
    apply(registry, [old])
    apply(registry, [new])
    deprecate(registry, "spend", 1)
    [back] = apply(registry, [old])
    assert back.kind == "unchanged" and not back.creates_version
    assert back.result is not None and (back.result.label, back.result.status) == ("spend@1", "active")
    assert back.result.deprecated_at is None
    assert back.reasons == [
        "same definition as spend@1; the latest is spend@2",
        "reactivates spend@1 (deprecated)",
    ]
    assert _count(registry) == 2
    found = find_version(registry, "spend", old.version)
    assert found is not None and found.seq == 1 and found.view().version == old.version
    assert find_version(registry, "spend", "0" * 12) is None
    [again] = apply(registry, [old])
    assert again.kind == "unchanged" and again.result.label == "spend@1"  # type: ignore[union-attr]
    assert _change_kinds(registry) == ["new", "breaking", "deprecated", "reactivated"]


def test_errors_name_the_view_and_the_fix(registry: Registry) -> None:
    with pytest.raises(RegistryError, match=r"no feature view 'nope'.*featurestream apply"):
        get_version(registry, "nope")
    with pytest.raises(RegistryError, match="no feature view 'nope'"):
        versions(registry, "nope")
    with pytest.raises(RegistryError, match="no feature view 'nope'"):
        serving_views(registry, ["nope"])
    apply(registry, [make_view()])
    with pytest.raises(
        RegistryError, match=r"'spend' has no version 9; it has 1 .*featurestream versions spend"
    ):
        retire(registry, "spend", 9)
    with pytest.raises(RegistryError, match=r"\['spend'\] are given more than once"):
        apply(registry, [make_view(), make_view(aggs=(SUM_1H,))])
    assert versions(registry) == versions(registry, "spend") and _count(registry) == 1
