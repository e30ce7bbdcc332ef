"""Arithmetic over features, for derived features (``amount_sum_1h / events_count_1h``).

The grammar is numbers, feature names, ``+ - * /``, unary ``-``/``+`` and parentheses. Text is
parsed by Python's own parser (:func:`ast.parse`, which executes nothing) and every node is
checked against that grammar, so nothing else (calls, attributes, subscripts, ``**``) can pass.
Evaluation is vectorised over numpy arrays of finalised feature values: a null (NaN) input gives
a null, division by zero gives a null, and so does an overflow at any step.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping

import numpy as np

__all__ = ["Expression", "ExpressionError", "parse_expression"]

_MAX_LENGTH = 1_000
_MAX_NODES = 200
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_LEAVES = (ast.Name, ast.Load, ast.USub, ast.UAdd, *_OPS)


class ExpressionError(ValueError):
    """The text is not an expression of the grammar; the message says what to change."""


class Expression:
    """A parsed, checked expression: ``names`` are the features it reads."""

    def __init__(self, text: str, tree: ast.expr) -> None:
        self.text = text
        self._tree = tree
        self.names: tuple[str, ...] = tuple(
            dict.fromkeys(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))
        )

    def evaluate(self, values: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
        """``rows`` values; NaN (null) where an input is null, a divisor is 0 or a step overflows."""
        with np.errstate(all="ignore"):
            out = np.broadcast_to(np.asarray(_eval(self._tree, values), dtype=np.float64), (rows,))
            return np.where(np.isfinite(out), out, np.nan)


def parse_expression(text: str) -> Expression:
    """Parse ``text``; raises :class:`ExpressionError` naming what is not allowed."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("is empty; write e.g. 'amount_sum_1h / events_count_1h'")
    if len(text) > _MAX_LENGTH:
        raise ExpressionError(
            f"is longer than {_MAX_LENGTH} characters; split it into several derived features"
        )
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ExpressionError(
            f"cannot be parsed ({getattr(exc, 'msg', exc)}); "
            "use numbers, feature names, + - * / and parentheses"
        ) from None
    count = 0
    for node in ast.walk(tree):
        count += 1
        _check(node)
    if count > _MAX_NODES:
        raise ExpressionError(f"has more than {_MAX_NODES} terms; split it into several derived features")
    return Expression(text, tree)


def _check(node: ast.AST) -> None:
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _OPS:
            raise ExpressionError(f"uses {_show(node)}; only + - * / are allowed")
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.USub | ast.UAdd):
            raise ExpressionError(f"uses {_show(node)}; only + - * / and a sign are allowed")
    elif isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ExpressionError(f"has the constant {v!r}; only finite numbers are allowed")
    elif not isinstance(node, _LEAVES):
        raise ExpressionError(
            f"uses {_show(node)}; only numbers, feature names, + - * / and parentheses are allowed"
        )


def _show(node: ast.AST) -> str:
    try:
        return repr(ast.unparse(node))
    except Exception:  # an operator node on its own
        return type(node).__name__


def _eval(node: ast.expr, values: Mapping[str, np.ndarray]) -> np.ndarray | float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return np.asarray(values[node.id], dtype=np.float64)
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, values)
        return -v if isinstance(node.op, ast.USub) else v
    assert isinstance(node, ast.BinOp)
    a, b = _eval(node.left, values), _eval(node.right, values)
    match node.op:
        case ast.Add():
            out = np.add(a, b)
        case ast.Sub():
            out = np.subtract(a, b)
        case ast.Mult():
            out = np.multiply(a, b)
        case _:
            zero = np.asarray(b) == 0
            out = np.where(zero, np.nan, np.divide(a, np.where(zero, 1.0, b)))
    # A non-finite step (an overflow) is null, so no later step can turn it into a number.
    return np.where(np.isfinite(out), out, np.nan)
