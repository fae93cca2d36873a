"""The deadband operator: report by exception per key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.operators.deadband import Deadband, DeadbandConfig
from edgewise.pipeline.operators.filter import MissingFieldError


def make(**cfg: Any) -> Deadband:
    return Deadband("d", DeadbandConfig.model_validate(cfg), RunContext("t", Path(".")))


def batch(values: list[float], sensors: list[str] | None = None, t0: float = 0.0) -> Batch:
    sensors = sensors or ["a"] * len(values)
    return Batch.from_records(
        [{"sensor": s, "ts": t0 + i, "value": float(v)}
         for i, (s, v) in enumerate(zip(sensors, values, strict=True))]
    )


def values(out: Batch | None) -> list[float]:
    return [] if out is None else out["value"].tolist()


def test_absolute_deadband_compares_with_last_emitted() -> None:
    op = make(deadband=0.5)
    # 10 first; 10.4 and 10.5 are within 0.5 of 10 (strictly more is needed); 10.6 passes;
    # then 10.2 is 0.4 from 10.6: dropped; 11.2 passes
    got = op.process(batch([10.0, 10.4, 10.5, 10.6, 10.2, 11.2, 11.0]))
    assert values(got) == [10.0, 10.6, 11.2]
    assert got["ts"].tolist() == [0.0, 3.0, 5.0]


def test_slow_drift_is_reported_once_it_adds_up() -> None:
    op = make(deadband=1.0)
    assert values(op.process(batch([0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4]))) == [
        0.0, 1.2, 2.4,
    ]


def test_percent_of_last_emitted() -> None:
    op = make(percent=10)
    # 100 -> band 10: 109 no, 111 yes; from 111 the band is 11.1: 100 no (11.0), 99.8 yes
    assert values(op.process(batch([100, 109, 111, 100, 99.8]))) == [100.0, 111.0, 99.8]
    op = make(percent=10)
    # last emitted 0: any change passes
    assert values(op.process(batch([0.0, 0.0, 0.01, 0.01]))) == [0.0, 0.01]


def test_deadband_or_percent() -> None:
    op = make(deadband=5.0, percent=1.0)
    # from 1000: percent band 10, absolute band 5 -> 1006 passes (absolute)
    assert values(op.process(batch([1000.0, 1004.0, 1006.0]))) == [1000.0, 1006.0]


def test_max_interval_emits_a_heartbeat_in_event_time() -> None:
    op = make(deadband=100.0, max_interval="3s")
    out = op.process(batch([5.0] * 10))  # ts 0..9
    assert out["ts"].tolist() == [0.0, 3.0, 6.0, 9.0]


def test_max_interval_alone_is_a_throttle() -> None:
    op = make(max_interval="2s")
    assert op.process(batch([1.0, 2.0, 3.0, 4.0, 5.0]))["ts"].tolist() == [0.0, 2.0, 4.0]


def test_first_reading_of_every_key_passes_and_keys_are_independent() -> None:
    op = make(deadband=1.0)
    out = op.process(batch([10, 50, 10.5, 52, 12, 50.5], ["a", "b", "a", "b", "a", "b"]))
    assert list(zip(out["sensor"].tolist(), values(out), strict=True)) == [
        ("a", 10.0), ("b", 50.0), ("b", 52.0), ("a", 12.0), ("b", 50.5),
    ]


def test_records_pass_unchanged_with_accept_times() -> None:
    b = batch([1.0, 1.1, 3.0]).with_columns(
        **{ACCEPTED: np.array([0.5, 0.6, 0.7]), "unit": np.array(["C", "C", "C"], dtype=object)}
    )
    out = make(deadband=1.0).process(b)
    assert out.to_records() == [
        {"sensor": "a", "ts": 0.0, "value": 1.0, "unit": "C"},
        {"sensor": "a", "ts": 2.0, "value": 3.0, "unit": "C"},
    ]
    assert out[ACCEPTED].tolist() == [0.5, 0.7]


def test_all_pass_returns_the_batch_and_none_pass_returns_none() -> None:
    op = make(deadband=1.0)
    b = batch([1.0, 5.0, 9.0])
    assert op.process(b) is b
    assert op.process(batch([9.5, 8.5], t0=3.0)) is None


def test_state_carries_across_batches_and_restarts() -> None:
    readings = [10.0, 10.2, 10.1, 10.3, 10.2, 13.0, 10.3, 13.1, 10.1]
    sensors = ["a", "b", "a", "b", "a", "b", "a", "b", "a"]
    whole = make(deadband=0.5, max_interval="3s").process(batch(readings, sensors))
    assert whole["ts"].tolist() == [0.0, 1.0, 4.0, 5.0, 8.0]  # a: 0, 4 and 8 by interval
    op = make(deadband=0.5, max_interval="3s")
    got = values(op.process(batch(readings[:4], sensors[:4])))
    assert got == [10.0, 10.2]
    state = ckpt.unpack(ckpt.pack(op.snapshot()))
    fresh = make(deadband=0.5, max_interval="3s")
    fresh.restore(state)
    got += values(fresh.process(batch(readings[4:], sensors[4:], t0=4.0)))
    assert got == values(whole) == [10.0, 10.2, 10.2, 13.0, 10.1]


def test_other_field_and_key() -> None:
    b = Batch.from_records([
        {"machine": "m1", "ts": 0.0, "rpm": 1000},
        {"machine": "m1", "ts": 1.0, "rpm": 1010},
        {"machine": "m1", "ts": 2.0, "rpm": 1030},
    ])
    out = make(field="rpm", key_by=["machine"], deadband=20).process(b)
    assert out["rpm"].tolist() == [1000, 1030]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("field: value", "spec.stages.0: set deadband, percent or max_interval (or several)"),
        ("deadband: -1", "spec.stages.0.deadband: Input should be greater than or equal to 0"),
        ("percent: 0", "spec.stages.0.percent: Input should be greater than 0"),
        ("max_interval: often", "spec.stages.0.max_interval: 'often' is not a duration"),
        ("deadband: 1, dead_band: 2", "spec.stages.0.dead_band: Extra inputs are not permitted"),
    ],
)
def test_spec_errors(params: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: d, type: deadband, inputs: [s], {params}}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert text.startswith("<test>:9: "), text
    assert text.split(": ", 1)[1].startswith(message), text


async def test_deadband_in_the_engine(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    vals = [20.0, 20.1, 20.2, 21.0, 21.05, 19.0]
    src.write_bytes(b"".join(
        orjson.dumps({"sensor": "t1", "ts": 1000.0 + i, "value": v}) + b"\n"
        for i, v in enumerate(vals)
    ))
    spec = make_spec(
        f"""
        sources:
          - {{id: s, type: file, path: "{src}", batch: 2}}
        stages:
          - {{id: changes, type: deadband, inputs: [s], deadband: 0.5}}
        sinks:
          - {{id: out, type: file, inputs: [changes], path: out.ndjson}}
        """
    )
    summary = await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x)["value"] for x in (tmp_path / "data" / "out.ndjson").read_bytes()
           .splitlines()]
    assert got == [20.0, 21.0, 19.0]
    assert summary["stages"]["changes"]["out"] == 3


def test_missing_field_is_a_clear_error() -> None:
    b = Batch.from_records([{"sensor": "a", "ts": 1.0, "value": 2.0}])
    with pytest.raises(MissingFieldError) as err:
        make(deadband=1.0, field="pressure").process(b)
    assert str(err.value) == (
        "stage 'd': field 'pressure' is not in the records (they have: sensor, ts, value); "
        "check the stage's field, key_by and time_field"
    )
