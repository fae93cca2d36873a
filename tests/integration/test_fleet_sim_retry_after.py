"""The fleet simulator's virtual nodes wait out a 429's ``Retry-After`` as the agent does
(issue 11): a control plane under an enrolment storm tells each node when to come back, and a
node that retried after its own short backoff instead would only add to the storm. Against the
fake control plane of the agent's tests (real TLS, real HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_agent_fakecloud import FakeCloud

from edgewise.common.backoff import Backoff
from edgewise.edge.uplink import UplinkConfig
from edgewise.testbed.fleet import NodeSettings, Recorder, VirtualNode
from edgewise.testbed.fleet.node import Shared


async def test_a_virtual_node_waits_out_retry_after_before_enrolling_again(
        tmp_path: Path) -> None:
    async with FakeCloud(tmp_path) as cloud:
        cloud.enrol_busy = ["2", "3"]
        settings = NodeSettings(cloud.url, cloud.ca_path, cloud.token(),
                                uplink=UplinkConfig(backoff=Backoff(0.05, 0.2)))
        shared = Shared(settings, tmp_path / "sim", Recorder())
        try:
            node = VirtualNode(0, shared)
            await asyncio.wait_for(node.enrol(), 60)
        finally:
            await shared.close()
    first, second, third = cloud.enrol_times
    # its own backoff would have retried after at most 0.2 s
    assert second - first >= 2.0 and third - second >= 3.0
    assert cloud.counts["enrol"] == 1 and node.node_id is not None
    assert shared.recorder.counts["enrol_retries"] == 2
