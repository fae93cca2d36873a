"""The anomaly operator: EWMA mean / EW variance z-scores per key."""

from __future__ import annotations

import math
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
from edgewise.pipeline.operators.anomaly import Anomaly, AnomalyConfig
from edgewise.pipeline.operators.filter import MissingFieldError


def make(**cfg: Any) -> Anomaly:
    return Anomaly("a", AnomalyConfig.model_validate(cfg), RunContext("t", Path(".")))


def batch(values: list[float], sensors: list[str] | None = None, t0: float = 0.0) -> Batch:
    sensors = sensors or ["a"] * len(values)
    return Batch.from_records(
        [{"sensor": s, "ts": t0 + i, "value": float(v)}
         for i, (s, v) in enumerate(zip(sensors, values, strict=True))]
    )


def reference(values: list[float], sensors: list[str], alpha: float, z: float, warmup: int,
              min_std: float = 0.0) -> list[tuple[int, float, float, float]]:
    """Straightforward per-record model: (row, zscore, mean, std) of each emitted reading."""
    state: dict[str, list[float]] = {}
    out = []
    for i, (s, x) in enumerate(zip(sensors, values, strict=True)):
        if s not in state:
            state[s] = [1, x, 0.0]
            continue
        n, mean, var = state[s]
        std = max(math.sqrt(var), min_std)
        if n >= warmup:
            zz = (x - mean) / std
            if abs(zz) > z:
                out.append((i, zz, mean, std))
        d = x - mean
        state[s] = [n + 1, mean + alpha * d, (1 - alpha) * (var + alpha * d * d)]
    return out


def test_hand_computed_sequence() -> None:
    op = make(alpha=0.5, z=2.0, warmup=3)
    # after 10, 12, 10, 12: mean 11.25, var 0.9375; 12 itself had z = 1.5 / sqrt(0.75) < 2
    out = op.process(batch([10, 12, 10, 12, 30]))
    assert out.n == 1
    rec = out.to_records()[0]
    assert rec["ts"] == 4.0 and rec["value"] == 30.0
    assert rec["mean"] == 11.25
    assert rec["std"] == math.sqrt(0.9375)
    assert rec["zscore"] == 18.75 / math.sqrt(0.9375)


def test_z_is_judged_before_the_update() -> None:
    # with the update first, 30 would pull the mean up and the std out, and z would be smaller
    op = make(alpha=0.5, z=2.0, warmup=3)
    out = op.process(batch([10, 12, 10, 12, 30]))
    assert out["mean"].tolist() == [11.25]


def test_warmup_readings_are_never_emitted() -> None:
    op = make(alpha=0.5, z=1.0, warmup=4)
    # readings 2..4 are judged nothing (fewer than 4 seen before them); reading 5 may be
    assert op.process(batch([0, 100, -100, 100])) is None
    out = op.process(batch([1000], t0=4.0))
    assert out["ts"].tolist() == [4.0]


def test_zero_std_gives_infinite_z_unless_floored() -> None:
    op = make(warmup=3)
    out = op.process(batch([5, 5, 5, 5, 5.01, 4.99]))
    # std was 0 for 5.01; after it, var = 0.9 * 0.01 * 0.001 and 4.99 is 0.011 below the mean
    assert out["zscore"].tolist() == [math.inf, pytest.approx(-11 / 3, rel=1e-9)]
    assert out["std"].tolist() == [0.0, pytest.approx(0.003, rel=1e-9)]
    op = make(warmup=3, min_std=0.1, z=3)
    # 5.01 is 0.1 std away from 5: not an anomaly; 6 is 10 std away
    out = op.process(batch([5, 5, 5, 5, 5.01, 6]))
    assert out["value"].tolist() == [6.0]
    assert out["std"].tolist() == [0.1]


def test_steady_equal_values_are_not_anomalies() -> None:
    assert make(warmup=1).process(batch([3.0] * 50)) is None


def test_keys_are_independent() -> None:
    sensors = ["a", "b"] * 6 + ["a", "b"]
    values = [10, 1000] * 6 + [10, 1000]
    values[-1] = 5000  # b jumps; a stays
    op = make(alpha=0.3, warmup=5, z=3, min_std=1.0)
    out = op.process(batch(values, sensors))
    assert out["sensor"].tolist() == ["b"]
    assert out["mean"].tolist() == [1000.0]
    assert out["zscore"].tolist() == [4000.0]


def test_matches_reference_across_batches_and_keeps_columns() -> None:
    rng = np.random.default_rng(11)
    n = 4000
    sensors = [f"s{i}" for i in rng.integers(0, 5, n)]
    values = np.round(rng.normal(50, 2, n), 2)
    values[rng.choice(n, 25, replace=False)] += 40  # spikes
    values = values.tolist()
    acc = np.arange(n, dtype=float)
    expected = reference(values, sensors, alpha=0.05, z=4.0, warmup=30)
    assert 20 <= len(expected) <= 40
    op = make(alpha=0.05, z=4.0, warmup=30)
    rows, zs, means, stds = [], [], [], []
    for a in range(0, n, 512):
        b = Batch({"sensor": np.array(sensors[a:a + 512], dtype=object),
                   "ts": np.arange(a, min(a + 512, n), dtype=float),
                   "value": np.array(values[a:a + 512]), ACCEPTED: acc[a:a + 512]})
        out = op.process(b)
        if out is not None:
            assert out[ACCEPTED].tolist() == out["ts"].tolist()
            rows += out["ts"].astype(int).tolist()
            zs += out["zscore"].tolist()
            means += out["mean"].tolist()
            stds += out["std"].tolist()
    assert rows == [e[0] for e in expected]
    assert zs == pytest.approx([e[1] for e in expected], rel=1e-9)
    assert means == pytest.approx([e[2] for e in expected], rel=1e-12)
    assert stds == pytest.approx([e[3] for e in expected], rel=1e-9)


def test_snapshot_restore_continues_exactly() -> None:
    values = [10, 11, 9, 10, 12, 8, 10, 11, 40, 10, 9, 60]
    whole = make(alpha=0.2, warmup=5).process(batch(values))
    op = make(alpha=0.2, warmup=5)
    assert op.process(batch(values[:6])) is None
    state = ckpt.unpack(ckpt.pack(op.snapshot()))
    fresh = make(alpha=0.2, warmup=5)
    fresh.restore(state)
    rest = fresh.process(batch(values[6:], t0=6.0))
    assert rest.to_records() == whole.to_records()
    assert rest["value"].tolist() == [40.0, 60.0]


def test_raises_alarms() -> None:
    assert Anomaly.raises_alarms is True


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("alpha: 1", "spec.stages.0.alpha: Input should be less than 1"),
        ("alpha: 0", "spec.stages.0.alpha: Input should be greater than 0"),
        ("z: 0", "spec.stages.0.z: Input should be greater than 0"),
        ("warmup: 0", "spec.stages.0.warmup: Input should be greater than or equal to 1"),
    ],
)
def test_spec_errors(params: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: a, type: anomaly, inputs: [s], {params}}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert text.startswith("<test>:9: "), text
    assert text.split(": ", 1)[1].startswith(message), text


async def test_anomaly_in_the_engine_counts_alarms(tmp_path: Path) -> None:
    spec = make_spec(
        """
        sources:
          - {id: s, type: simulator, realtime: false, limit: 20000, start: 1700000000}
        stages:
          - {id: odd, type: anomaly, inputs: [s], alpha: 0.05, z: 6, warmup: 50}
        sinks:
          - {id: raw, type: file, inputs: [s], path: raw.ndjson}
          - {id: out, type: file, inputs: [odd], path: out.ndjson}
        """
    )
    summary = await Engine(spec, tmp_path / "data").run()
    raw = [orjson.loads(x) for x in (tmp_path / "data" / "raw.ndjson").read_bytes().splitlines()]
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert len(raw) == summary["readings_in"] == 20000
    expected = reference([r["value"] for r in raw], [r["sensor"] for r in raw],
                         alpha=0.05, z=6.0, warmup=50)
    assert len(expected) > 0
    assert [(r["sensor"], r["ts"], r["value"]) for r in got] == [
        (raw[i]["sensor"], raw[i]["ts"], raw[i]["value"]) for i, *_ in expected
    ]
    assert summary["alarms"] == len(expected) == summary["stages"]["odd"]["out"]


def test_missing_field_is_a_clear_error() -> None:
    b = Batch.from_records([{"sensor": "a", "ts": 1.0, "value": 2.0}])
    with pytest.raises(MissingFieldError) as err:
        make(key_by=["machine"]).process(b)
    assert str(err.value) == (
        "stage 'a': field 'machine' is not in the records (they have: sensor, ts, value); "
        "check the stage's field, key_by and time_field"
    )
