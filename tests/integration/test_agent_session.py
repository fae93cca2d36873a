"""The agent against a protocol-speaking control plane over real TLS: enrolment, the session,
acknowledgements, a link cut mid-stream, gaps, priorities (see test_agent_fakecloud.py)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr
from test_agent_fakecloud import FakeCloud, wait_for

from edgewise.common.backoff import Backoff
from edgewise.edge.agent import Agent, AgentConfig
from edgewise.edge.status import outbox_path, read_status
from edgewise.edge.status_model import StreamStatus
from edgewise.edge.uplink import UplinkConfig
from edgewise.outbox import Outbox, PendingChunk
from edgewise.outbox.view import OutboxView

pytestmark = pytest.mark.timeout(60)


def make_agent(data: Path, cloud: FakeCloud, token: str | None = None,
               pipeline: Path | None = None, **uplink: Any) -> Agent:
    return Agent(AgentConfig(
        data_dir=data, cloud=cloud.url, ca=cloud.ca_path,
        token=SecretStr(token) if token else None, pipeline=pipeline,
        uplink=UplinkConfig(backoff=Backoff(0.05, 0.2), tick_s=0.05, **uplink),
        status_interval_s=0.1, engine_restart=Backoff(0.05, 0.2), renew_retry=Backoff(0.05, 0.2),
    ))


def columns(n: int, start: int) -> dict[str, np.ndarray]:
    i = np.arange(start, start + n)
    return {
        "sensor": np.array([f"line1/temp/{k % 7:03d}" for k in i], dtype=object),
        "ts": 1_700_000_000.0 + i * 0.02,
        "value": np.round(50.0 + (i % 100) * 0.25, 2),
    }


def prefill(data: Path, streams: dict[str, tuple[int, int, int]], max_bytes: int = 256 << 20,
            ) -> Outbox:
    """streams: name -> (priority, chunks, records per chunk); commits interleaved by stream.
    Returns the (closed) outbox for its stats."""
    ob = Outbox(outbox_path(data), max_bytes, sync="normal")
    with ob:
        for name, (prio, _, _) in streams.items():
            ob.register_stream(name, prio)
        most = max(c for _, c, _ in streams.values())
        for k in range(most):
            batch = [PendingChunk(name, columns(n, k * n), n)
                     for name, (_, chunks, n) in streams.items() if k < chunks]
            ob.commit(batch)
    return ob


def pending_chunks(data: Path) -> int:
    with OutboxView(outbox_path(data)) as view:
        return len(view.snapshot().chunks)


async def test_enrol_then_session_acks_delete_chunks_alarms_first(tmp_path: Path) -> None:
    data = tmp_path / "node"
    prefill(data, {"alarms": (9, 20, 10), "aggregates": (5, 30, 50)})
    async with FakeCloud(tmp_path) as cloud:
        token = cloud.token()
        agent = make_agent(data, cloud, token=token, window_bytes=8 * 1024)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: pending_chunks(data) == 0, 15, "the outbox to drain")
            await wait_for(lambda: cloud.reports, 5, "a report")
            await asyncio.sleep(0.3)  # a status write while connected
            st = json.loads((data / "status.json").read_text())
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)

        # enrolled once, key private, identity on disk
        assert cloud.counts["enrol"] == 1 and cloud.tokens[token] == 0
        ident = data / "identity"
        assert stat.S_IMODE((ident / "node.key").stat().st_mode) == 0o600
        assert (ident / "node_id").read_text().strip() == "node-1"
        # every sequence number stored exactly once
        for stream, total in (("alarms", 200), ("aggregates", 1500)):
            seqs = cloud.stored_seqs("node-1", stream)
            assert sorted(seqs) == list(range(total))
            assert set(seqs.values()) == {1}
            assert cloud.records[("node-1", stream)] == total
        assert cloud.duplicates == 0
        assert len(cloud.batches) == 50
        # alarms before aggregates on the wire
        kinds = [b[1] for b in cloud.batches]
        assert kinds == ["alarms"] * 20 + ["aggregates"] * 30
        # the hello named the streams with their priorities
        assert cloud.hellos[0]["streams"] == {"alarms": 9, "aggregates": 5}
        assert cloud.hellos[0]["applied_version"] == 0
        # the running agent's status file
        assert st["state"] == "running" and st["node_id"] == "node-1"
        assert st["link"]["state"] == "connected"
        assert st["uplink"]["chunks_acked"] == 50 and st["uplink"]["records_acked"] == 1700
        assert st["bytes"]["ws_sent"] > 0
        if st["bytes"]["wire_sent"] is not None:  # Linux TCP_INFO: TLS and framing included
            assert st["bytes"]["wire_sent"] > st["bytes"]["ws_sent"]
        # status from the outbox itself, with the agent stopped
        after = read_status(data)
        assert not after.running and after.state == "stopped"
        assert after.streams["alarms"] == StreamStatus(
            priority=9, produced=200, acknowledged=200, pending=0,
            pending_chunks=0, pending_bytes=0, dropped=0, compacted=0, refused=0,
        )
        assert after.streams["aggregates"].acknowledged == 1500
        assert after.certificate is not None and after.certificate.expires_at

        # a second run needs no token, and sends nothing again
        again = make_agent(data, cloud)
        task = asyncio.create_task(again.run())
        try:
            await wait_for(lambda: cloud.counts["sessions"] == 2, 10, "a second session")
        finally:
            again.stop()
            await asyncio.wait_for(task, 10)
        assert cloud.counts["enrol"] == 1
        assert len(cloud.batches) == 50


async def test_link_cut_mid_stream_then_everything_stored_exactly_once(tmp_path: Path) -> None:
    data = tmp_path / "node"
    prefill(data, {"aggregates": (5, 100, 100)})
    async with FakeCloud(tmp_path) as cloud:
        cloud.abort_after_batches = 10  # the 11th batch kills the TCP connection, unacked
        agent = make_agent(data, cloud, token=cloud.token(), window_bytes=16 * 1024)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: pending_chunks(data) == 0, 20, "the outbox to drain")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        assert cloud.counts["sessions"] == 2
        seqs = cloud.stored_seqs("node-1", "aggregates")
        assert sorted(seqs) == list(range(10_000))
        assert set(seqs.values()) == {1}
        assert cloud.records[("node-1", "aggregates")] == 10_000
        # every batch that arrived was stored once or recognised as a duplicate
        assert len(cloud.batches) == 100 + cloud.duplicates
        assert agent.uplink is not None
        assert agent.uplink.chunks_resent >= 1  # in flight when the link died: sent again
        assert agent.uplink.sessions == 2
        with Outbox(outbox_path(data)) as ob:
            st = ob.stats()["aggregates"]
        assert (st.produced, st.acked, st.pending_records) == (10_000, 10_000, 0)


async def test_dropped_records_are_reported_as_gaps_once(tmp_path: Path) -> None:
    data = tmp_path / "node"
    # a small outbox (bytes on disk): the oldest chunks are dropped to make room for the newest
    ob = prefill(data, {"raw": (1, 40, 200)}, max_bytes=122_000)
    dropped = ob.stats()["raw"].dropped
    assert 0 < dropped < 8000
    async with FakeCloud(tmp_path) as cloud:
        agent = make_agent(data, cloud, token=cloud.token())
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: pending_chunks(data) == 0, 15, "the outbox to drain")
            await wait_for(lambda: cloud.mark("node-1", "raw") == 8000, 5, "the mark to move")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        gap_seqs = [s for g in cloud.gap_msgs for s in range(g["seq"], g["seq"] + g["count"])]
        assert len(gap_seqs) == len(set(gap_seqs)) == dropped  # reported once
        stored = set(cloud.stored_seqs("node-1", "raw"))
        assert stored.isdisjoint(gap_seqs)
        assert len(stored) + dropped == 8000
        assert all(g["reason"] == "dropped: outbox full" for g in cloud.gap_msgs)


async def test_refused_chunk_is_not_sent_again_and_is_counted(tmp_path: Path) -> None:
    data = tmp_path / "node"
    prefill(data, {"alarms": (9, 5, 10)})
    async with FakeCloud(tmp_path) as cloud:
        cloud.refuse_ids = {3}
        agent = make_agent(data, cloud, token=cloud.token())
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: pending_chunks(data) == 1, 10, "four chunks acked")
            await wait_for(lambda: agent.uplink is not None and agent.uplink.refused, 5,
                           "the refusal")
            await asyncio.sleep(0.3)
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        assert [b[4] for b in cloud.batches].count(3) == 1
        st = read_status(data)
        assert st.streams["alarms"].refused == 10
        assert st.streams["alarms"].pending == 10
        assert st.uplink is not None
        assert st.uplink.refused["alarms"].last_reason == "refused by the test"
        # a restart does not send it again either
        again = make_agent(data, cloud)
        task = asyncio.create_task(again.run())
        try:
            await wait_for(lambda: cloud.counts["sessions"] == 2, 10, "a second session")
            await asyncio.sleep(0.3)
        finally:
            again.stop()
            await asyncio.wait_for(task, 10)
        assert [b[4] for b in cloud.batches].count(3) == 1


async def test_unreachable_cloud_backs_off_and_pipeline_still_runs(tmp_path: Path) -> None:
    data = tmp_path / "node"
    pipe = tmp_path / "p.yaml"
    pipe.write_text(SIM_PIPELINE.format(limit=3000))
    cloud = FakeCloud(tmp_path)  # never started: nothing listens on its port
    cloud.port = _free_port()
    agent = make_agent(data, cloud, token="ewe_" + "x" * 43, pipeline=pipe)
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: _produced(agent, "raw") == 3000, 15,
                       "the pipeline to run offline")
        await wait_for(lambda: agent.uplink is not None and agent.uplink.attempts >= 3, 5,
                       "reconnect attempts")
        st = agent.status()
    finally:
        agent.stop()
        await asyncio.wait_for(task, 10)
    assert st.link is not None and st.link.state == "offline"
    assert st.link.last_error == (
        f"POST /v1/device/enrol: cannot connect to 127.0.0.1:{cloud.port}: Connect call failed "
        f"('127.0.0.1', {cloud.port})")
    assert st.node_id is None  # never enrolled
    assert st.engine is not None and st.engine.pipeline == "sim"


async def test_a_busy_enrolment_is_retried_after_the_retry_after_it_was_given(
        tmp_path: Path) -> None:
    """A control plane under a reconnect storm answers enrolments with 429 and Retry-After;
    the agent waits at least that long (its own backoff here is 0.05-0.2 s), then enrols."""
    async with FakeCloud(tmp_path) as cloud:
        cloud.enrol_busy = ["2", "3"]
        agent = make_agent(tmp_path / "node", cloud, token=cloud.token())
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.status().node_id is not None, 30, "enrolment")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
    first, second, third = cloud.enrol_times
    assert second - first >= 2.0 and third - second >= 3.0
    assert cloud.counts["enrol"] == 1


def _produced(agent: Agent, stream: str) -> int:
    st = agent.outbox.stats().get(stream)
    return st.produced if st is not None else -1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIM_PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata:
  name: sim
spec:
  sources:
    - id: sensors
      type: simulator
      profile: custom
      realtime: false
      limit: {limit}
      rate_hz: 100
      groups:
        - {{prefix: "line1/temp", count: 10, spike_prob: 0.01}}
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


@pytest.mark.parametrize("answer", ["silent", "drip"])
async def test_an_upgrade_answer_that_never_ends_is_given_up_and_retried(
        tmp_path: Path, answer: str) -> None:
    """A control plane (or a proxy before it) that takes the session upgrade and never finishes
    its answer, silent or a header line every 50 ms, does not hold the uplink: it gives up
    after ``upgrade_timeout_s`` and tries again (before, it waited for ever in one attempt)."""
    data = tmp_path / "node"
    async with FakeCloud(tmp_path) as cloud:
        cloud.upgrade_answer = answer
        agent = make_agent(data, cloud, token=cloud.token(), upgrade_timeout_s=0.5)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: cloud.counts["sessions"] >= 3, 30, "three upgrade attempts")
            st = agent.status()
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
    assert cloud.counts["enrol"] == 1
    assert st.link is not None and st.link.state == "offline"
    assert st.link.last_error == "no answer to the session upgrade within 0.5 s"
