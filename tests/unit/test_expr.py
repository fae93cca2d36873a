"""The expression language (edgewise.pipeline.expr): what it computes and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from edgewise.errors import ConfigError
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.expr import (
    ExpressionError,
    compile_expr,
    evaluate_column,
    evaluate_mask,
    fields_used,
)


@pytest.fixture
def batch() -> Batch:
    return Batch.from_records(
        [
            {"sensor": "line1/temp/001", "value": 10.0, "n": 3},
            {"sensor": "line1/pressure/002", "value": -2.5, "n": 4},
            {"sensor": "line2/temp/003", "value": 101.0, "n": 5},
        ]
    )


def col(text: str, batch: Batch) -> list:
    return evaluate_column(compile_expr(text), batch).tolist()


def mask(text: str, batch: Batch) -> list[bool]:
    return evaluate_mask(compile_expr(text), batch).tolist()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("value + 1", [11.0, -1.5, 102.0]),
        ("value * 2 - n", [17.0, -9.0, 197.0]),
        ("value / 4", [2.5, -0.625, 25.25]),
        ("n // 2", [1, 2, 2]),
        ("n % 2", [1, 0, 1]),
        ("n ** 2", [9, 16, 25]),
        ("-value", [-10.0, 2.5, -101.0]),
        ("+n", [3, 4, 5]),
        ("(n + 1) * 2", [8, 10, 12]),
        ("2 + 3 * n", [11, 14, 17]),
        ("3", [3, 3, 3]),
        ("1.5", [1.5, 1.5, 1.5]),
    ],
)
def test_arithmetic(batch: Batch, text: str, expected: list) -> None:
    assert col(text, batch) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n == 4", [False, True, False]),
        ("n != 4", [True, False, True]),
        ("value < 10", [False, True, False]),
        ("value <= 10", [True, True, False]),
        ("value > 10", [False, False, True]),
        ("value >= 10", [True, False, True]),
        ("1 < n <= 4", [True, True, False]),  # chained
        ("3 <= n < 5 != n", [True, True, False]),
        ("sensor == 'line1/temp/001'", [True, False, False]),
        ("sensor != 'line1/temp/001'", [False, True, True]),
    ],
)
def test_comparisons(batch: Batch, text: str, expected: list[bool]) -> None:
    assert mask(text, batch) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("value > 0 and n > 3", [False, False, True]),
        ("value > 50 or n == 4", [False, True, True]),
        ("not (n > 3)", [True, False, False]),
        ("not n > 3 and value > 0", [True, False, False]),
        ("n == 3 or n == 4 or n == 5", [True, True, True]),
        ("value > 0 and n > 3 and sensor == 'x'", [False, False, False]),
        ("True", [True, True, True]),
        ("False or n == 5", [False, False, True]),
    ],
)
def test_boolean_logic(batch: Batch, text: str, expected: list[bool]) -> None:
    assert mask(text, batch) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sensor in ['line1/temp/001', 'other']", [True, False, False]),
        ("sensor not in ['line1/temp/001', 'other']", [False, True, True]),
        ("n in [3, 5]", [True, False, True]),
        ("n in (-3, 4)", [False, True, False]),
        ("n not in [3, 5]", [False, True, False]),
        ("value in [10, 101]", [True, False, True]),
        ("n in []", [False, False, False]),
    ],
)
def test_in_lists(batch: Batch, text: str, expected: list[bool]) -> None:
    assert mask(text, batch) == expected


def test_if_else(batch: Batch) -> None:
    assert col("'hot' if value > 50 else 'ok'", batch) == ["ok", "ok", "hot"]
    out = evaluate_column(compile_expr("'hot' if value > 50 else 'ok'"), batch)
    assert out.dtype == object  # text columns are object arrays, as everywhere in the engine
    assert col("value * 2 if n == 4 else 0", batch) == [0.0, -5.0, 0.0]
    assert col("1 if n < 4 else (2 if n < 5 else 3)", batch) == [1, 2, 3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abs(value)", [10.0, 2.5, 101.0]),
        ("sqrt(n * n)", [3.0, 4.0, 5.0]),
        ("round(value / 3, 2)", [3.33, -0.83, 33.67]),
        ("round(value / 4)", [2.0, -1.0, 25.0]),
        ("min(value, n)", [3.0, -2.5, 5.0]),
        ("max(value, 0)", [10.0, 0.0, 101.0]),
        ("clip(value, 0, 50)", [10.0, 0.0, 50.0]),
        ("floor(value)", [10.0, -3.0, 101.0]),
        ("ceil(value)", [10.0, -2.0, 101.0]),
        ("int(value)", [10, -2, 101]),
        ("float(n)", [3.0, 4.0, 5.0]),
        ("log10(100) + n", [5.0, 6.0, 7.0]),
        ("exp(0) * n", [3.0, 4.0, 5.0]),
        ("log(exp(n))", [3.0, 4.0, 5.0]),
        ("isnan(value)", [False, False, False]),
        ("isnan(value / 0 * 0)", [True, True, True]),  # inf * 0
    ],
)
def test_functions(batch: Batch, text: str, expected: list) -> None:
    with np.errstate(divide="ignore", invalid="ignore"):
        assert col(text, batch) == pytest.approx(expected, abs=1e-12)


def test_isnan_true_for_nan() -> None:
    b = Batch({"x": np.array([1.0, np.nan, 3.0])}, 3)
    assert mask("isnan(x)", b) == [False, True, False]
    assert mask("not isnan(x) and x > 2", b) == [False, False, True]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("startswith(sensor, 'line1/')", [True, True, False]),
        ("endswith(sensor, '/003')", [False, False, True]),
        ("contains(sensor, 'temp')", [True, False, True]),
        ("startswith(sensor, 'line1/') and contains(sensor, 'temp')", [True, False, False]),
        ("not endswith(sensor, '001')", [False, True, True]),
        ("part(sensor, '/', 1) == 'temp'", [True, False, True]),
        ("upper(sensor) == 'LINE1/TEMP/001'", [True, False, False]),
    ],
)
def test_string_conditions(batch: Batch, text: str, expected: list[bool]) -> None:
    assert mask(text, batch) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("part(sensor, '/', 1)", ["temp", "pressure", "temp"]),
        ("part(sensor, '/', -1)", ["001", "002", "003"]),
        ("part(sensor, '/', 7)", ["", "", ""]),
        ("lower(upper(sensor))", ["line1/temp/001", "line1/pressure/002", "line2/temp/003"]),
        ("upper(part(sensor, '/', 0))", ["LINE1", "LINE1", "LINE2"]),
        ("sensor + '!'", ["line1/temp/001!", "line1/pressure/002!", "line2/temp/003!"]),
        ("'#' + str(n)", ["#3", "#4", "#5"]),
        ("'abc'", ["abc", "abc", "abc"]),
    ],
)
def test_string_values(batch: Batch, text: str, expected: list[str]) -> None:
    out = evaluate_column(compile_expr(text), batch)
    assert out.tolist() == expected
    assert out.dtype == object


def test_scalar_results_are_broadcast(batch: Batch) -> None:
    assert evaluate_mask(compile_expr("1 < 2"), batch).tolist() == [True, True, True]
    assert evaluate_mask(compile_expr("2 < 1"), batch).tolist() == [False, False, False]
    assert evaluate_column(compile_expr("7"), batch).tolist() == [7, 7, 7]
    assert evaluate_column(compile_expr("None"), batch).tolist() == [None, None, None]


def test_fields_used() -> None:
    assert fields_used("value > 1 and abs(n) < 2 or sensor == 'x'") == {"value", "n", "sensor"}
    assert fields_used("startswith(sensor, 'a') and True") == {"sensor"}


def test_missing_field_names_the_field_and_what_is_there(batch: Batch) -> None:
    fn = compile_expr("pressure > 3", where="stage 'f': where")
    with pytest.raises(ExpressionError) as err:
        fn(batch)
    assert str(err.value) == (
        "stage 'f': where: field 'pressure' is not in the records (they have: n, sensor, value)"
    )


def test_expression_error_is_a_config_error() -> None:
    assert issubclass(ExpressionError, ConfigError)


ALLOWED = (
    "abs, ceil, clip, contains, endswith, exp, float, floor, int, isnan, log, log10, lower, max, "
    "min, part, round, sqrt, startswith, str, upper"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("value.real > 1", "where: attribute is not allowed in 'value.real > 1' (column 1)"),
        ("value.__class__", "where: attribute is not allowed in 'value.__class__' (column 1)"),
        ("sensor[0] == 'l'", "where: subscript is not allowed in \"sensor[0] == 'l'\" (column 1)"),
        ("lambda x: x", "where: lambda is not allowed in 'lambda x: x' (column 1)"),
        (
            "__import__('os')",
            f"where: function '__import__' is not allowed (allowed: {ALLOWED}) in "
            "\"__import__('os')\" (column 1)",
        ),
        (
            "open('/etc/passwd')",
            f"where: function 'open' is not allowed (allowed: {ALLOWED}) in "
            "\"open('/etc/passwd')\" (column 1)",
        ),
        (
            "eval('1')",
            f"where: function 'eval' is not allowed (allowed: {ALLOWED}) in \"eval('1')\" "
            "(column 1)",
        ),
        (
            "value > 1 and getattr(value, 'x')",
            f"where: function 'getattr' is not allowed (allowed: {ALLOWED}) in "
            "\"value > 1 and getattr(value, 'x')\" (column 15)",
        ),
        ("[x for x in n]", "where: listcomp is not allowed in '[x for x in n]' (column 1)"),
        ("{'a': 1}", "where: dict is not allowed in \"{'a': 1}\" (column 1)"),
        ("n @ n", "where: operator MatMult is not allowed in 'n @ n' (column 1)"),
        ("~n", "where: operator ~ is not allowed in '~n' (column 1)"),
        ("n is None", "where: comparison Is is not allowed in 'n is None' (column 1)"),
        ("abs(x=1)", "where: keyword arguments are not allowed in 'abs(x=1)' (column 1)"),
        ("b'x' == n", "where: constant b'x' is not allowed in \"b'x' == n\" (column 1)"),
        ("f'{n}'", "where: joinedstr is not allowed in \"f'{n}'\" (column 1)"),
        (
            "n in sensor",
            "where: 'in' needs a literal list such as ['a', 'b'] in 'n in sensor' (column 6)",
        ),
        (
            "n in [n]",
            "where: only numbers and strings may appear in an 'in' list in 'n in [n]' (column 7)",
        ),
    ],
)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as err:
        compile_expr(text, where="where")
    assert str(err.value) == message


def test_method_calls_are_refused() -> None:
    with pytest.raises(ExpressionError) as err:
        compile_expr("sensor.startswith('a')", where="where")
    assert str(err.value) == (
        "where: method calls such as .startswith() are not allowed; use a function, e.g. "
        "startswith(sensor, 'line1/') in \"sensor.startswith('a')\" (column 1)"
    )


def test_syntax_error_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError) as err:
        compile_expr("value >", where="where")
    assert str(err.value).startswith("where: cannot parse 'value >': invalid syntax")


def test_deeply_nested_expression_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError):
        compile_expr("1+" * 500 + "1")


def test_fields_used_on_bad_syntax_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError):
        fields_used("value >")
