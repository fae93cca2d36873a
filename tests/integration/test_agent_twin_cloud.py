"""The twin against the real control plane (`edgewise cloud serve` as a subprocess, the operator
CLI as subprocesses, the agent in this process):

* a setpoint-only ``edgewise config set`` on a node started with ``--pipeline`` leaves that
  pipeline running (alarms keep coming), also after the agent restarts;
* with the node's clock 1 h behind (injected into its twin), a cloud setpoint is held: the
  node reports it as not applied with the reason (reported state, ``agent status``, ``node
  show``) and applies it once the clock is right.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_agent_cloud import CloudProcess
from test_agent_fakecloud import wait_for
from test_agent_session import _free_port, _produced, make_agent

from edgewise.cloud.client import OperatorClient
from edgewise.edge import agent as agent_module
from edgewise.edge.agent import Agent
from edgewise.edge.twin import Twin

pytestmark = pytest.mark.timeout(120)

ALARMS = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: line
spec:
  sources:
    - id: sensors
      type: simulator
      profile: custom
      rate_hz: 200
      groups:
        - {prefix: "line1/temp", count: 10, spike_prob: 0.01}
  stages:
    - id: alarms
      type: threshold
      inputs: [sensors]
      field: value
      high: 100.0
  sinks:
    - id: alarms-out
      type: outbox
      inputs: [alarms]
      stream: alarms
      priority: alarm
  outbox:
    sync: normal
"""


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``edgewise ARGS`` as a process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgewise.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"})  # tables unwrapped
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def edgewise(*args: str) -> Any:
    """Run ``edgewise ARGS --json`` as a process; its JSON answer."""
    code, out, err = await run_cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


async def node_show(cloud: CloudProcess, node_id: str) -> dict[str, Any]:
    """GET /v1/nodes/ID with the operator's token (what `edgewise node show --json` prints)."""
    def get() -> dict[str, Any]:
        with OperatorClient.from_file(cloud.data / "cli.json") as client:
            return client.get_node(node_id).model_dump(mode="json")
    return await asyncio.to_thread(get)


async def reported(cloud: CloudProcess, node_id: str, what: str, cond: Any,
                   timeout: float = 20) -> dict[str, Any]:
    """Poll ``node show`` until ``cond(reported)``; the reported block."""
    end = time.monotonic() + timeout
    while True:
        rep = (await node_show(cloud, node_id))["reported"]
        if rep is not None and cond(rep):
            return rep
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}; last reported: {rep}")
        await asyncio.sleep(0.2)


class Running:
    """One agent run in this process: started, then stopped in `stop`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.task = asyncio.create_task(agent.run())

    async def stop(self) -> None:
        self.agent.stop()
        await asyncio.wait_for(self.task, 15)


async def _connected(agent: Agent) -> str:
    await wait_for(lambda: agent.uplink is not None and agent.uplink.state == "connected", 20,
                   "the session")
    assert agent.identity.node_id is not None
    return agent.identity.node_id


async def _alarms_keep_coming(agent: Agent, more: int = 20) -> int:
    """Wait until the pipeline has produced ``more`` alarms beyond now; the count then."""
    before = _produced(agent, "alarms")
    await wait_for(lambda: _produced(agent, "alarms") >= before + more, 20,
                   f"{more} more alarms after {before}")
    return _produced(agent, "alarms")


async def test_a_setpoint_only_config_set_keeps_the_pipeline_flag_running(
        tmp_path: Path) -> None:
    cloud = CloudProcess(tmp_path / "cloud", _free_port())
    await cloud.start()
    data, pipe = tmp_path / "node", tmp_path / "line.yaml"
    pipe.write_text(ALARMS)
    run: Running | None = None
    try:
        token = await cloud.token()
        run = Running(make_agent(data, cloud, token=token, pipeline=pipe,  # type: ignore[arg-type]
                                 report_s=0.3))
        agent = run.agent
        node_id = await _connected(agent)
        await _alarms_keep_coming(agent)

        res = await edgewise("config", "set", "--data", str(cloud.data), "--node", node_id,
                             "--setpoint", "mode=auto")
        assert [(n["node"], n["version"]) for n in res["nodes"]] == [(node_id, 1)]
        assert agent.twin is not None
        await wait_for(lambda: agent.twin.applied_version() == 1, 20, "desired v1 applied")
        assert agent.twin.setpoints.to_dict() == {"mode": "auto"}
        # the pipeline was neither stopped nor restarted: alarms keep coming, for > 5 s
        await asyncio.sleep(5.5)
        await _alarms_keep_coming(agent)
        assert agent.supervisor.state == "running" and agent.supervisor.starts == 1
        assert agent.supervisor.status().pipeline == "line"
        status = f"running --pipeline {pipe} (desired v1 names no pipeline)"
        rep = await reported(cloud, node_id, "a report of v1",
                             lambda r: r["applied_version"] == 1 and r["status"] == status)
        assert rep["counters"]["alarms.produced"] > 0
        got = await edgewise("config", "get", "--data", str(cloud.data), "--node", node_id)
        assert got["desired"]["pipelines"] is None
        code, table, err = await run_cli("config", "get", "--data", str(cloud.data), "--node",
                                         node_id)
        assert code == 0 and "none named (the node runs its own --pipeline)" in table, err
        await run.stop()
        stopped_at = _produced(agent, "alarms")

        # restarted: the persisted v1 names no pipeline, so --pipeline runs again
        run = Running(make_agent(data, cloud, pipeline=pipe,  # type: ignore[arg-type]
                                 report_s=0.3))
        agent = run.agent
        await _connected(agent)
        assert agent.twin is not None and agent.twin.applied_version() == 1
        await wait_for(lambda: _produced(agent, "alarms") >= stopped_at + 20, 20,
                       "alarms after the restart")
        assert agent.supervisor.status().pipeline == "line"
        assert agent.twin.status_text == status

        # an explicit "no pipeline" still stops it (and cannot be mixed with --pipeline)
        code, _, err = await run_cli("config", "set", "--data", str(cloud.data), "--node",
                                     node_id, "--pipeline", str(pipe), "--no-pipelines")
        assert code == 2 and "give --pipeline FILE or --no-pipelines, not both" in err
        res = await edgewise("config", "set", "--data", str(cloud.data), "--node", node_id,
                             "--no-pipelines")
        assert res["nodes"][0]["version"] == 2
        await wait_for(lambda: agent.supervisor.state == "idle", 20, "the pipeline to stop")
        assert agent.twin.applied_version() == 2
    finally:
        try:
            if run is not None:
                await run.stop()
        finally:  # a failed agent must not leave the control plane running
            await cloud.stop()


class SlowClock:
    """The node's wall clock, ``offset_s`` off the real one (injected into its twin)."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def now(self) -> float:
        return time.time() + self.offset_s

    def now_ms(self) -> int:
        return int(self.now() * 1000)


async def test_a_node_clock_an_hour_behind_holds_cloud_setpoints_until_it_is_right(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SlowClock(-3600)
    monkeypatch.setattr(agent_module, "Twin",
                        functools.partial(Twin, now=clock.now, now_ms=clock.now_ms))
    cloud = CloudProcess(tmp_path / "cloud", _free_port())
    await cloud.start()
    data, pipe = tmp_path / "node", tmp_path / "line.yaml"
    pipe.write_text(ALARMS)
    run: Running | None = None
    try:
        token = await cloud.token()
        run = Running(make_agent(data, cloud, token=token, pipeline=pipe,  # type: ignore[arg-type]
                                 report_s=0.3))
        agent = run.agent
        node_id = await _connected(agent)
        twin = agent.twin
        assert twin is not None

        await edgewise("config", "set", "--data", str(cloud.data), "--node", node_id,
                       "--setpoint", "mode=auto")
        await wait_for(lambda: twin.held is not None, 20, "v1 to be held")
        why = "desired v1 not applied: its setpoints are stamped 3"
        assert twin.status_text.startswith(why) and "check NTP/chrony" in twin.status_text
        assert twin.applied_version() == 0 and twin.setpoints.to_dict() == {}
        await _alarms_keep_coming(agent)  # the node keeps running its pipeline meanwhile
        # reported state, as the operator API shows it: not applied, with the reason
        rep = await reported(cloud, node_id, "a report of the held v1",
                             lambda r: r["status"].startswith(why))
        assert rep["applied_version"] is None
        shown = await edgewise("node", "show", node_id, "--data", str(cloud.data))
        assert shown["desired_version"] == 1
        assert shown["reported"]["applied_version"] is None
        assert shown["reported"]["status"].startswith(why)
        # the cloud's view holds the write, marked as one the node does not have yet
        assert shown["reported"]["pending_setpoints"] == ["mode"]
        # agent status (a process reading status.json): held, with the reason; not refused
        st = await edgewise("agent", "status", "--data", str(data))
        assert st["twin"]["applied_version"] == 0
        assert st["twin"]["status"].startswith(why)
        assert list(st["twin"]["held"]) == ["1"] and st["twin"]["refused"] == {}
        assert "mode" not in st["twin"]["setpoints"]

        # still behind after several retries: still not applied
        tries = twin.held_tries
        await wait_for(lambda: twin.held_tries >= tries + 3, 20, "more retries")
        assert twin.applied_version() == 0

        clock.offset_s = 0  # NTP puts the clock right: the next retry applies v1
        await wait_for(lambda: twin.applied_version() == 1, 20, "v1 applied")
        assert twin.setpoints.to_dict() == {"mode": "auto"} and twin.held is None
        status = f"running --pipeline {pipe} (desired v1 names no pipeline)"
        rep = await reported(cloud, node_id, "a report of v1",
                             lambda r: r["applied_version"] == 1)
        assert rep["status"] == status and rep["setpoints"] == {"mode": "auto"}
        assert rep["pending_setpoints"] == []
        await _alarms_keep_coming(agent)
        assert agent.supervisor.starts == 1
    finally:
        try:
            if run is not None:
                await run.stop()
        finally:  # a failed agent must not leave the control plane running
            await cloud.stop()
