"""The agent against the real control plane: `edgewise cloud serve` as a subprocess on
127.0.0.1, a token from `edgewise cloud token create`, the agent in this process running a
pipeline. The control plane is stopped mid-stream and started again (a new desired state is
stored while it is down); afterwards every record is in the cloud store exactly once, and the
agent runs the new pipeline and reports it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from test_agent_desired import LIVE
from test_agent_fakecloud import wait_for
from test_agent_session import _free_port, make_agent

from edgewise.cloud.store import Store
from edgewise.cloud.store.store import database_url
from edgewise.edge.status import outbox_path
from edgewise.outbox import Outbox
from edgewise.outbox.view import OutboxView

pytestmark = pytest.mark.timeout(90)

PIPELINE = """\
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
      limit: 4000
      groups:
        - {prefix: "line1/temp", count: 10, spike_prob: 0.01}
  stages:
    - id: alarms
      type: threshold
      inputs: [sensors]
      field: value
      high: 100.0
  sinks:
    - id: raw-out
      type: outbox
      inputs: [sensors]
      stream: raw
      priority: normal
    - id: alarms-out
      type: outbox
      inputs: [alarms]
      stream: alarms
      priority: alarm
  outbox:
    sync: normal
"""


class CloudProcess:
    def __init__(self, data: Path, port: int) -> None:
        self.data, self.port = data, port
        self.proc: asyncio.subprocess.Process | None = None
        self.ca_path: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgewise.cli", "cloud", "serve", "--data", str(self.data),
            "--port", str(self.port),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        lines = []
        while True:
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 30)).decode()
            if not line:
                raise AssertionError("cloud serve exited:\n" + "".join(lines))
            lines.append(line)
            m = re.search(r"CA certificate for agents(?: \(--ca\))?: (\S+)", line)
            if m:
                self.ca_path = Path(m.group(1))
            if "control plane listening on" in line:
                break
        # keep draining stderr so the server never blocks on a full pipe
        self._drain = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.readline():
            pass

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain, 5)

    async def token(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgewise.cli", "cloud", "token", "create", "--data",
            str(self.data), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return out.decode().splitlines()[0].strip()


def outbox_stats(data: Path) -> dict[str, tuple[int, int, int]]:
    with Outbox(outbox_path(data)) as ob:
        return {k: (v.produced, v.acked, v.pending_records) for k, v in ob.stats().items()}


def drained(data: Path) -> bool:
    with OutboxView(outbox_path(data)) as view:
        snap = view.snapshot()
    return bool(snap.streams) and not snap.chunks and all(
        r.produced == r.acked for r in snap.streams.values())


async def test_agent_with_the_real_control_plane_restarted_mid_stream(tmp_path: Path) -> None:
    cloud = CloudProcess(tmp_path / "cloud", _free_port())
    await cloud.start()
    data = tmp_path / "node"
    pipe = tmp_path / "line.yaml"
    pipe.write_text(PIPELINE)
    agent = None
    task = None
    try:
        token = await cloud.token()
        assert cloud.ca_path is not None
        agent = make_agent(data, cloud, token=token, pipeline=pipe, report_s=0.3)  # type: ignore[arg-type]
        task = asyncio.create_task(agent.run())
        await wait_for(lambda: agent.uplink is not None and agent.uplink.state == "connected",
                       20, "the first session")
        node_id = agent.identity.node_id
        assert node_id is not None
        await asyncio.sleep(0.5)  # some records acknowledged, more being produced

        await cloud.stop()  # the control plane goes away mid-stream
        await wait_for(lambda: agent.uplink.state == "offline", 10, "the link to drop")
        async with Store(database_url(None, cloud.data)) as store:  # next intent, stored offline
            await store.put_desired_state(node_id, pipelines={"line2": LIVE.format(
                name="line2")}, actor="test")
        await wait_for(lambda: agent.supervisor.state == "finished", 30, "the pipeline to end")
        produced = outbox_stats(data)

        await cloud.start()
        await wait_for(lambda: drained(data), 30, "the backlog to drain")
        await wait_for(lambda: agent.twin is not None and agent.twin.applied_version() == 1, 10,
                       "desired v1 to be applied")
        await wait_for(lambda: agent.supervisor.state == "running", 10, "line2 to run")
        assert agent.supervisor.status().pipeline == "line2"
        await asyncio.sleep(1.0)  # reports go up
    finally:
        if agent is not None and task is not None:
            agent.stop()
            await asyncio.wait_for(task, 15)
        await cloud.stop()

    assert agent.uplink.sessions >= 2
    final = outbox_stats(data)
    async with Store(database_url(None, cloud.data)) as store:
        stats = {s.stream: s for s in await store.stream_stats(node_id)}
        reported = await store.get_reported_state(node_id)
    for stream in ("raw", "alarms"):
        made = produced[stream][0]
        assert made == final[stream][0] == final[stream][1]  # nothing new, all acknowledged
        assert stats[stream].stored_records == made, stream  # exactly once in the store
        assert stats[stream].contiguous == made and stats[stream].gap_records == 0
    assert produced["raw"][0] == 4000
    assert reported is not None and reported.state.applied_version == 1
