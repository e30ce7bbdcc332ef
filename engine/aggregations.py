"""Aggregation definitions: the :class:`Aggregation` itself, its :class:`Window`, its
:class:`DriftThresholds`, and :class:`Derived` features computed from a view's aggregations."""

from __future__ import annotations

from datetime import timedelta
from functools import cached_property
from typing import Any, Literal

from pydantic import field_validator, model_validator

from engine._model import _check_name, _Definition
from engine.durations import format_duration, parse_duration
from engine.expressions import Expression, ExpressionError, parse_expression

__all__ = ["FUNCTIONS", "SESSION_FUNCTIONS", "Aggregation", "Derived", "DriftThresholds", "Window"]

FUNCTIONS = (
    "count",
    "sum",
    "mean",
    "min",
    "max",
    "last",
    "stddev",
    "variance",
    "first",
    "last_n",
    "count_distinct",
    "percentile",
    "top_k",
)
MAX_N = 1000  # largest n of last_n and k of top_k: bounds the state kept per tile
SESSION_FUNCTIONS = ("count", "sum", "mean", "min", "max", "last", "stddev", "variance", "duration")


class Window(_Definition):
    """An event-time window.

    ``sliding``: events in the tiles that start in ``(t - size, t]``, up to ``t``.
    ``hopping``: the latest complete window ``[E - size, E)`` with ``E = floor(t / hop) * hop``.
    ``tumbling``: hopping with ``hop == size``.
    ``session``: the entity's current (or, with ``which="last"``, last closed) session, a run of
    events less than ``size`` (the gap) apart; see ``engine.sessions``.
    """

    kind: Literal["sliding", "tumbling", "hopping", "session"] = "sliding"
    size: timedelta
    hop: timedelta | None = None
    which: Literal["current", "last"] | None = None

    @field_validator("size", "hop", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _shape(self) -> Window:
        if self.size <= timedelta(0):
            raise ValueError("size must be positive")
        if self.kind == "hopping":
            if self.hop is None:
                raise ValueError("a hopping window needs hop, e.g. Window.hopping('1h', hop='10m')")
            if not timedelta(0) < self.hop <= self.size:
                raise ValueError("hop must be positive and at most size")
        elif self.hop is not None:
            raise ValueError(f"hop applies to hopping windows only; remove it from the {self.kind} window")
        if self.which is not None and self.kind != "session":
            raise ValueError(
                "which applies to session windows only, e.g. Window.session('30m', which='last')"
            )
        return self

    @classmethod
    def sliding(cls, size: Any) -> Window:
        return cls(kind="sliding", size=size)

    @classmethod
    def tumbling(cls, size: Any) -> Window:
        return cls(kind="tumbling", size=size)

    @classmethod
    def hopping(cls, size: Any, hop: Any) -> Window:
        return cls(kind="hopping", size=size, hop=hop)

    @classmethod
    def session(cls, gap: Any, which: Literal["current", "last"] = "current") -> Window:
        """Sessions split where consecutive events are ``gap`` or more apart; ``which`` picks the
        entity's current session or its last closed one."""
        return cls(kind="session", size=gap, which=which)

    @property
    def hop_or_size(self) -> timedelta:
        return self.hop if self.hop is not None else self.size

    @property
    def lookback(self) -> timedelta:
        """How far back from a read time this window may reach."""
        if self.kind == "session":  # the gap; a session's own start is unbounded (engine.sessions)
            return self.size
        return self.size if self.kind == "sliding" else self.size + self.hop_or_size

    @cached_property
    def label(self) -> str:
        if self.kind == "sliding":
            return format_duration(self.size)
        if self.kind == "tumbling":
            return f"{format_duration(self.size)}_tumbling"
        if self.kind == "session":
            return f"{'last_' if self.which == 'last' else ''}session_{format_duration(self.size)}"
        return f"{format_duration(self.size)}_every_{format_duration(self.hop_or_size)}"


class DriftThresholds(_Definition):
    """When a feature's live distribution counts as drifted from its training baseline.

    PSI (population stability index) and KS (Kolmogorov-Smirnov distance) at or above ``*_warn``
    warn, at or above ``*_alert`` alert. Monitoring settings: they do not change the version.
    """

    psi_warn: float = 0.1
    psi_alert: float = 0.25
    ks_warn: float = 0.1
    ks_alert: float = 0.2

    @model_validator(mode="after")
    def _order(self) -> DriftThresholds:
        if not 0 < self.psi_warn <= self.psi_alert or not 0 < self.ks_warn <= self.ks_alert:
            raise ValueError("thresholds must be positive with warn <= alert")
        return self


class Aggregation(_Definition):
    """One feature: ``function`` of ``column`` over ``window``. ``count`` without a column counts events.

    ``last_n`` takes ``n`` (the ``n`` newest values, newest first), ``top_k`` takes ``k`` (the
    ``k`` most frequent values with their counts), ``percentile`` takes ``q`` in (0, 1).
    Guarantees, memory and error of each function: docs/windows.md.
    """

    function: Literal[
        "count",
        "sum",
        "mean",
        "min",
        "max",
        "last",
        "stddev",
        "variance",
        "duration",
        "first",
        "last_n",
        "count_distinct",
        "percentile",
        "top_k",
    ]
    column: str | None = None
    window: Window
    n: int | None = None
    k: int | None = None
    q: float | None = None
    name: str | None = None
    drift: DriftThresholds = DriftThresholds()

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if isinstance(v, Window | dict):
            return v
        return Window.sliding(v)

    @model_validator(mode="after")
    def _col(self) -> Aggregation:
        if self.window.kind == "session" and self.function not in SESSION_FUNCTIONS:
            raise ValueError(
                f"{self.function} is not available over session windows; use one of {SESSION_FUNCTIONS}"
            )
        if self.function == "duration":
            if self.window.kind != "session":
                raise ValueError(
                    "duration applies to session windows only, e.g. window=Window.session('30m')"
                )
            if self.column is not None:
                raise ValueError("duration measures the session itself; remove column")
        elif self.column is None and self.function != "count":
            raise ValueError(f"{self.function} needs a column, e.g. column='amount'")
        self._check_parameters()
        if self.name is not None:
            _check_name(self.name)
        return self

    def _check_parameters(self) -> None:
        wants = {"last_n": "n", "top_k": "k", "percentile": "q"}.get(self.function)
        for p in ("n", "k", "q"):
            if p != wants and getattr(self, p) is not None:
                raise ValueError(f"{p} applies to {_PARAM_OF[p]} only; remove it from {self.function}")
        if wants == "q":
            if self.q is None or not 0 < self.q < 1:
                raise ValueError("percentile needs q strictly between 0 and 1, e.g. q=0.99")
        elif wants is not None:
            v = getattr(self, wants)
            if v is None or not 1 <= v <= MAX_N:
                raise ValueError(f"{self.function} needs {wants} from 1 to {MAX_N}, e.g. {wants}=5")

    @cached_property
    def feature_name(self) -> str:
        if self.name:
            return self.name
        if self.function == "duration":  # session_duration_30m, last_session_duration_30m
            return self.window.label.replace("session_", "session_duration_", 1)
        col = self.column or "events"
        match self.function:
            case "last_n":
                fn = f"last_{self.n}"
            case "top_k":
                fn = f"top_{self.k}"
            case "percentile":
                fn = "p" + f"{100 * self.q:.6g}".replace(".", "_")  # type: ignore[operator]
            case _:
                fn = self.function
        return f"{col}_{fn}_{self.window.label}"


_PARAM_OF = {"n": "last_n", "k": "top_k", "q": "percentile"}


class Derived(_Definition):
    """A feature computed from other features of the same view, e.g. ``amount_sum_1h / events_count_1h``.

    ``expression`` uses numbers, feature names (aggregations or other derived features of the
    view), ``+ - * /`` and parentheses. It is evaluated on the finalised values, online and
    offline alike, so both agree. A null input, a division by zero or a non-finite result gives
    a null. The value is a float (also when every input is a count).
    """

    name: str
    expression: str
    drift: DriftThresholds = DriftThresholds()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("expression")
    @classmethod
    def _expression(cls, v: str) -> str:
        try:
            parsed = parse_expression(v)
        except ExpressionError as exc:
            raise ValueError(f"{exc}") from None
        if not parsed.names:
            raise ValueError("reads no feature; use feature names, e.g. 'amount_sum_1h / events_count_1h'")
        return v

    @cached_property
    def parsed(self) -> Expression:
        return parse_expression(self.expression)

    @property
    def feature_name(self) -> str:
        return self.name

    @property
    def inputs(self) -> tuple[str, ...]:
        """The feature names the expression reads."""
        return self.parsed.names
