"""The base of every definition model: frozen, strict, and failing with a :class:`DefinitionError`
that names the field and the fix."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.errors import DefinitionError

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class _Definition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise DefinitionError(_explain(type(self).__name__, data, exc)) from None

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        """A validated copy with ``update`` applied (derived values such as ``version`` recomputed)."""
        if not update:
            return super().model_copy(deep=deep)
        data = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**data, **update})


def _explain(kind: str, data: dict[str, Any], exc: ValidationError) -> str:
    name = data.get("name")
    head = f"{kind} {name!r}" if isinstance(name, str) else kind
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(definition)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required; add it"
        elif err["type"] == "extra_forbidden":
            msg = f"is not a field of {kind}; remove it or check its spelling"
        lines.append(f"  {loc}: {msg}")
    return f"invalid {head}:\n" + "\n".join(lines)


_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _check_topic(v: str) -> str:
    if not _TOPIC.match(v):
        raise ValueError(f"{v!r} is not a valid Kafka topic name; use letters, digits, '.', '_', '-'")
    return v


def _check_field_names(names: list[str], what: str, each: str | None = None) -> None:
    """A source declares at least one ``what`` (a field, a column), each ``each`` once."""
    if not names:
        raise ValueError(f"fields: declare at least one {what}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"fields: {dupes} declared more than once; declare each {each or what} once")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError(
            f"{v!r} is not a valid name; use lower-case letters, digits and '_', starting with a letter"
        )
    return v
