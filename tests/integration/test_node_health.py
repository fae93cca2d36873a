"""The heartbeat's health from a real agent to the real control plane (in this process, over
TLS on 127.0.0.1): the agent's `edge.health` sample arrives, is checked (`sync.health`),
written with the last-seen times and read back as the node's state through the operator
API; malformed health is dropped and counted while the session goes on."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_agent_cloud import PIPELINE
from test_agent_fakecloud import wait_for
from test_agent_session import make_agent

from edgewise.cloud.app import start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.state import SESSIONS
from edgewise.cloud.store import Store
from edgewise.security.tokens import EnrolmentToken

pytestmark = pytest.mark.timeout(120)


@dataclass
class Where:
    url: str
    ca_path: Path


async def test_agent_health_reaches_the_control_plane(tmp_path: Path) -> None:
    pipeline = tmp_path / "line.yaml"
    pipeline.write_text(PIPELINE.replace("limit: 4000", "limit: 400000"))
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, maintenance_interval=0.3)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        plain, record = EnrolmentToken.issue({"site": "p1"}, timedelta(hours=1), 1)
        await store.add_enrolment_token(record)
        agent = make_agent(tmp_path / "node", Where(running.url, boot.ca_path),  # type: ignore[arg-type]
                           token=plain.get_secret_value(), pipeline=pipeline,
                           heartbeat_s=0.2)
        task = asyncio.create_task(agent.run())
        rows: list[Any] = []

        async def health_in_store() -> bool:
            rows[:] = await store.fleet_page()
            h = rows[0].health if rows else None
            return bool(h and h.get("pipelines", {}).get("line", [None])[0] == "running"
                        and "9" in h.get("outbox", {}))

        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 60
            while not await health_in_store():
                assert loop.time() < end, f"no health in the store: {rows}"
                await asyncio.sleep(0.1)
            h = rows[0].health
            assert set(h) == {"cpu", "mem", "disk_free", "disk_total", "outbox", "pipelines",
                              "cert_expires", "clock_offset_s"}
            assert h["pipelines"] == {"line": ["running", None]}
            assert set(h["outbox"]) == {"5", "9"}  # raw (normal) and alarms
            assert 0 < h["disk_free"] <= h["disk_total"] and h["mem"] > 10 * 2**20
            assert abs(h["clock_offset_s"]) < 5  # one clock on this machine
            node = rows[0].node
            assert abs(h["cert_expires"] - node.cert_expiry.timestamp()) < 1
            ctx = ssl.create_default_context(cafile=str(boot.ca_path))
            async with httpx.AsyncClient(base_url=running.url, verify=ctx, timeout=10) as http:
                for _ in range(100):  # the session's "online" is a group write of its own,
                    r = await http.get(  # which may land after the first health
                        "/v1/fleet/nodes", params={"state": "online"},
                        headers={"Authorization": f"Bearer {boot.admin_token}"})
                    if r.json()["nodes"]:
                        break
                    await asyncio.sleep(0.2)
            assert [(n["id"], n["state"], n["reasons"]) for n in r.json()["nodes"]] == [
                (node.id, "online", [])]
            # malformed health: dropped and counted, the session and the heartbeat go on
            registry = running.app[SESSIONS]
            registry.node_health(node.id, {"t": "heartbeat", "ts": 1.0,
                                           "health": {"outbox": {"x": [1, 2]}}})
            assert registry.health_refused == 1
        finally:
            agent.stop()
            await asyncio.wait_for(task, 30)
            await running.stop()
    await wait_for(lambda: task.done(), 1, "the agent to stop")
