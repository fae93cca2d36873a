"""A small, safe expression language for filters, conditions and derived fields.

Expressions look like Python but are never handed to `eval`: the text is parsed with `ast`,
every node is checked against a whitelist, and the tree is compiled into a closure that works on
whole numpy columns at once.

Allowed: field names (``value``, ``sensor``), numbers, strings, ``True``/``False``/``None``,
arithmetic ``+ - * / // % **``, comparisons (chained too), ``and``/``or``/``not``, ``in`` /
``not in`` with a literal list or tuple, ``x if cond else y``, and the functions in `FUNCTIONS`
(``abs``, ``sqrt``, ``log``, ``exp``, ``round``, ``min``, ``max``, ``clip``, ``isnan``,
``startswith``, ``endswith``, ``contains``, ``lower``, ``upper``, ``part``). Anything else -
attributes, subscripts, lambdas, comprehensions, calls to other names - is refused with a message.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import numpy as np

from edgewise.errors import ConfigError
from edgewise.pipeline.batch import Batch

Compiled = Callable[[Batch], Any]
MAX_LENGTH = 4096  # characters


class ExpressionError(ConfigError):
    """An expression could not be parsed or uses something not allowed."""


def _str_array(x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind != "U":
        arr = arr.astype(str)
    return arr


def _part(x: Any, sep: str, index: int) -> np.ndarray:
    arr = np.asarray(x, dtype=object)
    out = np.empty(arr.shape, dtype=object)
    flat = arr.reshape(-1)
    res = out.reshape(-1)
    for i, s in enumerate(flat):
        pieces = str(s).split(sep)
        res[i] = pieces[index] if -len(pieces) <= index < len(pieces) else ""
    return out


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": np.abs,
    "sqrt": np.sqrt,
    "log": np.log,
    "log10": np.log10,
    "exp": np.exp,
    "round": lambda x, d=0: np.round(x, int(d)),
    "floor": np.floor,
    "ceil": np.ceil,
    "min": np.minimum,
    "max": np.maximum,
    "clip": np.clip,
    "isnan": lambda x: np.isnan(np.asarray(x, dtype=float)),
    "float": lambda x: np.asarray(x, dtype=np.float64),
    "int": lambda x: np.asarray(x, dtype=np.float64).astype(np.int64),
    "str": lambda x: np.asarray(x).astype(str).astype(object),
    "startswith": lambda x, p: np.char.startswith(_str_array(x), p),
    "endswith": lambda x, p: np.char.endswith(_str_array(x), p),
    "contains": lambda x, p: np.char.find(_str_array(x), p) >= 0,
    "lower": lambda x: np.char.lower(_str_array(x)).astype(object),
    "upper": lambda x: np.char.upper(_str_array(x)).astype(object),
    "part": _part,
}

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.true_divide,
    ast.FloorDiv: np.floor_divide,
    ast.Mod: np.mod,
    ast.Pow: np.power,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: lambda a, b: np.equal(a, b),
    ast.NotEq: lambda a, b: np.not_equal(a, b),
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
}


def compile_expr(text: str, *, where: str = "expression") -> Compiled:
    """Compile ``text`` into a function of a batch; raise `ExpressionError` if not allowed."""
    tree = _parse(text, where)
    try:
        return _Compiler(text, where).visit(tree.body)
    except RecursionError:
        raise ExpressionError(f"{where}: expression is nested too deeply") from None


def _parse(text: str, where: str) -> ast.Expression:
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"{where}: expression is longer than {MAX_LENGTH} characters")
    try:
        return ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(
            f"{where}: cannot parse {text!r}: {exc.msg} at column {exc.offset}"
        ) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ExpressionError(f"{where}: cannot parse {text[:60]!r}...: {exc}") from None


def fields_used(text: str) -> set[str]:
    """The field names an expression reads (for validation against known fields)."""
    tree = _parse(text, "expression")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in FUNCTIONS and node.id not in (
            "True",
            "False",
            "None",
        ):
            names.add(node.id)
    return names


class _Compiler:
    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where

    def fail(self, node: ast.AST, what: str) -> ExpressionError:
        col = getattr(node, "col_offset", 0) + 1
        return ExpressionError(f"{self.where}: {what} in {self.text!r} (column {col})")

    def visit(self, node: ast.AST) -> Compiled:
        method = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None:
            raise self.fail(node, f"{type(node).__name__.lower()} is not allowed")
        return method(node)

    def visit_Constant(self, node: ast.Constant) -> Compiled:
        value = node.value
        if not isinstance(value, (int, float, str, bool, type(None))):
            raise self.fail(node, f"constant {value!r} is not allowed")
        return lambda b: value

    def visit_Name(self, node: ast.Name) -> Compiled:
        name = node.id

        def get(b: Batch) -> Any:
            try:
                return b.columns[name]
            except KeyError:
                raise ExpressionError(
                    f"{self.where}: field {name!r} is not in the records "
                    f"(they have: {', '.join(sorted(b.public_columns())) or 'no fields'})"
                ) from None

        return get

    def visit_BinOp(self, node: ast.BinOp) -> Compiled:
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise self.fail(node, f"operator {type(node.op).__name__} is not allowed")
        left, right = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, ast.Add):

            def add(b: Batch) -> Any:
                lv, rv = left(b), right(b)
                if _is_text(lv) or _is_text(rv):
                    return np.char.add(_str_array(lv), _str_array(rv)).astype(object)
                return np.add(lv, rv)

            return add
        return lambda b: op(left(b), right(b))

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Compiled:
        operand = self.visit(node.operand)
        if isinstance(node.op, ast.USub):
            return lambda b: np.negative(operand(b))
        if isinstance(node.op, ast.UAdd):
            return operand
        if isinstance(node.op, ast.Not):
            return lambda b: np.logical_not(operand(b))
        raise self.fail(node, "operator ~ is not allowed")

    def visit_BoolOp(self, node: ast.BoolOp) -> Compiled:
        parts = [self.visit(v) for v in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or

        def run(b: Batch) -> Any:
            result = parts[0](b)
            for p in parts[1:]:
                result = combine(result, p(b))
            return result

        return run

    def visit_Compare(self, node: ast.Compare) -> Compiled:
        left = self.visit(node.left)
        steps: list[tuple[Callable[[Any, Any], Any], Compiled]] = []
        for op, comp in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(comp, (ast.List, ast.Tuple, ast.Set)):
                    raise self.fail(comp, "'in' needs a literal list such as ['a', 'b']")
                values = [self._literal(e) for e in comp.elts]
                negate = isinstance(op, ast.NotIn)

                def member(a: Any, _v: Any, values: list[Any] = values, negate: bool = negate):
                    r = np.isin(np.asarray(a, dtype=object), np.array(values, dtype=object))
                    return np.logical_not(r) if negate else r

                steps.append((member, lambda b: None))
                continue
            fn = _CMPOPS.get(type(op))
            if fn is None:
                raise self.fail(node, f"comparison {type(op).__name__} is not allowed")
            steps.append((fn, self.visit(comp)))

        def run(b: Batch) -> Any:
            a = left(b)
            result: Any = True
            for fn, rhs in steps:
                r = rhs(b)
                result = np.logical_and(result, fn(a, r))
                a = r
            return result

        return run

    def visit_IfExp(self, node: ast.IfExp) -> Compiled:
        cond, yes, no = self.visit(node.test), self.visit(node.body), self.visit(node.orelse)
        return lambda b: np.where(cond(b), yes(b), no(b))

    def visit_Call(self, node: ast.Call) -> Compiled:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            if isinstance(node.func, ast.Attribute):
                raise self.fail(
                    node, f"method calls such as .{node.func.attr}() are not allowed; use a "
                    f"function, e.g. startswith(sensor, 'line1/')"
                )
            name = node.func.id if isinstance(node.func, ast.Name) else "this call"
            raise self.fail(
                node, f"function {name!r} is not allowed (allowed: {', '.join(sorted(FUNCTIONS))})"
            )
        if node.keywords:
            raise self.fail(node, "keyword arguments are not allowed")
        fn = FUNCTIONS[node.func.id]
        args = [self.visit(a) for a in node.args]
        return lambda b: fn(*(a(b) for a in args))

    def _literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, (int, float))
        ):
            return -node.operand.value
        raise self.fail(node, "only numbers and strings may appear in an 'in' list")


def _is_text(v: Any) -> bool:
    if isinstance(v, str):
        return True
    return isinstance(v, np.ndarray) and v.dtype.kind in ("O", "U")


def evaluate_mask(fn: Compiled, batch: Batch) -> np.ndarray:
    """Evaluate a condition to a boolean mask of the batch's length."""
    result = np.asarray(fn(batch))
    if result.dtype != bool:
        result = result.astype(bool)
    if result.ndim == 0:
        return np.full(batch.n, bool(result))
    return result


def evaluate_column(fn: Compiled, batch: Batch) -> np.ndarray:
    """Evaluate an expression to a column of the batch's length."""
    result = fn(batch)
    arr = np.asarray(result)
    if arr.ndim == 0:
        if isinstance(result, str):
            out = np.empty(batch.n, dtype=object)
            out[:] = result
            return out
        return np.full(batch.n, result)
    if arr.dtype.kind == "U":
        arr = arr.astype(object)
    return arr
