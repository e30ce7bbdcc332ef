"""Derived features: safe parsing, definition-time errors, version hashing, and values equal to a
pandas oracle online and offline after a real dataflow run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.dataflow import RuntimeConfig
from engine.definitions import Derived
from engine.errors import DefinitionError
from engine.expressions import ExpressionError, parse_expression
from tests.conftest import Services
from tests.definitions_helpers import fails, view
from tests.pipeline_helpers import MIN
from tests.windowing_helpers import close, make_events, make_view, oracle, py, run, training

DERIVED = (
    Derived(name="avg10", expression="s10 / c10"),  # 0 / 0 in an empty window: null
    Derived(name="share", expression="c10 / c1h"),
    Derived(name="nested", expression="(avg10 + m10) * 2 - -1"),  # reads another derived feature
    Derived(name="by_zero", expression="s10 / (c10 - c10)"),  # always a division by zero
    Derived(name="cv", expression="sd1h / m10 * 100"),  # null when either input is null
)


def _div(a: Any, b: Any) -> Any:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _expected(ev: Any, t: int) -> dict[str, Any]:
    base = {n: oracle(ev, n, t) for n in ("c10", "c1h", "s10", "m10", "sd1h")}
    avg10 = _div(base["s10"], base["c10"])
    return {
        "avg10": avg10,
        "share": _div(base["c10"], base["c1h"]),
        "nested": None if avg10 is None or base["m10"] is None else (avg10 + base["m10"]) * 2 + 1,
        "by_zero": None,
        "cv": None if _div(base["sd1h"], base["m10"]) is None else _div(base["sd1h"], base["m10"]) * 100,
    }


# ---------------------------------------------------------------------------------------------
# definitions


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "amount_sum_10m.real",
        "amount_sum_10m ** 2",
        "amount_sum_10m // 2",
        "amount_sum_10m % 2",
        "amount_sum_10m if events_count_1h else 0",
        "max(amount_sum_10m, 1)",
        "amount_sum_10m < 1",
        "[amount_sum_10m]",
        "True + 1",
        "'a' * 3",
        "1e999",
        "",
        "(amount_sum_10m",
        "amount_sum_10m; 1",
        "lambda: 1",
        "1 + 2",
        "(" * 300 + "1" + ")" * 300,
    ],
)
def test_unsafe_or_unknown_syntax_is_rejected_when_defined(expression: str) -> None:
    msg = fails(lambda: Derived(name="x", expression=expression), "expression")
    assert any(w in msg for w in ("only", "empty", "parsed", "reads no feature")), msg


def test_unknown_names_cycles_and_clashes_name_the_field_and_fix() -> None:
    fails(
        lambda: view(derived=(Derived(name="r", expression="amount_sum_10m / nope"),)),
        "derived.0 (r)",
        "['nope']",
        "add the aggregation",
    )
    fails(
        lambda: view(
            derived=(
                Derived(name="a", expression="b + 1"),
                Derived(name="b", expression="c * 2"),
                Derived(name="c", expression="a - events_count_1h"),
            )
        ),
        "cycle a -> b -> c -> a",
    )
    fails(lambda: view(derived=(Derived(name="s", expression="s + 1"),)), "cycle s -> s")
    fails(
        lambda: view(derived=(Derived(name="events_count_1h", expression="amount_sum_10m"),)),
        "already a feature",
    )
    fails(
        lambda: view(
            derived=(
                Derived(name="d", expression="amount_sum_10m"),
                Derived(name="d", expression="events_count_1h"),
            )
        ),
        "derived.1 (d)",
    )
    fails(lambda: view(derived=(Derived(name="Bad", expression="amount_sum_10m"),)), "not a valid name")


def test_version_changes_only_when_derived_features_are_present_and_differ() -> None:
    plain = view()
    one = view(derived=(Derived(name="r", expression="amount_sum_10m / events_count_1h"),))
    same = view(derived=(Derived(name="r", expression="amount_sum_10m / events_count_1h"),))
    other = view(derived=(Derived(name="r", expression="amount_sum_10m * events_count_1h"),))
    assert "derived" not in plain.canonical()
    assert view(derived=()).version == plain.version
    assert one.version == same.version != plain.version
    assert other.version != one.version
    assert one.feature_names[-1] == "r" and one.aggregation("r").expression.startswith("amount")
    with pytest.raises(DefinitionError):
        one.aggregation("nope")


# ---------------------------------------------------------------------------------------------
# the expression evaluator against plain Python arithmetic

NAMES = ("a", "b", "c")
leaves = st.one_of(st.sampled_from(NAMES), st.sampled_from(["0", "1", "2.5", "1e-3", "7"]))


def _expr(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.tuples(children, st.sampled_from("+-*/"), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
    return st.one_of(binary, children.map(lambda e: f"-{e}"))


expressions = st.recursive(leaves, _expr, max_leaves=12)
numbers = st.one_of(st.none(), st.sampled_from([0.0, 1.0, -3.0]), st.floats(-1e6, 1e6, allow_nan=False))


def _python(text: str, env: dict[str, float | None]) -> float | None:
    """Reference: Python's own arithmetic on one row, with null and division-by-zero rules."""
    import ast

    def ev(node: ast.AST) -> float | None:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            return None if v is None else -v
        assert isinstance(node, ast.BinOp)
        a, b = ev(node.left), ev(node.right)
        if a is None or b is None:
            return None
        if isinstance(node.op, ast.Div):
            if b == 0:
                return None
            r = a / b
        else:
            r = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
        return r if math.isfinite(r) else None

    try:
        return ev(ast.parse(text, mode="eval").body)
    except OverflowError:
        return None


@settings(max_examples=300, deadline=None)
@given(text=expressions, rows=st.lists(st.tuples(numbers, numbers, numbers), min_size=1, max_size=5))
def test_evaluation_equals_python_arithmetic_row_by_row(text: str, rows: list[tuple]) -> None:
    expr = parse_expression(text)
    cols = {n: np.array([np.nan if r[i] is None else r[i] for r in rows]) for i, n in enumerate(NAMES)}
    got = expr.evaluate(cols, len(rows))
    for i, r in enumerate(rows):
        want = _python(text, dict(zip(NAMES, r, strict=True)))
        assert close(got[i], want, rtol=1e-12), (text, r, got[i], want)


def test_names_are_the_referenced_features_once_each() -> None:
    names = parse_expression("a / (b + a) * 2").names
    assert sorted(names) == ["a", "b"]
    with pytest.raises(ExpressionError):
        parse_expression("a.b")


# ---------------------------------------------------------------------------------------------
# end to end: a real dataflow run, the oracle, online == offline


def test_derived_values_equal_the_oracle_online_and_offline(
    services: Services, topic, runtime: RuntimeConfig, tmp_path: Path
) -> None:
    name = topic(partitions=2)
    r = run(services.kafka, runtime, name, make_view(name, DERIVED), make_events(seed=7))
    groups = r.by_entity()
    entities = sorted(groups)
    newest = int(r.events["ts"].max())
    features = [f"win:{d.name}" for d in DERIVED]
    # As of the newest event, then as windows empty out: 10 minutes (avg10 turns null while c1h
    # still counts), two hours (everything empty: share is 0 / 0).
    online_times = [newest, newest + 7 * MIN, newest + 45 * MIN, newest + 120 * MIN]
    seen_null = seen_value = 0
    for t in online_times:
        online = r.store.get_online_features(features, entities, as_of=_dt(t))
        offline = training(r.store, features, entities, [t] * len(entities))
        for i, e in enumerate(entities):
            want = _expected(groups[e], t)
            for d in DERIVED:
                got = online.values[f"win:{d.name}"][i]
                assert close(got, want[d.name]), (d.name, e, t, got, want[d.name])
                assert close(offline[f"win:{d.name}"][i], got, rtol=1e-12), (d.name, e, t)
                seen_null += want[d.name] is None
                seen_value += want[d.name] is not None
    assert seen_null and seen_value
    # Offline at random times inside the data, where the newest tile is cut at the row's time.
    rng = np.random.default_rng(3)
    times = (r.events["ts"].min() + rng.integers(0, newest - r.events["ts"].min(), 300)).tolist()
    ents = rng.choice(entities, 300).tolist()
    offline = training(r.store, features, ents, times)
    for i, (e, t) in enumerate(zip(ents, times, strict=True)):
        want = _expected(groups[e], t)
        for d in DERIVED:
            assert close(offline[f"win:{d.name}"][i], want[d.name]), (d.name, e, t)
    # A bare view includes its derived features; event times come from the inputs.
    whole = r.store.get_online_features(["win"], entities[:2], as_of=_dt(newest))
    assert "win:avg10" in whole.values and "win:c10" in whole.values
    assert whole.event_times["win:avg10"][0] is not None
    assert py(whole.values["win:by_zero"][0]) is None


def _dt(ms: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC)


def test_the_windows_doc_example_builds() -> None:
    """docs/windows.md's definition example is valid and reads as described."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "windows.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/windows.md", "exec"), scope)
    view = scope["user_payments"]
    assert view.feature_names[-2:] == ("avg_ticket_1h", "burst_ratio")
    assert view.source.dedup_key == "payment_id"
    assert view.aggregation("amount_variance_1h_tumbling").function == "variance"
