"""The threshold operator (operators/threshold.py): every mode and state mode."""

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
from edgewise.pipeline.operators.threshold import Threshold, ThresholdConfig


def make(**cfg: Any) -> Threshold:
    return Threshold("t", ThresholdConfig.model_validate(cfg), RunContext("t", Path(".")))


def batch(values: list[float], sensor: str | list[str] = "a", t0: float = 0.0) -> Batch:
    sensors = [sensor] * len(values) if isinstance(sensor, str) else sensor
    return Batch.from_records(
        [{"sensor": s, "ts": t0 + i, "value": float(v)} for i, (s, v) in enumerate(
            zip(sensors, values, strict=True))]
    )


def kinds(out: Batch | None) -> list[tuple[float, str]]:
    """(value, kind) per alarm record."""
    if out is None:
        return []
    return list(zip(out["value"].tolist(), out["kind"].tolist(), strict=True))


def feed(op: Threshold, values: list[float], sensor: str = "a") -> list[tuple[float, str]]:
    """One reading per batch, so batching cannot matter."""
    got: list[tuple[float, str]] = []
    for i, v in enumerate(values):
        got += kinds(op.process(batch([v], sensor, t0=float(i))))
    return got


# -- mode: every -----------------------------------------------------------------------------
def test_every_high_is_strictly_above_with_all_fields() -> None:
    b = batch([99.0, 100.0, 100.01, 150.0, 20.0]).with_columns(
        **{ACCEPTED: np.array([1.0, 2.0, 3.0, 4.0, 5.0])}
    )
    out = make(high=100.0).process(b)
    assert out.to_records() == [
        {"sensor": "a", "ts": 2.0, "value": 100.01, "limit": 100.0, "kind": "high",
         "severity": "alarm"},
        {"sensor": "a", "ts": 3.0, "value": 150.0, "limit": 100.0, "kind": "high",
         "severity": "alarm"},
    ]
    assert out[ACCEPTED].tolist() == [3.0, 4.0]


def test_every_low_only() -> None:
    out = make(low=0.0, severity="warning").process(batch([5.0, -1.0, 0.0, -0.5, 10.0]))
    assert out.to_records() == [
        {"sensor": "a", "ts": 1.0, "value": -1.0, "limit": 0.0, "kind": "low",
         "severity": "warning"},
        {"sensor": "a", "ts": 3.0, "value": -0.5, "limit": 0.0, "kind": "low",
         "severity": "warning"},
    ]


def test_every_high_and_low() -> None:
    out = make(high=80.0, low=20.0).process(batch([10.0, 50.0, 90.0, 20.0, 80.0, 19.99]))
    assert kinds(out) == [(10.0, "low"), (90.0, "high"), (19.99, "low")]
    assert out["limit"].tolist() == [20.0, 80.0, 20.0]
    assert out["ts"].tolist() == [0.0, 2.0, 5.0]


def test_every_nothing_beyond_returns_none() -> None:
    assert make(high=100.0).process(batch([1.0, 99.9, 100.0])) is None


def test_every_other_field_and_integer_column() -> None:
    b = Batch.from_records([{"sensor": "p", "ts": 1.0, "pressure": 7},
                            {"sensor": "p", "ts": 2.0, "pressure": 12}])
    out = make(field="pressure", high=10.0).process(b)
    assert out.to_records() == [
        {"sensor": "p", "ts": 2.0, "value": 12.0, "limit": 10.0, "kind": "high",
         "severity": "alarm"}
    ]
    assert out["value"].dtype == np.float64


# -- mode: state -----------------------------------------------------------------------------
def test_state_raises_once_and_clears_with_hysteresis() -> None:
    op = make(high=100.0, mode="state", hysteresis=2.0)
    got = feed(op, [50, 101, 105, 120, 99, 98.5, 98.0, 97, 101, 102])
    assert got == [(101.0, "high"), (98.0, "clear"), (101.0, "high")]


def test_state_debounce_needs_consecutive_readings() -> None:
    op = make(high=100.0, mode="state", debounce=3)
    got = feed(op, [101, 102, 50, 101, 101, 99, 101, 101, 101, 150, 50])
    #               1    2   reset 1   2  reset 1    2    3 -> alarm     clear
    assert got == [(101.0, "high"), (50.0, "clear")]


def test_state_low_limit_with_hysteresis() -> None:
    op = make(low=10.0, mode="state", hysteresis=1.0)
    got = feed(op, [12, 9, 5, 10.5, 10.99, 11, 9.5])
    assert got == [(9.0, "low"), (11.0, "clear"), (9.5, "low")]


def test_state_low_alarm_record_fields() -> None:
    op = make(low=10.0, mode="state", severity="critical")
    out = op.process(batch([12.0, 9.0]))
    assert out.to_records() == [
        {"sensor": "a", "ts": 1.0, "value": 9.0, "limit": 10.0, "kind": "low",
         "severity": "critical"}
    ]


def test_state_debounce_counts_per_direction() -> None:
    op = make(high=100.0, low=0.0, mode="state", debounce=2)
    # high, low, high, high: the low breaks the run of highs
    assert feed(op, [101, -5, 101, 101]) == [(101.0, "high")]
    op = make(high=100.0, low=0.0, mode="state", debounce=2)
    assert feed(op, [-1, 101, -1, 101, 50]) == []  # alternating: never two in a row


def test_state_is_per_key() -> None:
    op = make(high=100.0, mode="state", debounce=2)
    out = op.process(batch([101, 101, 101], ["a", "b", "a"]))
    assert out.to_records() == [
        {"sensor": "a", "ts": 2.0, "value": 101.0, "limit": 100.0, "kind": "high",
         "severity": "alarm"},
    ]
    out = op.process(batch([50, 99], ["a", "b"], t0=10.0))  # a clears, b's count resets
    assert out.to_records() == [
        {"sensor": "a", "ts": 10.0, "value": 50.0, "limit": 100.0, "kind": "clear",
         "severity": "alarm"},
    ]
    out = op.process(batch([101, 101], ["b", "b"], t0=20.0))
    assert out.to_records() == [
        {"sensor": "b", "ts": 21.0, "value": 101.0, "limit": 100.0, "kind": "high",
         "severity": "alarm"},
    ]


def test_state_within_one_batch_after_an_active_start() -> None:
    op = make(high=100.0, mode="state")
    assert kinds(op.process(batch([101.0]))) == [(101.0, "high")]
    # the key is active at the start of this batch: every reading is looked at
    assert kinds(op.process(batch([101.0, 50.0, 101.0, 50.0]))) == [
        (50.0, "clear"), (101.0, "high"), (50.0, "clear"),
    ]


def test_state_snapshot_restore_continues_debounce_and_alarm() -> None:
    op = make(high=100.0, mode="state", debounce=3, hysteresis=1.0)
    assert feed(op, [101, 102]) == []  # two of three
    state = ckpt.unpack(ckpt.pack(op.snapshot()))
    fresh = make(high=100.0, mode="state", debounce=3, hysteresis=1.0)
    fresh.restore(state)
    assert feed(fresh, [103, 99.5, 99]) == [(103.0, "high"), (99.0, "clear")]
    fresh.restore(None)  # nothing saved: a no-op
    assert feed(fresh, [101, 101]) == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("mode: state", "spec.stages.0: set high, low or both"),
        ("high: 1, low: 5", "spec.stages.0: low must be below high"),
        ("high: 1, mode: sometimes", "spec.stages.0.mode: Input should be 'every' or 'state'"),
        ("high: 1, debounce: 0", "spec.stages.0.debounce: Input should be greater than or"),
    ],
)
def test_spec_errors(params: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: t, type: threshold, inputs: [s], {params}}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert text.startswith("<test>:9: "), text
    assert text.split(": ", 1)[1].startswith(message), text


async def test_threshold_in_the_engine_counts_alarms(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    values = [50.0, 100.5, 99.0, 101.0, 100.0, 130.25]
    src.write_bytes(b"".join(
        orjson.dumps({"sensor": "line1/temp/001", "ts": 1000.0 + i, "value": v}) + b"\n"
        for i, v in enumerate(values)
    ))
    spec = make_spec(
        f"""
        sources:
          - {{id: s, type: file, path: "{src}"}}
        stages:
          - {{id: alarms, type: threshold, inputs: [s], high: 100.0}}
        sinks:
          - {{id: out, type: file, inputs: [alarms], path: out.ndjson}}
        """
    )
    summary = await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert [(r["ts"], r["value"], r["kind"]) for r in got] == [
        (1001.0, 100.5, "high"), (1003.0, 101.0, "high"), (1005.0, 130.25, "high"),
    ]
    assert summary["alarms"] == 3


# -- bugs found in threshold.py (kept failing until fixed) -----------------------------------
@pytest.mark.parametrize(
    ("cfg", "values"),
    [
        ({"high": 100.0, "mode": "state", "debounce": 2}, [101, 50, 101]),
        ({"high": 100.0, "mode": "state"}, [101, 50]),
    ],
)
def test_state_does_not_depend_on_batching(cfg: dict[str, Any], values: list[float]) -> None:
    one_by_one = feed(make(**cfg), values)
    all_at_once = kinds(make(**cfg).process(batch(values)))
    assert all_at_once == one_by_one


def test_clear_of_a_low_alarm_reports_the_low_limit() -> None:
    op = make(high=100.0, low=0.0, mode="state")
    op.process(batch([-1.0]))
    out = op.process(batch([50.0]))
    assert out["kind"].tolist() == ["clear"]
    assert out["limit"].tolist() == [0.0]


def test_state_low_alarm_with_debounce() -> None:
    op = make(low=10.0, mode="state", debounce=2)
    assert feed(op, [9, 8, 7, 12]) == [(8.0, "low"), (12.0, "clear")]
