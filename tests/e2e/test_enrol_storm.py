"""An enrolment storm beside ingest must not starve the store (issue 11).

On SQLite the store has one write connection. Before enrolments were grouped, each enrolment
was its own write transaction: hundreds at once queued for that connection ahead of the group
commit and the node writes, and a waiter gave up after ``store_wait`` (SQLAlchemy's pool
timeout, 30 s by default: "QueuePool limit of size 1 overflow 0 reached"): enrolments got 503
and the group commit failed. Here the wait is 3 s, so the storm needed to show it is small
(the code before: 126 of the 300 enrolments answered 503 with 3 s, 257 with 1 s):
a real ``edgewise cloud serve`` (SQLite), 10 virtual nodes of ``edgewise sim fleet`` sending a
batch every 0.5 s, and 300 enrolments at once (the enrolment pacer opened wide, so they all
reach the store). Every enrolment must end 201 (a 429 is retried after its ``Retry-After``),
none may get 503, the server log must not hold a pool timeout or a failed group commit, and
the simulator must find every record it sent stored once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.security.pki import make_csr
from edgewise.security.tls import client_context
from edgewise.testbed.system import CLI, ChildProcess, ControlPlane, free_port

STORM = 300
SIM_NODES = 10


async def _enrol_all(url: str, ca: Path, token: str) -> tuple[dict[int, int], int, list[str]]:
    """Enrol STORM keys at once, each on its own connection; a 429 waits its Retry-After and
    tries again. (final status per key, 429s seen, Retry-After values that were missing)."""
    csrs = [make_csr(ec.generate_private_key(ec.SECP256R1())).decode() for _ in range(STORM)]
    final: dict[int, int] = {}
    busy = 0
    missing: list[str] = []
    connector = aiohttp.TCPConnector(ssl=client_context(ca), limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one(i: int) -> None:
            nonlocal busy
            for _ in range(60):
                async with http.post(f"{url}/v1/device/enrol",
                                     json={"token": token, "csr": csrs[i]}) as r:
                    await r.read()
                    if r.status != 429:
                        final[i] = r.status
                        return
                    busy += 1
                    after = r.headers.get("Retry-After")
                    if after is None:
                        missing.append(str(i))
                        after = "1"
                await asyncio.sleep(float(after))
            final[i] = 429

        await asyncio.gather(*(one(i) for i in range(STORM)))
    return final, busy, missing


async def test_an_enrolment_storm_beside_ingest_never_times_out_a_store_wait(
        tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    cloud = ControlPlane(tmp_path / "cloud", free_port(), logs, extra_args=[
        "--limit", "store_wait=3", "--limit", "enrol_rate=10000", "--limit", "enrol_burst=10000",
        "--limit", "handshake_rate=10000", "--limit", "handshake_burst=10000",
        "--limit", "max_unauthenticated=2048"])
    sim: ChildProcess | None = None
    try:
        await cloud.start()
        token = await cloud.token({"fleet": "storm"}, uses=STORM + SIM_NODES)
        sim = ChildProcess("sim", [
            *CLI, "sim", "fleet", "--nodes", str(SIM_NODES), "--cloud", cloud.url,
            "--token", token, "--ca", str(cloud.ca), "--duration", "600",
            "--telemetry-every", "0.5", "--drain", "30", "--config", str(cloud.cli_config),
            "--state", str(tmp_path / "sim"), "--json"], logs / "sim.log")
        sim.start()
        deadline = time.monotonic() + 120
        connected = 0
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_context(cloud.ca))) as http:
            while time.monotonic() < deadline:  # the simulated nodes are up and sending
                async with http.get(f"{cloud.url}/healthz") as r:
                    connected = (await r.json())["sessions"]
                if connected == SIM_NODES:
                    break
                await asyncio.sleep(0.2)
        assert connected == SIM_NODES, sim.log_tail()
        await asyncio.sleep(2.0)  # a few group commits before the storm

        final, busy, missing = await _enrol_all(cloud.url, cloud.ca, token)

        sim.signal(signal.SIGTERM)  # drain, then check every seq against the store
        assert await sim.wait(180) == 0, sim.log_tail()
        summary: dict[str, Any] = json.loads(
            (logs / "sim.log").read_text().strip().splitlines()[-1])
    finally:
        if sim is not None and sim.running:
            sim.kill()
        await cloud.stop()
        cloud.close()
    server_log = (logs / "cloud.log").read_text()
    statuses = sorted(set(final.values()))
    assert (len(final), statuses, missing) == (STORM, [201], []), (
        {s: list(final.values()).count(s) for s in statuses}, busy)
    assert server_log.count("QueuePool limit") == 0, server_log[-3000:]
    assert server_log.count("group commit of") == 0, server_log[-3000:]
    assert (summary["records_lost"], summary["records_duplicated"],
            summary["records_unexpected"], summary["records_unacked"]) == (0, 0, 0, 0)
    assert summary["records_acked"] == summary["records_produced"] > 0
