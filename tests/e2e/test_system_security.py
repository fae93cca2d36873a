"""Security and bad input against the real processes: ``edgewise cloud serve`` with two agents
that enrolled and uploaded data through ``edgewise agent run``, then the agents' own key and
certificate used the wrong way.

What the in-process tests (tests/integration/test_cloud_device_api.py, test_tls_handshake.py,
test_operator_cli.py) already cover is not repeated; here: node A's identity cannot reach node
B's anything through any route, a used or expired enrolment token is refused by the real agent
CLI, a viewer token cannot change config or revoke through the real CLI, and garbage on the raw
socket, on TLS and on a live session closes it, refuses what is malformed, stores nothing twice
and leaves the server's memory bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from edgewise.cloud import openapi as oa
from edgewise.security.tls import client_context
from edgewise.sync import protocol
from edgewise.testbed.system import AgentProcess, ControlPlane, System, factory_pipeline

CLI = [sys.executable, "-m", "edgewise.cli"]
TIMEOUT = aiohttp.ClientTimeout(total=15)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@dataclass
class Fleet:
    system: System
    cloud: ControlPlane
    a: AgentProcess
    b: AgentProcess
    tmp: Path

    def identity(self, agent: AgentProcess) -> ssl.SSLContext:
        d = agent.data_dir / "identity"
        return client_context(self.cloud.ca, d / "node.pem", d / "node.key")

    def http(self, agent: AgentProcess | None) -> aiohttp.ClientSession:
        ctx = self.identity(agent) if agent else client_context(self.cloud.ca)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=TIMEOUT)

    def stats(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {(s.node, s.stream): (s.records_stored, s.contiguous_mark)
                for s in self.cloud.operator().data_stats().streams}

    def rss_kb(self) -> int:
        pid = self.cloud.child.pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    tmp = tmp_path_factory.mktemp("security")
    async with System(tmp) as system:
        # the garbage test opens 200+ sessions with node A's certificate in a few seconds, far
        # over the per-node request rate (tested in test_cloud_hardening.py): lift it here
        cloud = await system.start_cloud(extra_args=["--limit", "device_rate=1000",
                                                     "--limit", "device_burst=1000"])
        text, _ = factory_pipeline(20_000)  # 2 s of the factory line
        (tmp / "p.yaml").write_text(text)
        tokens = await asyncio.gather(cloud.token({"node": "a"}), cloud.token({"node": "b"}))
        a = await system.add_agent("a", tmp / "p.yaml", tokens[0], proxy=False)
        b = await system.add_agent("b", tmp / "p.yaml", tokens[1], proxy=False)

        def drained(x: AgentProcess) -> bool:
            st = x.status()
            return st.engine is not None and st.engine.state == "finished" and bool(
                st.streams) and all(s.pending == 0 for s in st.streams.values())

        deadline = time.monotonic() + 60
        while not (drained(a) and drained(b)):
            assert time.monotonic() < deadline, (a.status(), b.status())
            await asyncio.sleep(0.2)
        assert await asyncio.gather(a.stop(), b.stop()) == [0, 0]
        op = cloud.operator()
        for x in (a, b):  # something of each node's own to ask for
            op.set_config(oa.ConfigSetRequest(node=x.node_id, config={"owner": x.name}))
        yield Fleet(system, cloud, a, b, tmp)


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_node_a_cannot_reach_node_b(fleet: Fleet) -> None:
    a_id, b_id = fleet.a.node_id, fleet.b.node_id
    assert a_id and b_id and a_id != b_id
    url = fleet.cloud.url
    before = fleet.stats()
    async with fleet.http(fleet.a) as http:
        # the device API takes the node only from the certificate: B's id anywhere is ignored
        for params in ({"node": b_id}, {"node_id": b_id}, {"version": "1", "node": b_id}):
            r = await http.get(f"{url}/v1/device/desired", params=params,
                               headers={"X-Node-Id": b_id, "X-Forwarded-Client-Cert": b_id})
            body = await r.json()
            assert (r.status, body["desired"]["config"]) == (200, {"owner": "a"}), body
        attempts = [
            ("GET", f"/v1/device/desired/{b_id}", None),
            ("GET", f"/v1/device/{b_id}/desired", None),
            ("POST", f"/v1/device/renew/{b_id}", {}),
            ("GET", f"/v1/nodes/{b_id}", None),
            ("GET", "/v1/config", None),
            ("GET", "/v1/data/stats", None),
            ("GET", "/v1/data/query", None),
            ("PATCH", f"/v1/nodes/{b_id}/labels", {"set": {"owner": "a"}}),
            ("PUT", "/v1/config", {"node": b_id, "config": {"owner": "a"}}),
            ("POST", f"/v1/nodes/{b_id}/revoke", {"reason": "a"}),
            ("GET", "/v1/audit", None),
        ]
        for method, path, body in attempts:
            params = {"node": b_id, "stream": "alarms"} if method == "GET" else None
            r = await http.request(method, f"{url}{path}", json=body, params=params)
            text = await r.text()
            assert r.status in (401, 403, 404, 405), (method, path, r.status, text)
            assert b_id not in text, (method, path, text)
            assert '"records"' not in text and "owner" not in text
        # a session opened with A's certificate is A's: the welcome names A's streams only,
        # and a batch for B's stream lands under A (there is no node field to forge)
        ws = await http.ws_connect(f"{url}{protocol.SESSION_PATH}")
        await ws.send_bytes(protocol.encode({"t": "hello", "agent": "x/1", "node": b_id,
                                             "streams": {"alarms": 9}, "applied_version": 0}))
        welcome = protocol.decode((await ws.receive(timeout=5)).data)
        assert welcome["t"] == "welcome" and b_id not in json.dumps(welcome, default=str)
        assert welcome["streams"]["alarms"] == before[(a_id, "alarms")][1]
        await ws.close()
    assert fleet.stats() == before


async def test_used_or_expired_enrolment_token_refused_by_the_agent_cli(fleet: Fleet) -> None:
    token = await fleet.cloud.token({"node": "c"})
    pipeline = str(fleet.tmp / "p.yaml")
    common = ["--cloud", fleet.cloud.url, "--ca", str(fleet.cloud.ca), "--pipeline", pipeline]
    # first use: enrols (the agent is stopped once it has its certificate)
    first = AgentProcess("c", fleet.tmp / "c", fleet.tmp / "logs", fleet.tmp / "p.yaml",
                         fleet.cloud, None)
    first.start(token)
    try:
        deadline = time.monotonic() + 30
        while first.node_id is None or not (fleet.tmp / "c/identity/node.pem").exists():
            assert time.monotonic() < deadline and first.running, first.child and \
                first.child.log_tail()
            await asyncio.sleep(0.1)
    finally:
        assert await first.stop() == 0
    # the same token again, through the environment as documented: refused, exit 2
    res = cli("agent", "run", "--data", str(fleet.tmp / "d"), *common,
              env={"EDGEWISE_ENROL_TOKEN": token})
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "enrolment token" in res.stderr and "refused" in res.stderr, res.stderr
    assert token not in res.stderr + res.stdout  # the secret is never echoed
    assert not (fleet.tmp / "d/identity/node.pem").exists()
    # an expired token: refused the same way
    expired = await fleet.cloud.token({"node": "e"}, ttl="1s")
    await asyncio.sleep(1.5)
    res = cli("agent", "run", "--data", str(fleet.tmp / "e"), *common, "--token", expired)
    assert res.returncode == 2 and "refused" in res.stderr, (res.stdout, res.stderr)
    assert not (fleet.tmp / "e/identity/node.pem").exists()
    nodes = {n.id for n in fleet.cloud.operator().list_nodes()}
    assert nodes == {fleet.a.node_id, fleet.b.node_id, first.node_id}


async def test_viewer_token_cannot_mutate_through_the_cli(fleet: Fleet) -> None:
    op = fleet.cloud.operator()
    viewer = op.create_operator_token("e2e-viewer", "viewer").token
    cfg = json.loads(fleet.cloud.cli_config.read_text())
    path = fleet.tmp / "viewer.json"
    path.write_text(json.dumps({**cfg, "token": viewer}))
    a_id = fleet.a.node_id
    assert a_id is not None
    version = op.get_config(a_id).desired.version
    ok = cli("config", "get", "--node", a_id, "--config", str(path), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["node"] == a_id
    for args in (["config", "set", "--node", a_id, "--set", "owner=viewer"],
                 ["node", "revoke", a_id, "--yes", "--reason", "viewer"],
                 ["node", "label", a_id, "owner=viewer"]):
        res = cli(*args, "--config", str(path))
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "role viewer" in res.stderr and "needs role" in res.stderr, res.stderr
    node = op.get_node(a_id)
    assert op.get_config(a_id).desired.version == version
    assert node.status != "revoked" and node.labels.get("owner") is None
    denied = [e for e in op.audit(limit=50).entries if e.action == "denied"]
    assert len(denied) == 3 and all("e2e-viewer" in e.actor for e in denied)


async def _garbage_session(fleet: Fleet, http: aiohttp.ClientSession, frame: bytes) -> Any:
    ws = await http.ws_connect(f"{fleet.cloud.url}{protocol.SESSION_PATH}",
                               max_msg_size=protocol.MAX_FRAME_BYTES)
    await ws.send_bytes(protocol.encode({"t": "hello", "agent": "x/1", "streams": {},
                                         "applied_version": 0}))
    assert protocol.decode((await ws.receive(timeout=10)).data)["t"] == "welcome"
    await ws.send_bytes(frame)
    msgs = []
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type != aiohttp.WSMsgType.BINARY:
            break
        msgs.append(protocol.decode(msg.data))
    return msgs, ws.close_code


def _raw_garbage(port: int, ctx: ssl.SSLContext | None, data: bytes) -> bytes:
    """Send ``data`` (over TLS if ``ctx``) and read until the server closes; what it said."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock: socket.socket = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        return got


async def test_garbage_and_malformed_batches_close_or_refuse_memory_bounded(
    fleet: Fleet,
) -> None:
    port = fleet.cloud.port
    before = fleet.stats()
    # not TLS at all, and not HTTP inside TLS: the server closes the connection
    assert _raw_garbage(port, None, b"\x16\x03\x01garbage" * 100) == b""
    answer = await asyncio.to_thread(_raw_garbage, port, fleet.identity(fleet.a),
                                     b"\x00\xffNOT HTTP\r\n\r\n" * 10)
    assert answer.startswith((b"HTTP/1.0 400 Bad Request", b"HTTP/1.1 400 Bad Request")), \
        answer[:100]
    async with fleet.http(fleet.a) as http:
        # a malformed batch on a live session: refused (payload), closed (msgpack)
        ws = await http.ws_connect(f"{fleet.cloud.url}{protocol.SESSION_PATH}")
        await ws.send_bytes(protocol.encode({"t": "hello", "agent": "x/1",
                                             "streams": {"alarms": 9}, "applied_version": 0}))
        mark = protocol.decode((await ws.receive(timeout=5)).data)["streams"]["alarms"]
        bad = {"t": "batch", "id": 1, "stream": "alarms", "seq": mark, "count": 3,
               "records": 3, "compacted": False, "payload": b"\x28\xb5\x2f\xfdgarbage"}
        await ws.send_bytes(protocol.encode(bad))
        refuse = protocol.decode((await ws.receive(timeout=5)).data)
        assert refuse["t"] == "refuse" and refuse["id"] == 1, refuse
        # wrong sequence numbers: straddling the stored range
        await ws.send_bytes(protocol.encode({**bad, "id": 2, "seq": mark - 1}))
        refuse = protocol.decode((await ws.receive(timeout=5)).data)
        assert refuse["t"] == "refuse" and refuse["id"] == 2, refuse
        await ws.send_bytes(b"\xc1 not msgpack")
        error = protocol.decode((await ws.receive(timeout=5)).data)
        assert error["t"] == "error" and error["reason"].startswith("malformed frame"), error
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                      aiohttp.WSMsgType.CLOSED)
        # memory: 200 garbage frames on 200 sessions (20 of them over the 4 MiB frame limit)
        for _ in range(10):  # warm up the allocator before the first reading
            await _garbage_session(fleet, http, b"\xc1" * 65536)
        rss_before = fleet.rss_kb()
        codes = []
        for i in range(200):
            frame = b"\x00" * (protocol.MAX_FRAME_BYTES + 1024) if i % 10 == 0 \
                else bytes([0xC1]) + bytes(range(256)) * 256
            msgs, code = await _garbage_session(fleet, http, frame)
            codes.append(code)
            if i % 10:
                assert msgs and msgs[0]["t"] == "error", msgs
        rss_after = fleet.rss_kb()
    assert set(codes) <= {aiohttp.WSCloseCode.POLICY_VIOLATION,
                          aiohttp.WSCloseCode.ABNORMAL_CLOSURE,
                          aiohttp.WSCloseCode.MESSAGE_TOO_BIG}, set(codes)
    grew_mb = (rss_after - rss_before) / 1024
    print(f"\ncloud serve RSS {rss_before / 1024:.1f} MB -> {rss_after / 1024:.1f} MB "
          f"after 200 garbage frames ({grew_mb:+.1f} MB)")
    assert grew_mb < 32, (rss_before, rss_after)
    assert fleet.cloud.child.running
    assert fleet.stats() == before  # nothing stored, nothing stored twice
