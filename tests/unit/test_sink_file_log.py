"""The file and log sinks: exact NDJSON lines and log records, internal columns never leave."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import SpecError
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.sinks.file import FileSink, FileSinkConfig
from edgewise.pipeline.sinks.log import LogConfig, LogSink
from edgewise.sim.signals import factory_line


def batch() -> Batch:
    return Batch(
        {
            "sensor": np.array(["line1/temp/001", "line1/temp/002"], dtype=object),
            "ts": np.array([1_764_547_200.02, 1_764_547_200.04]),
            "value": np.array([100.25, 101.0]),
            "count": np.array([3, 4], dtype=np.int64),
            "ok": np.array([True, False]),
            "_key": np.array([7, 8], dtype=np.int64),
            ACCEPTED: np.full(2, time.perf_counter()),
        }
    )


LINES = [
    b'{"sensor":"line1/temp/001","ts":1764547200.02,"value":100.25,"count":3,"ok":true}',
    b'{"sensor":"line1/temp/002","ts":1764547200.04,"value":101.0,"count":4,"ok":false}',
]


async def test_file_sink_writes_exact_ndjson_without_internal_columns(tmp_path: Path) -> None:
    ctx = RunContext("t", tmp_path / "data")
    sink = FileSink("out", FileSinkConfig(path="alarms/out.ndjson"), ctx)
    assert sink.path == tmp_path / "data" / "alarms" / "out.ndjson"  # relative to the data dir
    async with sink:
        sink.write(batch())
        # flushed per batch: readable before the sink is closed
        assert sink.path.read_bytes().splitlines() == LINES
        sink.write(batch().take(np.array([1])))
    assert sink.path.read_bytes() == b"\n".join([*LINES, LINES[1]]) + b"\n"
    st = sink.stats()
    assert (st["written"], st["errors"]) == (3, 0)
    assert st["latency"]["count"] == 3

    # a second run appends, with fsync on
    sink2 = FileSink("out", FileSinkConfig(path=str(sink.path), fsync=True), ctx)
    async with sink2:
        sink2.write(batch())
    assert sink.path.read_bytes().splitlines() == [*LINES, LINES[1], *LINES]


def test_file_sink_refuses_writes_before_start(tmp_path: Path) -> None:
    sink = FileSink("out", FileSinkConfig(path="x.ndjson"), RunContext("t", tmp_path))
    with pytest.raises(RuntimeError, match="not started"):
        sink.write(batch())


async def test_file_sink_in_a_pipeline_gets_exactly_the_alarms(tmp_path: Path) -> None:
    n, start = 20_000, 1_764_547_200.0
    spec = make_spec(
        f"""
        sources:
          - {{id: sim, type: simulator, seed: 3, realtime: false, limit: {n}, start: {start}}}
        stages:
          - {{id: alarms, type: threshold, inputs: [sim], high: 100.0}}
        sinks:
          - {{id: out, type: file, inputs: [alarms], path: alarms.ndjson}}
        """,
        tmp_path,
    )
    summary = await Engine(spec, tmp_path / "data").run()
    sig = factory_line(3)
    s, ticks, v = sig.readings(0, n)
    above = v > 100.0
    ts = np.round(start + ticks / sig.rate_hz, 6)
    want = [
        {"sensor": a, "ts": b, "value": c, "limit": 100.0, "kind": "high", "severity": "alarm"}
        for a, b, c in zip(
            sig.names[s[above]].tolist(), ts[above].tolist(), v[above].tolist(), strict=True
        )
    ]
    got = [orjson.loads(line) for line in (tmp_path / "data" / "alarms.ndjson").read_bytes()
           .splitlines()]
    assert len(want) == int(np.count_nonzero(above)) > 0
    assert got == want
    assert summary["sinks"]["out"]["written"] == len(want)


def test_log_sink_logs_at_the_configured_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = LogSink("dbg", LogConfig(level="warning", max_per_batch=1), RunContext("t", tmp_path))
    with caplog.at_level(logging.DEBUG, logger="edgewise.sink"):
        sink.write(batch())
    recs = [r for r in caplog.records if r.name == "edgewise.sink"]
    assert [(r.levelno, r.getMessage()) for r in recs] == [
        (logging.WARNING, "dbg " + LINES[0].decode())  # only max_per_batch records, no _ columns
    ]
    st = sink.stats()
    assert (st["written"], st["errors"]) == (2, 0)
    assert st["latency"]["count"] == 2


def test_log_sink_below_the_logger_level_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = LogSink("dbg", LogConfig(level="DEBUG"), RunContext("t", tmp_path))
    with caplog.at_level(logging.INFO, logger="edgewise.sink"):
        sink.write(batch())
    assert [r for r in caplog.records if r.name == "edgewise.sink"] == []
    with caplog.at_level(logging.DEBUG, logger="edgewise.sink"):
        sink.write(batch())
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "dbg " + line.decode()) for line in LINES
    ]
    assert sink.written == 4


def test_log_sink_unknown_level_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"spec\.sinks\.0\.level"):
        make_spec(
            """
            sources: [{id: sim, type: simulator, limit: 10}]
            sinks:
              - {id: dbg, type: log, inputs: [sim], level: LOUD}
            """
        )
