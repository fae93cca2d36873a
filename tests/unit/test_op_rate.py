"""The rate_of_change operator: per key (value - previous) / (ts - previous ts)."""

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
from edgewise.pipeline.operators.filter import MissingFieldError
from edgewise.pipeline.operators.rate import RateConfig, RateOfChange


def make(**cfg: Any) -> RateOfChange:
    return RateOfChange("r", RateConfig.model_validate(cfg), RunContext("t", Path(".")))


def batch(rows: list[tuple[str, float, float]]) -> Batch:
    return Batch.from_records([{"sensor": s, "ts": t, "value": v} for s, t, v in rows])


def test_rate_per_second_per_key() -> None:
    op = make()
    out = op.process(batch([
        ("a", 0.0, 10.0), ("b", 0.0, 100.0), ("a", 2.0, 14.0), ("a", 2.5, 13.0),
        ("b", 10.0, 50.0),
    ]))
    # first reading of each key has no rate and is not emitted
    assert out.to_records() == [
        {"sensor": "a", "ts": 2.0, "value": 14.0, "rate": 2.0},
        {"sensor": "a", "ts": 2.5, "value": 13.0, "rate": -2.0},
        {"sensor": "b", "ts": 10.0, "value": 50.0, "rate": -5.0},
    ]


def test_per_minute_and_output_name() -> None:
    op = make(per="1m", output="ramp")
    out = op.process(batch([("a", 0.0, 10.0), ("a", 30.0, 11.5)]))
    assert out["ramp"].tolist() == [3.0]  # 1.5 per 30 s = 3 per minute
    assert "rate" not in out


def test_previous_value_carries_across_batches() -> None:
    op = make()
    assert op.process(batch([("a", 0.0, 1.0)])) is None
    assert op.process(batch([("a", 4.0, 9.0), ("b", 4.0, 5.0)]))["rate"].tolist() == [2.0]
    out = op.process(batch([("b", 6.0, 1.0), ("a", 5.0, 8.0)]))
    assert list(zip(out["sensor"].tolist(), out["rate"].tolist(), strict=True)) == [
        ("b", -2.0), ("a", -1.0),
    ]


def test_duplicate_and_backwards_times_are_skipped() -> None:
    op = make()
    out = op.process(batch([
        ("a", 1.0, 1.0), ("a", 1.0, 5.0), ("a", 3.0, 9.0), ("a", 2.0, 0.0), ("a", 4.0, 4.0),
    ]))
    # vs the reading just before: dt 0 -> skip; 9-5 over 2 s; dt -1 -> skip; 4-0 over 2 s
    assert out["ts"].tolist() == [3.0, 4.0]
    assert out["rate"].tolist() == [2.0, 2.0]
    assert op.skipped == 2


def test_limit_emits_only_fast_changes_and_raises_alarms() -> None:
    op = make(limit=1.5)
    assert op.raises_alarms is True
    assert make().raises_alarms is False
    out = op.process(batch([
        ("a", 0.0, 0.0), ("a", 1.0, 1.0), ("a", 2.0, 3.0), ("a", 3.0, 1.0), ("a", 4.0, 2.5),
    ]))
    assert out["rate"].tolist() == [2.0, -2.0]  # 1.0 and 1.5 are not above the limit
    assert out["ts"].tolist() == [2.0, 3.0]


def test_keeps_accept_times_and_other_columns() -> None:
    b = batch([("a", 0.0, 0.0), ("a", 1.0, 1.0), ("a", 2.0, 3.0)]).with_columns(
        **{ACCEPTED: np.array([0.1, 0.2, 0.3]), "unit": np.array(["m"] * 3, dtype=object)}
    )
    out = make().process(b)
    assert out[ACCEPTED].tolist() == [0.2, 0.3]
    assert out["unit"].tolist() == ["m", "m"]


def test_snapshot_restore_continues() -> None:
    op = make()
    op.process(batch([("a", 0.0, 1.0), ("b", 0.0, 2.0), ("b", 1.0, 4.0)]))
    state = ckpt.unpack(ckpt.pack(op.snapshot()))
    assert state["prev_v"] == [1.0, 4.0]
    fresh = make()
    fresh.restore(state)
    out = fresh.process(batch([("a", 2.0, 5.0), ("b", 3.0, 0.0), ("c", 3.0, 1.0)]))
    assert out["rate"].tolist() == [2.0, -2.0]
    assert out["sensor"].tolist() == ["a", "b"]


def test_large_batch_matches_a_per_record_loop() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    sensors = np.array([f"s{i}" for i in rng.integers(0, 17, n)], dtype=object)
    ts = np.cumsum(rng.uniform(0.001, 0.1, n))
    vals = np.round(rng.normal(0, 5, n), 2)
    op = make()
    got = []
    for a in range(0, n, 700):
        b = Batch({"sensor": sensors[a:a + 700], "ts": ts[a:a + 700], "value": vals[a:a + 700]})
        r = op.process(b)
        got += list(zip(r["sensor"].tolist(), r["rate"].tolist(), strict=True))
    expected = []
    prev: dict[str, tuple[float, float]] = {}
    for s, t, v in zip(sensors.tolist(), ts.tolist(), vals.tolist(), strict=True):
        if s in prev:
            expected.append((s, (v - prev[s][1]) / (t - prev[s][0])))
        prev[s] = (t, v)
    assert len(got) == n - 17
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], rel=1e-12)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("per: 0", "spec.stages.0.per: Input should be greater than 0"),
        ("limit: -1", "spec.stages.0.limit: Input should be greater than or equal to 0"),
        ("output: _rate", "spec.stages.0.output: output must be a field name not starting with"),
    ],
)
def test_spec_errors(params: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: r, type: rate_of_change, inputs: [s], {params}}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert text.startswith("<test>:9: "), text
    assert text.split(": ", 1)[1].startswith(message), text


async def test_rate_alarms_in_the_engine(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    vals = [20.0, 20.5, 23.0, 23.1, 19.0, 19.2]
    src.write_bytes(b"".join(
        orjson.dumps({"sensor": "t1", "ts": 1000.0 + 10 * i, "value": v}) + b"\n"
        for i, v in enumerate(vals)
    ))
    spec = make_spec(
        f"""
        sources:
          - {{id: s, type: file, path: "{src}", batch: 2}}
        stages:
          - {{id: ramp, type: rate_of_change, inputs: [s], per: 1m, limit: 6}}
        sinks:
          - {{id: out, type: file, inputs: [ramp], path: out.ndjson}}
        """
    )
    summary = await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    # per minute: 3.0, 15.0, 0.6, -24.6, 1.2 -> above 6: 15.0 and -24.6
    assert [(r["ts"], r["rate"]) for r in got] == [
        (1020.0, pytest.approx(15.0)), (1040.0, pytest.approx(-24.6)),
    ]
    assert summary["alarms"] == 2


def test_missing_field_is_a_clear_error() -> None:
    b = Batch.from_records([{"sensor": "a", "ts": 1.0, "value": 2.0}])
    with pytest.raises(MissingFieldError) as err:
        make(time_field="time").process(b)
    assert str(err.value) == (
        "stage 'r': field 'time' is not in the records (they have: sensor, ts, value); "
        "check the stage's field, key_by and time_field"
    )
