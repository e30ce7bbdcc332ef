"""Classify a proposed feature view against a stored one: unchanged, metadata, additive or breaking.

Works on ``FeatureView.canonical()`` dicts (what the version hashes) plus :func:`metadata_of` (what
it does not), so a stored definition and a proposed one compare the same way the versions do.

* ``unchanged``: same canonical, same metadata.
* ``metadata``: same canonical, other metadata: no new version, the stored one is edited in place.
* ``additive``: the canonical part only gains aggregations, derived features or source fields (or reorders
  aggregations): a new version, and nothing existing consumers read changes meaning.
* ``breaking``: anything else (a field's type or nullability, a removed or redefined aggregation,
  tiles, lateness, join keys, topic, timestamp): a new version whose values differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from engine.definitions import FeatureView, format_duration

__all__ = ["Diff", "DiffKind", "classify", "diff_views", "metadata_of"]

DiffKind = Literal["unchanged", "metadata", "additive", "breaking"]


@dataclass(frozen=True)
class Diff:
    kind: DiffKind
    reasons: tuple[str, ...] = ()


def metadata_of(view: FeatureView) -> dict[str, Any]:
    """What a view declares outside ``canonical()``, by readable label (JSON-comparable values)."""
    meta: dict[str, Any] = {
        "description": view.description,
        "owner": view.owner,
        "tags": dict(view.tags),
        "ttl": format_duration(view.ttl) if view.ttl is not None else None,
        "entity name": view.entity.name,
        "entity description": view.entity.description,
        "source name": view.source.name,
        "source description": view.source.description,
        "dead-letter topic": view.source.dead_letter_topic,
    }
    for agg in view.aggregations:
        meta[f"drift thresholds of {agg.feature_name}"] = agg.drift.model_dump()
    return meta


def diff_views(current: FeatureView, proposed: FeatureView) -> Diff:
    """How ``proposed`` differs from ``current`` (the stored version of the same view)."""
    return classify(current.canonical(), proposed.canonical(), metadata_of(current), metadata_of(proposed))


def classify(
    current: dict[str, Any],
    proposed: dict[str, Any],
    current_meta: dict[str, Any] | None = None,
    proposed_meta: dict[str, Any] | None = None,
) -> Diff:
    """Classify from canonical dicts and metadata dicts; reasons say what changed, old -> new."""
    meta_reasons = _metadata_reasons(current_meta or {}, proposed_meta or {})
    if current == proposed:
        return Diff("metadata", tuple(meta_reasons)) if meta_reasons else Diff("unchanged")
    breaking: list[str] = []
    additive: list[str] = []
    for key in dict.fromkeys([*current, *proposed]):
        old, new = current.get(key), proposed.get(key)
        if old == new:
            continue
        if key == "source":
            _source(old or {}, new or {}, breaking, additive)
        elif key == "aggregations":
            _aggregations(old or [], new or [], breaking, additive)
        elif key == "derived":
            _derived(old or [], new or [], breaking, additive)
        elif key == "entity":
            breaking.append(f"entity join keys: {_keys(old)} -> {_keys(new)}")
        elif key == "tile_ms":
            breaking.append(f"tile size: {_ms(old)} -> {_ms(new)}")
        elif key == "allowed_lateness_ms":
            breaking.append(f"allowed lateness: {_ms(old)} -> {_ms(new)}")
        elif key == "tile_levels_ms":  # follows the windows: no existing feature's values change
            levels = [", ".join(_ms(r) for r in (v or [])[1:]) or "none" for v in (old, new)]
            additive.append(f"coarse tile levels (long windows): {levels[0]} -> {levels[1]}")
        else:
            breaking.append(f"{key}: {_show(old)} -> {_show(new)}")
    if not breaking and not additive:  # a difference none of the rules above could name
        breaking.append("the canonical definition changed")
    kind: DiffKind = "breaking" if breaking else "additive"
    return Diff(kind, tuple(breaking + additive + meta_reasons))


def _source(old: dict[str, Any], new: dict[str, Any], breaking: list[str], additive: list[str]) -> None:
    for key in ("topic", "format", "timestamp_field", "timestamp_format"):
        if old.get(key) != new.get(key):
            breaking.append(f"source {key.replace('_', ' ')}: {_show(old.get(key))} -> {_show(new.get(key))}")
    before = {f[0]: (f[1], f[2]) for f in old.get("fields", [])}
    after = {f[0]: (f[1], f[2]) for f in new.get("fields", [])}
    for name, (dtype, nullable) in before.items():
        if name not in after:
            breaking.append(f"field {name}: removed")
            continue
        new_dtype, new_nullable = after[name]
        changes = []
        if dtype != new_dtype:
            changes.append(f"{dtype} -> {new_dtype}")
        if nullable != new_nullable:
            changes.append(f"{_nullability(nullable)} -> {_nullability(new_nullable)}")
        if changes:
            breaking.append(f"field {name}: {', '.join(changes)}")
    for name, (dtype, nullable) in after.items():
        if name not in before:
            note = "" if nullable else "; events without it go to the dead-letter topic"
            additive.append(f"field {name}: added ({dtype}, {_nullability(nullable)}{note})")
    for key in sorted(
        (set(old) | set(new)) - {"topic", "format", "timestamp_field", "timestamp_format", "fields"}
    ):
        if old.get(key) != new.get(key):
            breaking.append(f"source {key}: {_show(old.get(key))} -> {_show(new.get(key))}")


def _aggregations(
    old: list[dict[str, Any]], new: list[dict[str, Any]], breaking: list[str], additive: list[str]
) -> None:
    before = {a["name"]: a for a in old}
    after = {a["name"]: a for a in new}
    removed = [n for n in before if n not in after]
    added = [n for n in after if n not in before]
    for name in before:
        if name in after and before[name] != after[name]:
            breaking.append(f"aggregation {name}: {_agg_changes(before[name], after[name])}")
    for name in removed:
        # A default-named feature is renamed by a new window or function: report it as a redefinition.
        twin = next(
            (n for n in added if _same_input(before[name], after[n]) and after[n] != before[name]), None
        )
        if twin is None:
            breaking.append(f"aggregation {name}: removed")
        else:
            added.remove(twin)
            breaking.append(f"aggregation {name}: {_agg_changes(before[name], after[twin])} (now {twin})")
    for name in added:
        additive.append(f"aggregation {name}: added ({_agg_text(after[name])})")
    kept_old = [n for n in before if n in after]
    kept_new = [n for n in after if n in before]
    if kept_old != kept_new:
        additive.append("aggregations reordered (the tile layout changes; no feature's meaning does)")


def _derived(old: list[list[str]], new: list[list[str]], breaking: list[str], additive: list[str]) -> None:
    """A new derived feature adds a column; a changed or removed one changes what readers get."""
    before, after = dict(old), dict(new)
    for name, expression in before.items():
        if name not in after:
            breaking.append(f"derived {name}: removed")
        elif after[name] != expression:
            breaking.append(f"derived {name}: {expression} -> {after[name]}")
    for name, expression in after.items():
        if name not in before:
            additive.append(f"derived {name}: added ({expression})")


def _same_input(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("column") == b.get("column") and (
        a.get("function") == b.get("function") or a.get("window") == b.get("window")
    )


def _agg_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for key in ("function", "column"):
        if old.get(key) != new.get(key):
            parts.append(f"{key} {_show(old.get(key))} -> {_show(new.get(key))}")
    if old.get("window") != new.get("window"):
        parts.append(f"window {_window(old.get('window'))} -> {_window(new.get('window'))}")
    for key in sorted((set(old) | set(new)) - {"name", "function", "column", "window"}):
        if old.get(key) != new.get(key):
            parts.append(f"{key} {_show(old.get(key))} -> {_show(new.get(key))}")
    return ", ".join(parts) or "redefined"


def _agg_text(agg: dict[str, Any]) -> str:
    what = agg["function"] if agg.get("column") is None else f"{agg['function']} of {agg['column']}"
    return f"{what} over {_window(agg.get('window'))}"


def _window(w: Any) -> str:
    if not isinstance(w, list | tuple) or len(w) != 3:
        return _show(w)
    kind, size, hop = w
    if kind == "tumbling":
        return f"{_ms(size)} tumbling"
    if kind == "hopping":
        return f"{_ms(size)} every {_ms(hop)}"
    return _ms(size)


def _metadata_reasons(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    reasons = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if a == b or key not in old or key not in new:  # features only one side has: not metadata
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key.startswith("drift thresholds"):
            parts = [f"{k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in a if a.get(k) != b.get(k)]
            reasons.append(f"{key}: {', '.join(parts)}")
        else:
            reasons.append(f"{key}: {_show(a)} -> {_show(b)}")
    return reasons


def _nullability(nullable: bool) -> str:
    return "nullable" if nullable else "required"


def _keys(entity: Any) -> str:
    keys = entity.get("join_keys") if isinstance(entity, dict) else entity
    return ", ".join(keys) if isinstance(keys, list | tuple) else _show(keys)


def _ms(ms: Any) -> str:
    return format_duration(timedelta(milliseconds=ms)) if isinstance(ms, int) else _show(ms)


def _show(value: Any) -> str:
    if value is None or value == "":
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
