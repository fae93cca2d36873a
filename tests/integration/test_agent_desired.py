"""Desired state over real TLS: poke → pull → validate → persist → apply (engine restarted with
the new pipeline) → report; invalid and expired versions refused and not pulled again; a node
restarted with no network runs its persisted pipeline (see test_agent_fakecloud.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from test_agent_fakecloud import FakeCloud, wait_for
from test_agent_session import SIM_PIPELINE, _free_port, _produced, make_agent

from edgewise.sync.twin_state import DesiredState, load_desired

pytestmark = pytest.mark.timeout(60)

LIVE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: {name}
spec:
  sources:
    - id: sensors
      type: simulator
      profile: custom
      rate_hz: 50
      groups:
        - {{prefix: "line2/temp", count: 4}}
  sinks:
    - id: raw-out
      type: outbox
      inputs: [sensors]
      stream: {name}-raw
      priority: normal
  outbox:
    sync: normal
"""


async def test_desired_state_is_pulled_validated_persisted_applied_and_reported(
    tmp_path: Path,
) -> None:
    data = tmp_path / "node"
    pipe = tmp_path / "p.yaml"
    pipe.write_text(SIM_PIPELINE.format(limit=500))
    async with FakeCloud(tmp_path) as cloud:
        # the agent's own report pacing (30 s): each change below is reported at once
        agent = make_agent(data, cloud, token=cloud.token(), pipeline=pipe)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: "node-1" in cloud.sessions, 10, "a session")
            assert agent.supervisor.status().pipeline == "sim"

            # v1: a new pipeline; the engine is restarted with it
            cloud.set_desired("node-1", DesiredState(1, {"line2": LIVE.format(name="line2")}))
            await wait_for(lambda: agent.supervisor.status().pipeline == "line2"
                           and agent.supervisor.state == "running", 10, "v1 to run")
            await wait_for(lambda: _produced(agent, "line2-raw") > 0, 10, "v1 records")
            await wait_for(lambda: any(r["applied_version"] == 1 for _, r in cloud.reports), 5,
                           "a report of v1")
            persisted = load_desired(data / "twin" / "desired.msgpack")
            assert persisted == cloud.desired["node-1"]
            report = [r for _, r in cloud.reports if r["applied_version"] == 1][-1]
            assert report["status"] == "running desired v1"
            assert report["counters"]["line2-raw.produced"] >= 0
            gets = cloud.counts["desired_get"]
            assert gets == 1

            # v2: invalid YAML (unknown operator type): refused, v1 keeps running
            bad = LIVE.format(name="line3").replace("type: simulator", "type: simulatr")
            cloud.set_desired("node-1", DesiredState(2, {"line3": bad}))
            await wait_for(lambda: 2 in agent.twin.refused, 5, "v2 refused")
            assert "desired v2 pipeline 'line3' is invalid" in agent.twin.refused[2]
            assert "simulatr" in agent.twin.refused[2]
            await wait_for(lambda: cloud.reports[-1][1]["status"].startswith(
                "desired v2 refused"), 5, "a report of the refusal")
            assert cloud.reports[-1][1]["applied_version"] == 1
            assert agent.supervisor.status().pipeline == "line2"
            # poked again with the same version: not pulled again
            cloud.set_desired("node-1", DesiredState(2, {"line3": bad}))
            await asyncio.sleep(0.3)
            assert cloud.counts["desired_get"] == gets + 1

            # v3: expired before it arrives: refused, nothing applied
            cloud.set_desired("node-1", DesiredState(3, {"x": LIVE.format(name="x")},
                                                     expires_at=time.time() - 60))
            await wait_for(lambda: 3 in agent.twin.refused, 5, "v3 refused")
            assert "v3 expired at" in agent.twin.refused[3]
            # two pipelines for one node: refused with the reason
            cloud.set_desired("node-1", DesiredState(4, {"a": LIVE.format(name="a"),
                                                         "b": LIVE.format(name="b")}))
            await wait_for(lambda: 4 in agent.twin.refused, 5, "v4 refused")
            assert "runs one pipeline per node" in agent.twin.refused[4]
            assert load_desired(data / "twin" / "desired.msgpack").version == 1
            assert agent.supervisor.status().pipeline == "line2"
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)

    # restarted with no network (the control plane is gone): runs persisted v1, not --pipeline
    cloud.port = _free_port()
    agent = make_agent(data, cloud, pipeline=pipe)
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.supervisor.state == "running", 10, "the engine")
        before = _produced(agent, "line2-raw")
        await wait_for(lambda: _produced(agent, "line2-raw") > before, 10, "new v1 records")
        assert agent.supervisor.status().pipeline == "line2"
        assert agent.twin is not None and agent.twin.applied_version() == 1
        await wait_for(lambda: agent.uplink is not None and agent.uplink.state == "offline", 5,
                       "the link to be offline")
    finally:
        agent.stop()
        await asyncio.wait_for(task, 10)
