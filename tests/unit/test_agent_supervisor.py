"""The engine supervisor: runs the pipeline, restarts a failing one with backoff, switches to a
new one on apply, keeps the outbox published for the uplink when no engine runs, and stops
gracefully (the engine's last commit happens, nothing is left running)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgewise.edge.agent import EngineSupervisor
from edgewise.edge.backoff import Backoff
from edgewise.edge.outbox_access import OutboxAccess
from edgewise.pipeline.spec import PipelineSpec, parse_pipeline

PIPE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: {name}
spec:
  sources:
    - id: {name}-src
{source}
  sinks:
    - id: out
      type: outbox
      inputs: [{name}-src]
      stream: {name}
  outbox:
    sync: normal
"""
LIVE = "      type: simulator\n      profile: custom\n      rate_hz: 100\n" \
       "      groups: [{prefix: a, count: 2}]"
FINITE = "      type: simulator\n      profile: custom\n      realtime: false\n      limit: 500\n" \
         "      groups: [{prefix: a, count: 2}]"
MISSING = "      type: file\n      path: /nonexistent/input.ndjson"


def spec(name: str, source: str) -> PipelineSpec:
    return parse_pipeline(PIPE.format(name=name, source=source), f"{name}.yaml")


async def until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def produced(access: OutboxAccess, stream: str) -> int:
    ob = access.current()
    st = ob.stats().get(stream) if ob is not None else None
    return st.produced if st is not None else 0


async def test_switches_pipelines_and_idles_with_the_outbox_published(tmp_path: Path) -> None:
    access = OutboxAccess()
    sup = EngineSupervisor(tmp_path, access, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(spec("one", LIVE)))
    try:
        await until(lambda: sup.state == "running" and produced(access, "one") > 0)
        first = access.current()
        assert first is sup.engine.outbox  # the uplink acknowledges on the engine's object
        assert await sup.apply(spec("two", LIVE)) is None
        assert sup.state == "running" and sup.status()["pipeline"] == "two"
        assert access.current() is sup.engine.outbox and access.current() is not first
        await until(lambda: produced(access, "two") > 0)
        assert await sup.apply(None) is None  # nothing assigned: idle, outbox still there
        assert sup.state == "idle"
        await until(lambda: access.current() is not None)
        assert produced(access, "one") > 0 and produced(access, "two") > 0
        assert await sup.apply(spec("three", FINITE)) is None
        await until(lambda: sup.state == "finished")  # a finite pipeline ends: idle again
        await until(lambda: produced(access, "three") == 500)
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)
    assert sup.state == "stopped" and access.current() is None
    assert sup.starts == 3


async def test_a_failing_pipeline_is_restarted_with_backoff_until_replaced(
    tmp_path: Path,
) -> None:
    access = OutboxAccess()
    sup = EngineSupervisor(tmp_path, access, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(spec("bad", MISSING)))
    try:
        await until(lambda: sup.starts >= 3)
        assert sup.error == "source 'bad-src': file /nonexistent/input.ndjson does not exist"
        assert sup.status()["state"] in ("restarting", "starting", "running")
        assert await sup.apply(spec("good", LIVE)) is None
        assert sup.state == "running" and sup.error is None
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)


async def test_cancellation_stops_the_engine_gracefully(tmp_path: Path) -> None:
    access = OutboxAccess()
    sup = EngineSupervisor(tmp_path, access, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(spec("one", LIVE)))
    await until(lambda: sup.state == "running" and produced(access, "one") > 0)
    engine = sup.engine
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not engine.running and access.current() is None
    with pytest.raises(Exception, match="not open"):
        engine.outbox.db  # noqa: B018 - closed by the engine's own shutdown


async def test_status_keeps_the_finished_pipelines_counts_and_sink_latency(
    tmp_path: Path,
) -> None:
    """A finished pipeline's readings, alarms and local sink latency stay in the status (the
    demo and `agent status` show them after the run), with per-sink latency while it runs."""
    text = PIPE.format(name="fin", source=FINITE).replace(
        "  sinks:\n", "  sinks:\n    - {id: local, type: log, inputs: [fin-src], "
        "max_per_batch: 1}\n")
    access = OutboxAccess()
    sup = EngineSupervisor(tmp_path, access, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(parse_pipeline(text, "fin.yaml")))
    try:
        await until(lambda: sup.state == "finished")
        st = sup.status()
        assert (st["state"], st["readings_in"], st["alarms"]) == ("finished", 500, 0)
        assert set(st["sinks"]) == {"local"}
        assert st["sinks"]["local"]["count"] == 500
        assert st["sinks"]["local"]["p99_ms"] > 0
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)
    assert sup.status()["readings_in"] == 500
