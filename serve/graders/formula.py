"""``multi`` graders' ``calculate_output``: parsed with :mod:`ast` and walked over a whitelist, never ``eval``.

Allowed: numbers, the names of the sub-graders, ``+ - * /``, ``^`` and ``**`` (both power: ``a + b ^ 2`` is
``a + b**2``), unary
minus/plus, parentheses, and calls of ``min max abs floor ceil exp sqrt log`` (log is natural).
Everything else (attributes, subscripts, other calls, comparisons, strings, lambdas, ...) is a
:class:`FormulaError`. Values are floats, so ``9^9^9`` overflows (an error) instead of building a huge int.
"""

from __future__ import annotations

import ast
import math

FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
             "sqrt": math.sqrt, "log": math.log}
_ARITY = {"abs": 1, "floor": 1, "ceil": 1, "exp": 1, "sqrt": 1, "log": 1}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
MAX_LENGTH = 4096


class FormulaError(ValueError):
    """The formula does not parse or uses something outside the whitelist."""


def parse(formula: str, names: set[str] | frozenset[str] = frozenset()) -> ast.Expression:
    """The checked tree of ``formula``; every name must be in ``names`` (the sub-graders)."""
    if not isinstance(formula, str) or not formula.strip():
        raise FormulaError("calculate_output must be a non-empty string")
    if len(formula) > MAX_LENGTH:
        raise FormulaError(f"calculate_output is longer than {MAX_LENGTH} characters")
    try:
        # ^ is power with power's precedence and right associativity (Python's ^ is a looser, left-assoc xor)
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"calculate_output does not parse: {exc.msg}") from None
    _check(tree.body, set(names))
    return tree


def _check(node: ast.AST, names: set[str]) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise FormulaError(f"only numbers are allowed as constants, not {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id not in names:
            raise FormulaError(f"unknown name {node.id!r} (the sub-graders are: {', '.join(sorted(names)) or 'none'})")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise FormulaError(f"operator {type(node.op).__name__} is not allowed (+ - * / ^ only)")
        _check(node.left, names)
        _check(node.right, names)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise FormulaError(f"unary operator {type(node.op).__name__} is not allowed")
        _check(node.operand, names)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise FormulaError(f"only calls of {', '.join(FUNCTIONS)} are allowed")
        if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
            raise FormulaError(f"{node.func.id}() takes positional arguments only")
        if node.func.id in _ARITY and len(node.args) != _ARITY[node.func.id]:
            raise FormulaError(f"{node.func.id}() takes exactly one argument")
        for arg in node.args:
            _check(arg, names)
    else:
        raise FormulaError(f"{type(node).__name__} is not allowed in calculate_output")


def evaluate(formula: str | ast.Expression, values: dict[str, float]) -> float:
    """The formula's value with ``values`` for the names (ArithmeticError/ValueError on bad math)."""
    tree = formula if isinstance(formula, ast.Expression) else parse(formula, set(values))
    result = _eval(tree.body, values)
    if not math.isfinite(result):
        raise ArithmeticError(f"calculate_output gave {result}")
    return result


def _eval(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        value = _BINARY[type(node.op)](_eval(node.left, values), _eval(node.right, values))
        if isinstance(value, complex):
            raise ArithmeticError("calculate_output gave a complex number")
        return float(value)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, values)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call):
        return float(FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args)))
    raise FormulaError(f"{type(node).__name__} is not allowed in calculate_output")  # parse() rules this out
