"""Request and response shapes (msgspec Structs): decoded and validated in one pass, and the
source of the OpenAPI schema."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from featurestream.server.errors import ApiError

__all__ = ["OnlineRequest", "OnlineResponse", "VectorResponse", "decode_online"]


class OnlineRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Feast's get-online-features body: feature references and entity key columns."""

    features: list[str]
    """``view:feature``, ``view@N:feature`` (registered version N) or ``view`` (all its features)."""
    entities: dict[str, list[str | int]]
    """Join key -> one value per entity; every list has the same length."""
    full_feature_names: bool = False
    """Name the features ``view__feature`` instead of ``feature`` (Feast's convention)."""


class Metadata(msgspec.Struct):
    feature_names: list[str]


class Column(msgspec.Struct):
    values: list[Any]
    statuses: list[str]
    """PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE or NULL_VALUE."""
    event_timestamps: list[str | None]
    """Newest event behind each value (RFC 3339, UTC); null when its window is empty."""


class OnlineResponse(msgspec.Struct):
    """Feast's shape: the join keys, then one column per feature, each with one value per entity."""

    metadata: Metadata
    results: list[Column]


class VectorResponse(msgspec.Struct):
    """One entity's feature vector of one view."""

    view: str
    version: str
    entity: str
    features: dict[str, Any]
    statuses: dict[str, str]
    event_timestamps: dict[str, str | None]


class PushResponse(msgspec.Struct):
    source: str
    topic: str
    accepted: int


class ErrorResponse(msgspec.Struct):
    error: str
    message: str
    field: str | None = None
    fix: str | None = None


_decoder = msgspec.json.Decoder(OnlineRequest)
_AT = re.compile(r" - at `\$\.?(.*)`$")
_NAMED = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


def _entity_path(body: bytes) -> str | None:
    """``entities.<key>[i]`` of the first entity value that is not a string or an integer
    (msgspec does not name dict keys in its paths)."""
    try:
        entities = msgspec.json.decode(body, type=dict[str, Any]).get("entities")
    except msgspec.DecodeError:
        return None
    if not isinstance(entities, dict):
        return None
    for key, values in entities.items():
        if not isinstance(values, list):
            return f"entities.{key}"
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, str | int):
                return f"entities.{key}[{i}]"
    return None


def _explain(text: str) -> tuple[str, str | None]:
    """msgspec's message without its path, and the path as ``entities.user_id[0]``."""
    m = _AT.search(text)
    path = m[1] if m else ""
    message = text[: m.start()] if m else text
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named[1]}" if path else named[1]
    return message, path or None


def decode_online(body: bytes, max_entities: int) -> OnlineRequest:
    """The request, or a 400 naming the field at fault and the fix."""
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, where = _explain(str(exc))
        if where and where.startswith("entities[...]"):
            where = _entity_path(body) or where
        raise ApiError(
            400,
            "invalid_request",
            message,
            field=where,
            fix='send {"features": ["view:feature", ...], "entities": {"join_key": [value, ...]}}; '
            "entity values are strings or integers",
        ) from None
    except msgspec.DecodeError as exc:
        raise ApiError(
            400, "malformed_json", f"the body is not valid JSON: {exc}", fix="send one JSON object"
        ) from None
    if not req.features:
        raise ApiError(
            400,
            "invalid_request",
            "no features requested",
            field="features",
            fix='name some, e.g. "features": ["user_spend:amount_sum_1h"]',
        )
    if not req.entities:
        raise ApiError(
            400,
            "invalid_request",
            "no entities given",
            field="entities",
            fix='give join key values, e.g. "entities": {"user_id": ["u1"]}',
        )
    lengths = {k: len(v) for k, v in req.entities.items()}
    n = next(iter(lengths.values()))
    for k, m_ in lengths.items():
        if m_ != n:
            raise ApiError(
                400,
                "invalid_request",
                f"entities.{k} has {m_} values, but others have {n}",
                field=f"entities.{k}",
                fix="give every join key one value per entity",
            )
    if n == 0:
        raise ApiError(
            400,
            "invalid_request",
            "the entity lists are empty",
            field="entities",
            fix="give at least one entity",
        )
    if n > max_entities:
        raise ApiError(
            400,
            "too_many_entities",
            f"{n} entities in one request; this server allows at most {max_entities}",
            field="entities",
            fix=f"split the request into batches of at most {max_entities} entities "
            "(or raise the server's --max-entities)",
        )
    return req
