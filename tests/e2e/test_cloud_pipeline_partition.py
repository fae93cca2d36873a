"""One node cut off for 60 s while a cloud pipeline merges three nodes' streams (real control
plane, three real agents, each behind its own link proxy): the other nodes' fleet windows keep
being stored during the cut (after ``max_wait`` and the window's allowed lateness); when the
link is back, the cut node's backlog arrives and each of its records is either merged into a
window still open or goes to the late stream - for every window the three nodes fully
produced, the records counted in the window plus those routed late are exactly all of them.
Long suite (EDGEWISE_LONG_TESTS=1): about two minutes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from conftest import LONG_ONLY
from edgewise.cloud.pipelines.models import CloudPipelineSet, CloudPipelineSetResponse
from edgewise.testbed.system import System

SENSORS, RATE, SIZE = 5, 2.0, 5.0
EDGE = f"""\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {{name: raw}}
spec:
  sources:
    - {{id: sim, type: simulator, profile: custom, rate_hz: {RATE}, seed: 3,
       groups: [{{prefix: s, count: {SENSORS}}}]}}
  sinks:
    - {{id: raw, type: outbox, inputs: [sim], stream: raw}}
"""
CLOUD = f"""\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {{name: fleet}}
spec:
  sources:
    - {{id: raw, type: stream, stream: raw, nodes: {{site: farm}}, max_wait: 5s, poll: 0.2}}
  stages:
    - {{id: total, type: window, inputs: [raw], size: {SIZE}s, key_by: [],
       allowed_lateness: 10s, idle_timeout: 100000s, aggregates: [count]}}
  sinks:
    - {{id: total-store, type: outbox, inputs: [total], stream: total}}
    - {{id: late-store, type: outbox, inputs: [total.late], stream: late}}
"""


def records(op: Any, stream: str) -> dict[str, np.ndarray]:
    out: dict[str, list[Any]] = {}
    seq = 0
    while True:
        page = op.data_query("cloud:fleet", stream, from_seq=seq, limit=10_000)
        for r in page.records:
            for k, v in r.data.items():
                out.setdefault(k, []).append(v)
        if page.next_seq is None:
            return {k: np.array(v) for k, v in out.items()}
        seq = page.next_seq


@LONG_ONLY
async def test_one_node_cut_off_for_60_s(tmp_path: Path) -> None:
    edge = tmp_path / "edge.yaml"
    edge.write_text(EDGE)
    async with System(tmp_path / "sys") as system:
        cloud = await system.start_cloud()
        token = await cloud.token({"site": "farm"}, uses=3)
        agents = [await system.add_agent(f"a{i}", edge, token) for i in range(3)]
        op = cloud.operator()
        res = await asyncio.to_thread(op.call, "PUT", "/v1/cloud/pipelines/fleet",
                                      CloudPipelineSetResponse, body=CloudPipelineSet(text=CLOUD))
        assert res.version == 1

        async def windows() -> int:
            try:
                return len((await asyncio.to_thread(records, op, "total")).get("ts", []))
            except Exception:  # no results yet
                return 0

        deadline = time.monotonic() + 90
        while await windows() < 3:
            assert time.monotonic() < deadline, cloud.child.log_tail(30)
            await asyncio.sleep(1)
        cut_node = agents[2].node_id
        assert agents[2].link is not None
        agents[2].link.cut()
        before = await windows()
        await asyncio.sleep(60)
        during = await windows()
        # 60 s of 5 s windows; the first ones wait max_wait and the lateness: at least 6 more
        assert during - before >= 6, (before, during)
        agents[2].link.restore()
        deadline = time.monotonic() + 120
        while True:
            late = await asyncio.to_thread(records, op, "late")
            if len(late.get("ts", [])) and time.monotonic() > deadline - 90:
                break
            assert time.monotonic() < deadline, cloud.child.log_tail(30)
            await asyncio.sleep(2)
        total = await asyncio.to_thread(records, op, "total")
        late = await asyncio.to_thread(records, op, "late")
    assert set(late["node"].tolist()) == {cut_node}  # only the cut node's records came late
    late_w = np.floor(late["ts"] / SIZE) * SIZE
    starts = total["window_start"]
    full = SENSORS * RATE * SIZE * 3
    # windows every node produced in full: from the first one all three filled (the agents
    # start one after another) to half a minute before the end
    first_full = starts[total["count"] == full].min()
    inner = starts[(starts >= first_full) & (starts <= starts.max() - 30)]
    assert len(inner) >= 12
    for w in inner:
        counted = int(total["count"][starts == w][0])
        routed_late = int((late_w == w).sum())
        assert counted + routed_late == full, (w, counted, routed_late)
    assert len(set(starts.tolist())) == len(starts)  # each window once
