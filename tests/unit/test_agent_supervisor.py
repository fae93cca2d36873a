"""The engine supervisor: runs the pipeline, restarts a failing one with backoff, switches to a
new one on apply, runs every engine on the agent's one outbox (open while no engine runs, never
closed by an engine), and stops gracefully (the engine's last commit happens, nothing is left
running)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from edgewise.common.backoff import Backoff
from edgewise.edge.agent import EngineSupervisor
from edgewise.outbox import Outbox
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


def produced(outbox: Outbox, stream: str) -> int:
    st = outbox.stats().get(stream)
    return st.produced if st is not None else 0


@pytest.fixture
def outbox(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Outbox(tmp_path / "engine" / "outbox.db", sync="normal") as ob:
        yield ob


async def test_switches_pipelines_and_idles_on_the_one_outbox(
    tmp_path: Path, outbox: Outbox
) -> None:
    sup = EngineSupervisor(tmp_path, outbox, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(spec("one", LIVE)))
    try:
        await until(lambda: sup.state == "running" and produced(outbox, "one") > 0)
        first = sup.engine
        assert first.outbox is outbox  # the uplink acknowledges on the engine's object
        assert await sup.apply(spec("two", LIVE)) is None
        assert sup.state == "running" and sup.status().pipeline == "two"
        assert sup.engine.outbox is outbox and sup.engine is not first
        await until(lambda: produced(outbox, "two") > 0)
        assert await sup.apply(None) is None  # nothing assigned: idle, outbox still there
        assert sup.state == "idle"
        assert outbox.stats() and outbox.peek()  # open and readable while no engine runs
        assert produced(outbox, "one") > 0 and produced(outbox, "two") > 0
        assert await sup.apply(spec("three", FINITE)) is None
        await until(lambda: sup.state == "finished")  # a finite pipeline ends: idle again
        await until(lambda: produced(outbox, "three") == 500)
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)
    assert sup.state == "stopped"
    assert sup.starts == 3
    assert outbox.peek()  # no engine closed the lent outbox


async def test_a_failing_pipeline_is_restarted_with_backoff_until_replaced(
    tmp_path: Path, outbox: Outbox
) -> None:
    sup = EngineSupervisor(tmp_path, outbox, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(spec("bad", MISSING)))
    try:
        await until(lambda: sup.starts >= 3 and sup.state == "restarting")
        assert sup.error == "source 'bad-src': file /nonexistent/input.ndjson does not exist"
        assert sup.status().state in ("restarting", "starting", "running")
        assert await sup.apply(spec("good", LIVE)) is None
        assert sup.state == "running" and sup.error is None
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)


async def test_cancellation_stops_the_engine_gracefully(tmp_path: Path, outbox: Outbox) -> None:
    sup = EngineSupervisor(tmp_path, outbox, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(spec("one", LIVE)))
    await until(lambda: sup.state == "running" and produced(outbox, "one") > 0)
    engine = sup.engine
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not engine.running
    # the engine's last commit happened: everything it counted is stored, and the outbox it
    # borrowed is still open for the uplink
    stored = sum(len(c.payload) > 0 for c in outbox.peek(max_bytes=1 << 30))
    assert stored == outbox.stats()["one"].pending_chunks
    assert engine.counters.streams["one"] == outbox.stats()["one"].produced


async def test_status_keeps_the_finished_pipelines_counts_and_sink_latency(
    tmp_path: Path,
) -> None:
    """A finished pipeline's readings, alarms and local sink latency stay in the status (the
    demo and `agent status` show them after the run), with per-sink latency while it runs."""
    text = PIPE.format(name="fin", source=FINITE).replace(
        "  sinks:\n", "  sinks:\n    - {id: local, type: log, inputs: [fin-src], "
        "max_per_batch: 1}\n")
    with Outbox(tmp_path / "engine" / "outbox.db", sync="normal") as outbox:
        await _run_finished(tmp_path, outbox, text)


async def _run_finished(tmp_path: Path, outbox: Outbox, text: str) -> None:
    sup = EngineSupervisor(tmp_path, outbox, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(parse_pipeline(text, "fin.yaml")))
    try:
        await until(lambda: sup.state == "finished")
        st = sup.status()
        assert (st.state, st.readings_in, st.alarms) == ("finished", 500, 0)
        assert st.sinks is not None and set(st.sinks) == {"local"}
        assert st.sinks["local"].count == 500
        assert st.sinks["local"].p99_ms is not None and st.sinks["local"].p99_ms > 0
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)
    assert sup.status().readings_in == 500


async def test_a_damaged_outbox_stops_the_supervisor_with_the_fix_instead_of_a_restart_loop(
    tmp_path: Path,
) -> None:
    """SQLite finds the file damaged at a commit (its cache hides most damage until then):
    every engine would fail the same way, so the supervisor does not restart it with backoff
    forever; it raises, naming what to do (a restart moves the file aside)."""
    from edgewise.outbox import OutboxDamaged

    class Damaged(Outbox):
        commits = 0

        def commit(self, *args, **kw):  # type: ignore[no-untyped-def]
            Damaged.commits += 1
            if Damaged.commits > 2:  # as `disk.storage_error` reports a malformed file
                raise OutboxDamaged(f"outbox commit failed ({self.path}): database disk "
                                    "image is malformed")
            return super().commit(*args, **kw)

    with Damaged(tmp_path / "engine" / "outbox.db", sync="normal") as ob:
        sup = EngineSupervisor(tmp_path, ob, Backoff(0.01, 0.05))
        with pytest.raises(OutboxDamaged, match="start it again and it moves the damaged file"):
            await asyncio.wait_for(sup.run(spec("one", LIVE)), 10)
    assert sup.starts == 1


async def test_recovery_is_logged_at_the_level_of_the_failure(
    tmp_path: Path, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipeline whose input appears after it failed: "failed" and "running again" are both
    ERRORs, so a log filtered at ERROR says that it came back (issue 15)."""
    caplog.set_level(logging.INFO, logger="edgewise.edge.agent")
    path = tmp_path / "in.ndjson"
    source = f"      type: file\n      path: {path}\n      follow: true"
    sup = EngineSupervisor(tmp_path, outbox, Backoff(0.01, 0.05))
    task = asyncio.create_task(sup.run(spec("late", source)))
    try:
        await until(lambda: sup.starts >= 2 and sup.state == "restarting")
        path.write_text('{"sensor": "a", "ts": 1.0, "value": 1.0}\n')
        await until(lambda: sup.state == "running")
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)
    lines = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records
             if r.name == "edgewise.edge.agent"]
    first = lines.index(("ERROR", "pipeline late failed"))
    assert set(lines[:first]) <= {("INFO", "pipeline late running")}  # before it failed
    # from the first failure on: every line an ERROR, the last one the recovery
    assert lines[-1] == ("ERROR", "pipeline late running again")
    assert set(lines[first:]) <= {("ERROR", "pipeline late failed"),
                                  ("ERROR", "pipeline late running again")}


async def test_a_pipeline_that_failed_and_runs_again_still_says_why(
    tmp_path: Path, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release's health gate samples the supervisor about once a second; an engine that
    crashed and already runs again by then must still say why it was restarted (CI saw the
    gate report only "the engine was restarted" for a plugin's crash)."""
    from edgewise.edge.updater.updater import SupervisorHooks

    mod = tmp_path / "plug"
    mod.mkdir()
    (mod / "crashonce_sup.py").write_text(
        "class Crash:\n"
        "    def __init__(self, options):\n        self.n = 0\n"
        "    def process(self, batch):\n"
        "        self.n += 1\n"
        "        if self.n > 3:\n            raise RuntimeError('crash after start')\n"
        "        return batch\n")
    monkeypatch.syspath_prepend(str(mod))
    text = PIPE.format(name="cr", source=LIVE).replace(
        "  sinks:\n", "  stages:\n    - {id: plug, type: python, inputs: [cr-src], "
        "class: 'crashonce_sup:Crash'}\n  sinks:\n").replace("inputs: [cr-src]\n      stream",
                                                             "inputs: [plug]\n      stream")
    sup = EngineSupervisor(tmp_path, outbox, Backoff(0.01, 0.05))
    hooks = SupervisorHooks(sup, lambda: None, lambda _: None, lambda: None, lambda: None)
    task = asyncio.create_task(sup.run(parse_pipeline(text, "cr.yaml")))
    try:
        await until(lambda: sup.starts >= 2 and sup.state == "running")
        state, starts, error, _, _ = hooks.sample()
        assert (state, starts >= 2) == ("running", True)
        assert sup.error is None  # the running engine has no error of its own
        assert error is not None and "crash after start" in error
    finally:
        sup.stop()
        await asyncio.wait_for(task, 10)
    sys.modules.pop("crashonce_sup", None)
