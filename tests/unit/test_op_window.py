"""The window operator (operators/window.py): tumbling and sliding event-time windows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.operators.window import AGGREGATES, Window, WindowConfig

ALL = list(AGGREGATES)


def make(**cfg: Any) -> Window:
    return Window("w", WindowConfig.model_validate(cfg), RunContext("t", Path(".")))


def recs(rows: list[tuple[str, float, float]]) -> Batch:
    return Batch.from_records([{"sensor": s, "ts": t, "value": v} for s, t, v in rows])


def out_of(result: Any, port: str = "out") -> list[dict[str, Any]]:
    if result is None:
        return []
    if isinstance(result, Batch):
        result = {"out": result}
    b = result.get(port)
    return [] if b is None else b.to_records()


# sensor a: values 1, 2, 3, 4, 10 at ts 0.1 .. 0.5, arriving out of time order;
# sensor b: 7 at 0.2 and 5 at 0.6 (arriving 5 first)
WINDOW0 = [
    ("a", 0.3, 3.0), ("b", 0.6, 5.0), ("a", 0.1, 1.0), ("a", 0.5, 10.0),
    ("b", 0.2, 7.0), ("a", 0.2, 2.0), ("a", 0.4, 4.0),
]
EXPECTED_A = {
    "sensor": "a", "ts": 0.0, "window_start": 0.0, "window_end": 1.0,
    "count": 5, "sum": 20.0, "mean": 4.0, "min": 1.0, "max": 10.0,
    "stddev": math.sqrt(10.0),  # population: 130/5 - 4^2
    "rms": math.sqrt(26.0), "first": 1.0, "last": 10.0,  # first/last by event time
    "p50": 3.0, "p95": 8.8, "p99": 9.76,  # linear interpolation between order statistics
}
EXPECTED_B = {
    "sensor": "b", "ts": 0.0, "window_start": 0.0, "window_end": 1.0,
    "count": 2, "sum": 12.0, "mean": 6.0, "min": 5.0, "max": 7.0, "stddev": 1.0,
    "rms": math.sqrt(37.0), "first": 7.0, "last": 5.0, "p50": 6.0, "p95": 6.9, "p99": 6.98,
}


def assert_records(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert list(g) == list(e)
        for k, v in e.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
            else:
                assert g[k] == v, k


def test_tumbling_every_aggregate_exact() -> None:
    op = make(size="1s", aggregates=ALL)
    assert op.process(recs(WINDOW0)) is None  # nothing closed yet
    result = op.process(recs([("a", 1.5, 0.0)]))  # watermark 1.5 closes [0, 1)
    assert set(result) == {"out"}
    assert result["out"]["count"].dtype == np.int64
    assert_records(out_of(result), [EXPECTED_A, EXPECTED_B])


def test_tumbling_accumulates_across_batches() -> None:
    op = make(size="1s", aggregates=ALL)
    for i in range(0, len(WINDOW0), 2):  # two records per batch
        assert op.process(recs(WINDOW0[i : i + 2])) is None
    assert_records(out_of(op.process(recs([("b", 1.0, 0.0)]))), [EXPECTED_A, EXPECTED_B])


def test_window_end_is_exclusive_and_several_windows_close_in_order() -> None:
    op = make(size="1s", aggregates=["count", "sum"])
    op.process(recs([("a", 0.0, 1.0), ("a", 0.999, 2.0), ("a", 1.0, 4.0), ("a", 2.5, 8.0)]))
    got = out_of(op.process(recs([("a", 3.0, 16.0)])))
    # [0,1) and [1,2) closed by 2.5 already; [2,3) closes at watermark 3.0
    assert got == [{"sensor": "a", "ts": 2.0, "window_start": 2.0, "window_end": 3.0,
                    "count": 1, "sum": 8.0}]
    op = make(size="1s", aggregates=["count", "sum"])
    got = out_of(op.process(recs(
        [("a", 0.0, 1.0), ("a", 0.999, 2.0), ("a", 1.0, 4.0), ("a", 2.5, 8.0)]
    )))
    assert [(r["window_start"], r["count"], r["sum"]) for r in got] == [
        (0.0, 2, 3.0), (1.0, 1, 4.0),
    ]


def test_multi_field_aggregates() -> None:
    op = make(size="10s", aggregates=["count", "max(pressure)", "mean", "min(temp)",
                                      "mean(temp)"])
    b = Batch.from_records([
        {"sensor": "m1", "ts": 1.0, "value": 1.0, "pressure": 3.5, "temp": 20.0},
        {"sensor": "m1", "ts": 2.0, "value": 2.0, "pressure": 4.5, "temp": 18.0},
        {"sensor": "m1", "ts": 3.0, "value": 6.0, "pressure": 1.0, "temp": 25.0},
    ])
    op.process(b)
    assert out_of(op.flush()) == [{
        "sensor": "m1", "ts": 0.0, "window_start": 0.0, "window_end": 10.0,
        "count": 3, "max_pressure": 4.5, "mean": 3.0, "min_temp": 18.0, "mean_temp": 21.0,
    }]


def test_key_by_two_fields() -> None:
    op = make(size="1s", key_by=["line", "kind"], aggregates=["count", "sum"])
    b = Batch.from_records([
        {"line": "l1", "kind": "temp", "ts": 0.1, "value": 1.0},
        {"line": "l1", "kind": "pressure", "ts": 0.2, "value": 2.0},
        {"line": "l2", "kind": "temp", "ts": 0.3, "value": 4.0},
        {"line": "l1", "kind": "temp", "ts": 0.4, "value": 8.0},
        {"line": "l2", "kind": "temp", "ts": 0.5, "value": 16.0},
    ])
    op.process(b)
    assert out_of(op.flush()) == [
        {"line": "l1", "kind": "temp", "ts": 0.0, "window_start": 0.0, "window_end": 1.0,
         "count": 2, "sum": 9.0},
        {"line": "l1", "kind": "pressure", "ts": 0.0, "window_start": 0.0, "window_end": 1.0,
         "count": 1, "sum": 2.0},
        {"line": "l2", "kind": "temp", "ts": 0.0, "window_start": 0.0, "window_end": 1.0,
         "count": 2, "sum": 20.0},
    ]


def test_no_key_fields_one_window_for_all() -> None:
    op = make(size="1s", key_by=[], aggregates=["count", "max"])
    op.process(recs([("a", 0.1, 1.0), ("b", 0.2, 5.0)]))
    assert out_of(op.flush()) == [
        {"ts": 0.0, "window_start": 0.0, "window_end": 1.0, "count": 2, "max": 5.0}
    ]


def test_sliding_each_record_in_two_windows() -> None:
    op = make(size="2s", slide="1s", aggregates=["count", "sum", "first", "last"])
    got = out_of(op.process(recs([("a", 0.5, 1.0), ("a", 1.5, 2.0), ("a", 2.5, 4.0)])))
    # watermark 2.5 closes the windows ending at 1 and 2; the record at 10 the rest
    assert [r["window_start"] for r in got] == [-1.0, 0.0]
    got += out_of(op.process(recs([("a", 10.0, 100.0)])))
    assert got == [
        {"sensor": "a", "ts": -1.0, "window_start": -1.0, "window_end": 1.0,
         "count": 1, "sum": 1.0, "first": 1.0, "last": 1.0},
        {"sensor": "a", "ts": 0.0, "window_start": 0.0, "window_end": 2.0,
         "count": 2, "sum": 3.0, "first": 1.0, "last": 2.0},
        {"sensor": "a", "ts": 1.0, "window_start": 1.0, "window_end": 3.0,
         "count": 2, "sum": 6.0, "first": 2.0, "last": 4.0},
        {"sensor": "a", "ts": 2.0, "window_start": 2.0, "window_end": 4.0,
         "count": 1, "sum": 4.0, "first": 4.0, "last": 4.0},
    ]
    # the record at 10 is in [9, 11) and [10, 12)
    assert [(r["window_start"], r["count"]) for r in out_of(op.flush())] == [(9.0, 1), (10.0, 1)]


def test_sliding_total_count_is_size_over_slide_times_records() -> None:
    op = make(size="3s", slide="1s", aggregates=["count"])
    got = out_of(op.process(recs([("a", 0.25 * i, 1.0) for i in range(40)])))  # 0 .. 9.75
    counts = [r["count"] for r in got + out_of(op.flush())]
    assert sum(counts) == 3 * 40
    assert len(counts) == 12  # windows starting at -2 .. 9


def test_late_records_go_to_the_late_port() -> None:
    op = make(size="1s", aggregates=["count", "sum"])
    op.process(recs([("a", 0.2, 1.0), ("a", 1.5, 2.0)]))  # closes [0, 1)
    result = op.process(recs([("a", 0.7, 50.0), ("a", 1.6, 3.0), ("b", 0.9, 60.0)]))
    assert out_of(result, "late") == [
        {"sensor": "a", "ts": 0.7, "value": 50.0}, {"sensor": "b", "ts": 0.9, "value": 60.0},
    ]
    assert out_of(result) == []
    assert out_of(op.flush()) == [
        {"sensor": "a", "ts": 1.0, "window_start": 1.0, "window_end": 2.0, "count": 2,
         "sum": 5.0},
    ]


def test_allowed_lateness_keeps_windows_open_longer() -> None:
    op = make(size="1s", allowed_lateness="1s", aggregates=["count", "sum"])
    assert op.process(recs([("a", 0.2, 1.0), ("a", 1.5, 2.0)])) is None  # [0,1) open to 2.0
    assert op.process(recs([("a", 0.7, 4.0)])) is None  # accepted, not late
    # lateness is judged against the watermark before the batch (1.5), and a batch is
    # accumulated before windows fire: 0.8 still counts in [0, 1), which 2.0 then closes
    result = op.process(recs([("a", 2.0, 8.0), ("a", 0.8, 16.0)]))
    assert out_of(result) == [
        {"sensor": "a", "ts": 0.0, "window_start": 0.0, "window_end": 1.0, "count": 3,
         "sum": 21.0},
    ]
    assert out_of(result, "late") == []
    late = op.process(recs([("a", 0.9, 32.0)]))
    assert out_of(late, "late") == [{"sensor": "a", "ts": 0.9, "value": 32.0}]


def test_sliding_record_late_for_some_windows_only() -> None:
    op = make(size="2s", slide="1s", aggregates=["count", "sum"])
    op.process(recs([("a", 0.5, 1.0), ("a", 2.0, 2.0)]))  # closes [-1,1) and [0,2)
    result = op.process(recs([("a", 1.5, 4.0), ("a", 0.5, 8.0)]))
    # 1.5 still fits [1,3); 0.5 fits only closed windows: late
    assert out_of(result, "late") == [{"sensor": "a", "ts": 0.5, "value": 8.0}]
    assert [(r["window_start"], r["count"], r["sum"]) for r in out_of(op.flush())] == [
        (1.0, 2, 6.0), (2.0, 1, 2.0),
    ]


def test_idle_timeout_closes_windows_via_on_timer() -> None:
    op = make(size="1s", idle_timeout="5s", aggregates=["count"])
    op.process(recs([("a", 0.5, 1.0)]))
    assert op.on_timer(4.9) is None  # not idle long enough
    got = out_of(op.on_timer(5.0))  # watermark = 0.5 + 5.0
    assert got == [{"sensor": "a", "ts": 0.0, "window_start": 0.0, "window_end": 1.0,
                    "count": 1}]
    assert op.on_timer(60.0) is None  # nothing left
    assert op.flush() is None


def test_idle_timeout_only_closes_windows_the_advanced_watermark_passes() -> None:
    op = make(size="10s", idle_timeout="1s", aggregates=["count"])
    op.process(recs([("a", 0.5, 1.0), ("a", 10.5, 1.0)]))  # closes [0,10)
    assert op.on_timer(2.0) is None  # watermark 12.5 < 20
    assert [r["window_start"] for r in out_of(op.on_timer(9.5))] == [10.0]


def test_flush_emits_every_open_window_in_order() -> None:
    op = make(size="1s", aggregates=["count"])
    op.process(recs([("b", 2.5, 1.0), ("a", 2.1, 1.0), ("a", 0.5, 1.0)]))
    # process() already emitted a's [0, 1) (watermark 2.5); flush emits the open rest
    got = [(r["sensor"], r["window_start"]) for r in out_of(op.flush())]
    assert got == [("b", 2.0), ("a", 2.0)]
    assert op.flush() is None


def run_all(op: Window, batches: list[Batch]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in batches:
        r = op.process(b)
        out += out_of(r) + [{"late": x} for x in out_of(r, "late")]
    return out + out_of(op.flush())


@pytest.mark.parametrize(
    "cfg",
    [
        {"size": "1s", "aggregates": ALL},
        {"size": "2s", "slide": "500ms", "aggregates": ["count", "mean", "p50", "first", "last"],
         "allowed_lateness": "1s"},
    ],
)
def test_snapshot_restore_gives_the_same_output(cfg: dict[str, Any]) -> None:
    rng = np.random.default_rng(7)
    sensors = np.array(["a", "b", "c"], dtype=object)
    batches = []
    for i in range(12):
        n = 25
        ts = np.round(i * 0.8 + rng.uniform(-4.0, 0.8, n), 3)  # out of order, some late
        batches.append(Batch({"sensor": sensors[rng.integers(0, 3, n)], "ts": ts,
                              "value": np.round(rng.normal(50, 10, n), 2)}, n))
    expected = run_all(make(**cfg), batches)
    assert len(expected) > 20
    assert any("late" in r for r in expected)

    first = make(**cfg)
    got: list[dict[str, Any]] = []
    for b in batches[:5]:
        r = first.process(b)
        got += out_of(r) + [{"late": x} for x in out_of(r, "late")]
    state = ckpt.unpack(ckpt.pack(first.snapshot()))
    second = make(**cfg)
    second.restore(state)
    got += run_all(second, batches[5:])
    assert got == expected


def test_restore_of_nothing_is_a_no_op() -> None:
    op = make(size="1s")
    op.restore(None)
    assert op.flush() is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("size: 0", "spec.stages.0.size: Input should be greater than 0"),
        ("size: 1s, aggregates: [median]", "spec.stages.0.aggregates: unknown aggregate 'median'"),
        ("size: 1s, aggregates: []",
         "spec.stages.0.aggregates: list at least one aggregate, e.g. [count, mean, min, max]"),
        ("size: 2s, slide: 3s",
         "spec.stages.0: slide must be > 0 and <= size (omit it for tumbling windows)"),
        ("size: 2s, slide: 0.75s", "spec.stages.0: size must be a whole multiple of slide"),
        ("size: soon", "spec.stages.0.size: 'soon' is not a duration"),
    ],
)
def test_spec_errors(params: str, message: str) -> None:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: w, type: window, inputs: [s], {params}}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    text = str(err.value)
    assert text.startswith("<test>:9: "), text
    assert text.split(": ", 1)[1].startswith(message), text


def test_reading_on_a_sub_second_boundary_starts_the_window() -> None:
    op = make(size="100ms", aggregates=["count"])
    fired = out_of(op.process(recs([("a", 0.3, 1.0), ("a", 1700000000.3, 1.0)])))
    starts = [r["window_start"] for r in fired + out_of(op.flush())]
    assert starts == [0.3, 1700000000.3]
