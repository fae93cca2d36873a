"""The filter operator: keep records for which `where:` is true."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.expr import ExpressionError
from edgewise.pipeline.operators.filter import Filter, FilterConfig


def make(where: str, tmp_path: Path) -> Filter:
    return Filter("f", FilterConfig(where=where), RunContext("t", tmp_path))


def readings() -> Batch:
    b = Batch.from_records(
        [
            {"sensor": "line1/temp/001", "ts": 1.0, "value": 20.0},
            {"sensor": "line1/temp/002", "ts": 1.0, "value": 101.5},
            {"sensor": "line1/pressure/001", "ts": 1.5, "value": 120.0},
            {"sensor": "line1/temp/001", "ts": 2.0, "value": 100.0},
        ]
    )
    return b.with_columns(**{ACCEPTED: np.array([0.1, 0.2, 0.3, 0.4])})


def test_keeps_matching_rows_with_every_column(tmp_path: Path) -> None:
    op = make("value > 100 and startswith(sensor, 'line1/temp')", tmp_path)
    out = op.process(readings())
    assert isinstance(out, Batch)
    assert out.to_records() == [{"sensor": "line1/temp/002", "ts": 1.0, "value": 101.5}]
    assert out[ACCEPTED].tolist() == [0.2]
    assert op.dropped == 3


def test_keeps_order_and_accept_times(tmp_path: Path) -> None:
    op = make("value >= 100", tmp_path)
    out = op.process(readings())
    assert out["value"].tolist() == [101.5, 120.0, 100.0]
    assert out[ACCEPTED].tolist() == [0.2, 0.3, 0.4]


def test_all_pass_returns_the_same_batch(tmp_path: Path) -> None:
    b = readings()
    assert make("ts > 0", tmp_path).process(b) is b


def test_nothing_passes_returns_none(tmp_path: Path) -> None:
    op = make("sensor in ['nope']", tmp_path)
    assert op.process(readings()) is None
    assert op.dropped == 4


def test_constant_condition(tmp_path: Path) -> None:
    assert make("False", tmp_path).process(readings()) is None
    assert make("1 < 2", tmp_path).process(readings()).n == 4


def test_missing_field_is_a_clear_error(tmp_path: Path) -> None:
    op = make("pressure > 1", tmp_path)
    with pytest.raises(ExpressionError) as err:
        op.process(readings())
    assert str(err.value) == (
        "stage 'f': where: field 'pressure' is not in the records (they have: sensor, ts, value)"
    )


def test_type_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    op = make("sensor > 3", tmp_path)
    with pytest.raises(ExpressionError) as err:
        op.process(readings())
    assert str(err.value).startswith(
        "stage 'f': where 'sensor > 3': cannot evaluate on these records:"
    )


def test_bad_expression_is_a_spec_error_with_line() -> None:
    body = """
    sources:
      - {id: s, type: simulator, realtime: false, limit: 10}
    stages:
      - id: f
        type: filter
        inputs: [s]
        where: "value.__class__ == 1"
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    assert str(err.value) == (
        "<test>:12: spec.stages.0.where: where: attribute is not allowed in "
        "'value.__class__ == 1' (column 1)"
    )


def test_unparseable_and_empty_expressions_are_spec_errors() -> None:
    body = """
    sources:
      - {id: s, type: simulator, realtime: false, limit: 10}
    stages:
      - {id: f, type: filter, inputs: [s], where: "value >"}
      - {id: g, type: filter, inputs: [s], where: " "}
      - {id: h, type: filter, inputs: [s]}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("<test>:9: spec.stages.0.where: where: cannot parse 'value >'")
    assert lines[1] == (
        "<test>:10: spec.stages.1.where: write a condition, e.g. where: \"value > 80\""
    )
    assert lines[2] == "<test>:11: spec.stages.2.where: Field required (add it)"


async def test_filter_in_the_engine(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    recs = [
        {"sensor": f"line1/{kind}/00{i}", "ts": 1000.0 + i, "value": float(v)}
        for i, (kind, v) in enumerate(
            [("temp", 20), ("temp", 105), ("pressure", 130), ("temp", 99), ("temp", 100.5)]
        )
    ]
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    spec = make_spec(
        f"""
        sources:
          - {{id: s, type: file, path: "{src}"}}
        stages:
          - id: hot
            type: filter
            inputs: [s]
            where: "value > 100 and contains(sensor, 'temp')"
        sinks:
          - {{id: out, type: file, inputs: [hot], path: out.ndjson}}
        """
    )
    summary = await Engine(spec, tmp_path / "data").run()
    lines = (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()
    assert [orjson.loads(x) for x in lines] == [recs[1], recs[4]]
    assert summary["stages"]["hot"]["out"] == 2
    assert summary["readings_in"] == 5
