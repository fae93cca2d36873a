"""The downsample operator: every Nth reading, or one record per key per interval."""

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
from edgewise.pipeline.operators.downsample import Downsample, DownsampleConfig
from edgewise.pipeline.operators.filter import MissingFieldError


def make(**cfg: Any) -> Downsample:
    return Downsample("d", DownsampleConfig.model_validate(cfg), RunContext("t", Path(".")))


def batch(rows: list[tuple[str, float, float]], acc: bool = False) -> Batch:
    b = Batch.from_records([{"sensor": s, "ts": t, "value": v} for s, t, v in rows])
    if acc:
        b = b.with_columns(**{ACCEPTED: np.array([100.0 + t for _, t, _ in rows])})
    return b


def out_of(result: Any, port: str = "out") -> list[dict[str, Any]]:
    if result is None:
        return []
    if isinstance(result, Batch):
        result = {"out": result}
    b = result.get(port)
    return [] if b is None else b.to_records()


def triples(result: Any, port: str = "out") -> list[tuple[str, float, float]]:
    return [(r["sensor"], r["ts"], r["value"]) for r in out_of(result, port)]


# -- every N --------------------------------------------------------------------------------
def test_every_keeps_first_and_every_nth_per_key() -> None:
    op = make(every=3)
    rows = [("a", float(i), float(i)) for i in range(7)] + [("b", 0.5, 50.0), ("b", 1.5, 51.0)]
    out = op.process(batch(rows))
    assert triples(out) == [("a", 0.0, 0.0), ("a", 3.0, 3.0), ("a", 6.0, 6.0), ("b", 0.5, 50.0)]


def test_every_counts_across_batches_interleaved_keys() -> None:
    op = make(every=2)
    got = []
    seq = [("a", 0.0, 1.0), ("b", 0.0, 2.0), ("a", 1.0, 3.0), ("a", 2.0, 4.0), ("b", 1.0, 5.0),
           ("b", 2.0, 6.0), ("a", 3.0, 7.0), ("a", 4.0, 8.0)]
    for i in range(0, len(seq), 3):
        got += triples(op.process(batch(seq[i:i + 3])))
    # a: 1, 4, 8 (1st, 3rd, 5th);  b: 2, 6 (1st, 3rd) -- in arrival order
    assert got == [("a", 0.0, 1.0), ("b", 0.0, 2.0), ("a", 2.0, 4.0), ("b", 2.0, 6.0),
                   ("a", 4.0, 8.0)]


def test_every_one_passes_everything_and_keeps_accept_times() -> None:
    b = batch([("a", 0.0, 1.0), ("a", 1.0, 2.0)], acc=True)
    assert make(every=1).process(b) is b
    out = make(every=2).process(b)
    assert out[ACCEPTED].tolist() == [100.0]


def test_every_snapshot_restore() -> None:
    op = make(every=3)
    op.process(batch([("a", 0.0, 0.0), ("a", 1.0, 1.0)]))
    fresh = make(every=3)
    fresh.restore(ckpt.unpack(ckpt.pack(op.snapshot())))
    out = fresh.process(batch([("a", 2.0, 2.0), ("a", 3.0, 3.0), ("b", 0.0, 9.0)]))
    assert triples(out) == [("a", 3.0, 3.0), ("b", 0.0, 9.0)]


# -- interval -------------------------------------------------------------------------------
ROWS = [
    ("a", 0.1, 1.0), ("b", 0.2, 10.0), ("a", 0.5, 3.0), ("a", 0.3, 2.0),
    ("b", 0.9, 20.0), ("a", 1.2, 4.0), ("a", 1.7, 8.0), ("b", 2.5, 30.0),
]


def test_interval_last_emits_when_a_later_bucket_starts() -> None:
    op = make(interval="1s", how="last")
    out = op.process(batch(ROWS, acc=True))
    # a's bucket 0 closes when 1.2 arrives; b's bucket 0 when 2.5 arrives; a's bucket 1 is open
    assert out_of(out) == [
        {"sensor": "a", "ts": 0.5, "value": 3.0},  # largest event time, not last arrival
        {"sensor": "b", "ts": 0.9, "value": 20.0},
    ]
    assert out["out"][ACCEPTED].tolist() == [100.5, 100.9]
    assert triples(op.flush()) == [("a", 1.7, 8.0), ("b", 2.5, 30.0)]
    assert op.flush() is None


def test_interval_first() -> None:
    op = make(interval="1s", how="first")
    assert triples(op.process(batch(ROWS))) == [("a", 0.1, 1.0), ("b", 0.2, 10.0)]
    assert triples(op.flush()) == [("a", 1.2, 4.0), ("b", 2.5, 30.0)]


def test_interval_mean() -> None:
    op = make(interval="1s", how="mean")
    out = op.process(batch(ROWS, acc=True))
    assert out_of(out) == [
        {"sensor": "a", "ts": 0.0, "value": 2.0, "count": 3},
        {"sensor": "b", "ts": 0.0, "value": 15.0, "count": 2},
    ]
    assert out["out"][ACCEPTED].tolist() == [100.5, 100.9]  # newest reading of each bucket
    assert out_of(op.flush()) == [
        {"sensor": "a", "ts": 1.0, "value": 6.0, "count": 2},
        {"sensor": "b", "ts": 2.0, "value": 30.0, "count": 1},
    ]


def test_interval_buckets_continue_across_batches() -> None:
    op = make(interval="1s", how="mean")
    got = []
    for i in range(len(ROWS)):  # one reading per batch
        got += out_of(op.process(batch([ROWS[i]])))
    got += out_of(op.flush())
    assert [(r["sensor"], r["ts"], r["value"], r["count"]) for r in got] == [
        ("a", 0.0, 2.0, 3), ("b", 0.0, 15.0, 2), ("a", 1.0, 6.0, 2), ("b", 2.0, 30.0, 1),
    ]
    op = make(interval="1s", how="last")
    got = []
    for i in range(0, len(ROWS), 3):
        got += triples(op.process(batch(ROWS[i:i + 3])))
    assert got == [("a", 0.5, 3.0), ("b", 0.9, 20.0)]


def test_interval_skipped_buckets_and_several_closing_in_one_batch() -> None:
    op = make(interval="10s", how="last")
    out = op.process(batch([("a", 1.0, 1.0), ("a", 15.0, 2.0), ("a", 42.0, 3.0),
                            ("a", 43.0, 4.0), ("a", 95.0, 5.0)]))
    assert triples(out) == [("a", 1.0, 1.0), ("a", 15.0, 2.0), ("a", 43.0, 4.0)]


def test_interval_late_readings_go_to_the_late_port() -> None:
    op = make(interval="1s", how="mean")
    op.process(batch([("a", 0.5, 1.0), ("a", 1.5, 2.0)]))  # a is in bucket 1 now
    result = op.process(batch([("a", 0.7, 50.0), ("a", 1.6, 4.0), ("b", 0.1, 7.0)]))
    assert triples(result, "late") == [("a", 0.7, 50.0)]
    assert out_of(result) == []
    # within one batch: a reading behind a later bucket of its key is late too
    result = op.process(batch([("a", 2.1, 6.0), ("a", 1.9, 60.0)]))
    assert triples(result, "late") == [("a", 1.9, 60.0)]
    assert out_of(result) == [{"sensor": "a", "ts": 1.0, "value": 3.0, "count": 2}]


def test_interval_state_survives_snapshot_restore() -> None:
    for how in ("first", "last", "mean"):
        whole = make(interval="1s", how=how)
        expected = out_of(whole.process(batch(ROWS, acc=True))) + out_of(whole.flush())
        op = make(interval="1s", how=how)
        got = out_of(op.process(batch(ROWS[:4], acc=True)))
        fresh = make(interval="1s", how=how)
        fresh.restore(ckpt.unpack(ckpt.pack(op.snapshot())))
        got += out_of(fresh.process(batch(ROWS[4:], acc=True))) + out_of(fresh.flush())
        assert got == expected, how


def test_interval_keeps_extra_columns_for_first_and_last() -> None:
    b = Batch.from_records([
        {"sensor": "a", "ts": 0.1, "value": 1.0, "unit": "C", "q": 1},
        {"sensor": "a", "ts": 0.6, "value": 2.0, "unit": "C", "q": 2},
    ])
    op = make(interval="1s", how="last")
    op.process(b)
    fresh = make(interval="1s", how="last")
    fresh.restore(ckpt.unpack(ckpt.pack(op.snapshot())))  # held row survives as plain data
    out = fresh.process(Batch.from_records([{"sensor": "a", "ts": 1.1, "value": 3.0,
                                             "unit": "C", "q": 3}]))
    assert out_of(out) == [{"sensor": "a", "ts": 0.6, "value": 2.0, "unit": "C", "q": 2}]


def test_sub_second_interval_boundaries() -> None:
    op = make(interval="100ms", how="first")
    out = op.process(batch([("a", 0.3, 1.0), ("a", 0.35, 2.0), ("a", 0.4, 3.0)]))
    assert triples(out) == [("a", 0.3, 1.0)]  # 0.3 starts bucket [0.3, 0.4)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("how: mean", "spec.stages.0: set exactly one of every (a count) or interval"),
        ("every: 2, interval: 1s", "spec.stages.0: set exactly one of every"),
        ("every: 0", "spec.stages.0.every: Input should be greater than or equal to 1"),
        ("interval: 1s, how: median",
         "spec.stages.0.how: Input should be 'first', 'last' or 'mean'"),
    ],
)
def test_spec_errors(params: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: d, type: downsample, inputs: [s], {params}}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert text.startswith("<test>:9: "), text
    assert text.split(": ", 1)[1].startswith(message), text


async def test_downsample_in_the_engine(tmp_path: Path) -> None:
    # 200 sensors at 50 Hz for 3 s of event time: one record per sensor per second
    spec = make_spec(
        """
        sources:
          - {id: s, type: simulator, realtime: false, limit: 30000, start: 1700000000}
        stages:
          - {id: per-second, type: downsample, inputs: [s], interval: 1s, how: mean}
          - {id: tenth, type: downsample, inputs: [s], every: 10}
        sinks:
          - {id: out, type: file, inputs: [per-second], path: out.ndjson}
          - {id: late, type: file, inputs: [per-second.late], path: late.ndjson}
        """
    )
    summary = await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert len(got) == 600
    assert {r["count"] for r in got} == {50}
    assert sorted({r["ts"] for r in got}) == [1700000000.0, 1700000001.0, 1700000002.0]
    assert summary["stages"]["tenth"]["out"] == 3000
    assert summary["late"] == 0


def test_missing_field_is_a_clear_error() -> None:
    b = Batch.from_records([{"sensor": "a", "ts": 1.0, "value": 2.0}])
    with pytest.raises(MissingFieldError) as err:
        make(interval="1s", how="mean", field="temp").process(b)
    assert str(err.value) == (
        "stage 'd': field 'temp' is not in the records (they have: sensor, ts, value); "
        "check the stage's field, key_by and time_field"
    )
