"""The map operator: derived fields (set), drop and rename."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.expr import ExpressionError
from edgewise.pipeline.operators.map import Map, MapConfig


def make(tmp_path: Path, **cfg: Any) -> Map:
    return Map("m", MapConfig.model_validate(cfg), RunContext("t", tmp_path))


def readings() -> Batch:
    b = Batch.from_records(
        [
            {"sensor": "line1/temp/001", "ts": 1.0, "value": 20.0, "raw": 2000},
            {"sensor": "line2/pressure/007", "ts": 2.0, "value": 100.0, "raw": 10000},
        ]
    )
    return b.with_columns(**{ACCEPTED: np.array([0.5, 0.6])})


def test_set_derives_fields_in_order(tmp_path: Path) -> None:
    op = make(
        tmp_path,
        set={
            "fahrenheit": "value * 9 / 5 + 32",
            "hot": "fahrenheit > 100",  # uses the field derived just before
            "line": "part(sensor, '/', 0)",
            "unit": "'degC'",
        },
    )
    out = op.process(readings())
    assert out.to_records() == [
        {"sensor": "line1/temp/001", "ts": 1.0, "value": 20.0, "raw": 2000,
         "fahrenheit": 68.0, "hot": False, "line": "line1", "unit": "degC"},
        {"sensor": "line2/pressure/007", "ts": 2.0, "value": 100.0, "raw": 10000,
         "fahrenheit": 212.0, "hot": True, "line": "line2", "unit": "degC"},
    ]
    assert out["line"].dtype == object
    assert out["unit"].dtype == object
    assert out[ACCEPTED].tolist() == [0.5, 0.6]


def test_set_overwrites_an_existing_field(tmp_path: Path) -> None:
    out = make(tmp_path, set={"value": "round(value / 3, 1)"}).process(readings())
    assert out["value"].tolist() == [6.7, 33.3]
    assert list(out.columns) == ["sensor", "ts", "value", "raw", ACCEPTED]


def test_drop_and_rename(tmp_path: Path) -> None:
    op = make(tmp_path, drop=["raw", "absent"], rename={"value": "celsius", "nope": "x"})
    out = op.process(readings())
    assert out.to_records() == [
        {"sensor": "line1/temp/001", "ts": 1.0, "celsius": 20.0},
        {"sensor": "line2/pressure/007", "ts": 2.0, "celsius": 100.0},
    ]
    assert out[ACCEPTED].tolist() == [0.5, 0.6]


def test_order_is_set_then_drop_then_rename(tmp_path: Path) -> None:
    op = make(
        tmp_path,
        set={"scaled": "raw / 100"},
        drop=["value", "raw"],
        rename={"scaled": "value"},
    )
    out = op.process(readings())
    assert out.to_records() == [
        {"sensor": "line1/temp/001", "ts": 1.0, "value": 20.0},
        {"sensor": "line2/pressure/007", "ts": 2.0, "value": 100.0},
    ]


def test_rename_onto_an_existing_field_replaces_it(tmp_path: Path) -> None:
    out = make(tmp_path, rename={"raw": "value"}).process(readings())
    assert out.to_records() == [
        {"sensor": "line1/temp/001", "ts": 1.0, "value": 2000},
        {"sensor": "line2/pressure/007", "ts": 2.0, "value": 10000},
    ]
    # when the field being renamed is absent, the existing one stays
    b = Batch.from_records([{"sensor": "a", "value": 1.5}])
    assert make(tmp_path, rename={"raw": "value"}).process(b).to_records() == [
        {"sensor": "a", "value": 1.5}
    ]


def test_swap_two_fields(tmp_path: Path) -> None:
    b = Batch.from_records([{"a": 1, "b": 2}])
    assert make(tmp_path, rename={"a": "b", "b": "a"}).process(b).to_records() == [
        {"b": 1, "a": 2}
    ]


def test_input_batch_is_not_modified(tmp_path: Path) -> None:
    b = readings()
    make(tmp_path, set={"value": "value * 0"}, drop=["raw"]).process(b)
    assert b["value"].tolist() == [20.0, 100.0]
    assert "raw" in b


def test_runtime_errors_name_stage_and_expression(tmp_path: Path) -> None:
    with pytest.raises(ExpressionError) as err:
        make(tmp_path, set={"x": "missing + 1"}).process(readings())
    assert str(err.value) == (
        "stage 'm': set.x: field 'missing' is not in the records "
        "(they have: raw, sensor, ts, value)"
    )
    with pytest.raises(ExpressionError) as err:
        make(tmp_path, set={"x": "sensor * 2.5"}).process(readings())
    assert str(err.value).startswith(
        "stage 'm': set.x = 'sensor * 2.5': cannot evaluate on these records:"
    )


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("set: {x: 'value +'}", "spec.stages.0.set: set.x: cannot parse 'value +'"),
        ("set: {x: 'value.real'}",
         "spec.stages.0.set: set.x: attribute is not allowed in 'value.real' (column 1)"),
        ("set: {_accepted: '1'}",
         "spec.stages.0.set: field '_accepted' is not a field name; use letters, digits and "
         "'_', starting with a letter (names starting with '_' are internal)"),
        ("drop: [_accepted]",
         "spec.stages.0.drop: field '_accepted' is not a field name;"),
        ("rename: {_accepted: acc}",
         "spec.stages.0.rename: field '_accepted' is not a field name;"),
        ("rename: {a: c, b: c}",
         "spec.stages.0.rename: two fields renamed to 'c'; each new name once"),
        ("placement: edge", "spec.stages.0: give at least one of set, drop or rename"),
        ("sett: {x: '1'}", "spec.stages.0.sett: Extra inputs are not permitted"),
    ],
)
def test_spec_errors(stage: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - id: m
        type: map
        inputs: [s]
        {stage}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert len(text.splitlines()) == 1
    assert text.split(": ", 1)[1].startswith(message), text


async def test_map_in_the_engine(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    recs = [{"sensor": "line1/temp/001", "ts": 1000.0 + i, "value": 10.0 * i} for i in range(4)]
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    spec = make_spec(
        f"""
        sources:
          - {{id: s, type: file, path: "{src}"}}
        stages:
          - id: f
            type: map
            inputs: [s]
            set: {{fahrenheit: "value * 9 / 5 + 32"}}
            drop: [value]
            rename: {{sensor: id}}
        sinks:
          - {{id: out, type: file, inputs: [f], path: out.ndjson}}
        """
    )
    await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert got == [
        {"id": "line1/temp/001", "ts": 1000.0, "fahrenheit": 32.0},
        {"id": "line1/temp/001", "ts": 1001.0, "fahrenheit": 50.0},
        {"id": "line1/temp/001", "ts": 1002.0, "fahrenheit": 68.0},
        {"id": "line1/temp/001", "ts": 1003.0, "fahrenheit": 86.0},
    ]
