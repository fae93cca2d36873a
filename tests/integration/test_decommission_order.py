"""Decommissioning against the real control plane app in process (real TLS, real store): who is
told to wipe, and how. Each case would pass a wipe order, or none, the wrong way without its
check: a plain revocation carries no order; the order reaches only a request that proves the
node's registered key (the TLS handshake, or re-authentication's signed nonce, with a
certificate expired for any time); a stolen certificate without the key learns nothing.
The processes end to end: tests/e2e/test_decommission.py."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.state import decommission_node, revoke_node
from edgewise.cloud.store import Store
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import protocol

pytestmark = pytest.mark.asyncio
TIMEOUT = aiohttp.ClientTimeout(total=10)
HEADER = protocol.DECOMMISSIONED_HEADER


@dataclass
class Node:
    id: str
    key: ec.EllipticCurvePrivateKey
    key_path: Path
    cert_path: Path


@dataclass
class Cloud:
    dir: Path
    running: Running
    store: Store
    ca: CertificateAuthority

    @property
    def url(self) -> str:
        return self.running.url

    def client(self, node: Node | None = None) -> aiohttp.ClientSession:
        files = (node.cert_path, node.key_path) if node else (None, None)
        ctx = client_context(self.dir / "pki" / "ca.pem", *files)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=TIMEOUT)

    async def enrol(self, name: str) -> Node:
        plain, record = EnrolmentToken.issue({"n": name}, timedelta(hours=1), 1)
        await self.store.add_enrolment_token(record)
        key_path = self.dir / f"{name}.key"
        key = pki.generate_key(key_path)
        async with self.client() as http:
            r = await http.post(f"{self.url}/v1/device/enrol", json={
                "token": plain.get_secret_value(), "csr": pki.make_csr(key).decode()})
            assert r.status == 201, await r.text()
            body = await r.json()
        cert_path = self.dir / f"{name}.pem"
        cert_path.write_text(body["certificate"])
        return Node(body["node_id"], key, key_path, cert_path)

    def old_cert(self, node: Node, days_ago: float) -> str:
        """A certificate of the node's key that expired ``days_ago`` (about) days ago."""
        return self.ca.sign_node_csr(pki.make_csr(node.key), node.id, timedelta(hours=1),
                                     now=datetime.now(UTC) - timedelta(days=days_ago)
                                     ).pem.decode()


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield Cloud(config.data_dir, running, store, boot.ca)
        finally:
            await running.stop()


async def mtls(cloud: Cloud, node: Node) -> list[tuple[int, str | None]]:
    """(status, order header) of desired, renew and the session upgrade with the node's
    certificate."""
    out = []
    async with cloud.client(node) as http:
        r = await http.get(f"{cloud.url}/v1/device/desired")
        out.append((r.status, r.headers.get(HEADER)))
        r = await http.post(f"{cloud.url}/v1/device/renew",
                            json={"csr": pki.make_csr(node.key).decode()})
        out.append((r.status, r.headers.get(HEADER)))
        try:
            ws = await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
            await ws.close()
            out.append((101, None))
        except aiohttp.WSServerHandshakeError as exc:
            out.append((exc.status, (exc.headers or {}).get(HEADER)))
    return out


async def reauth(cloud: Cloud, node: Node, cert: str, sign_with: ec.EllipticCurvePrivateKey
                 ) -> tuple[int, str | None, dict[str, Any]]:
    async with cloud.client() as http:
        r = await http.post(f"{cloud.url}/v1/device/reauth/challenge", json={"node_id": node.id})
        nonce = base64.b64decode((await r.json())["nonce"])
        r = await http.post(f"{cloud.url}/v1/device/reauth", json={
            "node_id": node.id, "nonce": base64.b64encode(nonce).decode(),
            "signature": base64.b64encode(pki.sign_challenge(sign_with, nonce)).decode(),
            "certificate": cert, "csr": pki.make_csr(node.key).decode()})
        return r.status, r.headers.get(HEADER), await r.json()


async def test_plain_revocation_carries_no_order(cloud: Cloud) -> None:
    node = await cloud.enrol("r")
    await revoke_node(cloud.running.app, node.id, reason="x", actor="t")
    assert await mtls(cloud, node) == [(403, None)] * 3
    assert (await reauth(cloud, node, cloud.old_cert(node, 2), node.key))[:2] == (403, None)


async def test_wipe_order_only_with_proof_of_the_key(cloud: Cloud) -> None:
    node, other = await cloud.enrol("d"), await cloud.enrol("o")
    thief = pki.generate_key(cloud.dir / "thief.key")
    info = await decommission_node(cloud.running.app, node.id, wipe=True, reason="gone",
                                   actor="operator:t")
    assert (info.status, info.revoked, info.wipe, info.decommissioned_by) == (
        "decommissioned", True, True, "operator:t")
    # the TLS handshake proves the key: every endpoint answers 403 with the order
    assert await mtls(cloud, node) == [(403, "wipe")] * 3
    # an expired certificate, within the grace period and long past it (a node that comes
    # back after any time): the order once the nonce is signed with the node's key...
    for days in (2, 400):
        status, order, body = await reauth(cloud, node, cloud.old_cert(node, days), node.key)
        assert (status, order) == (403, "wipe"), body
        assert "decommissioned" in body["error"]
        # ...and nothing but the usual refusal to a thief who has only the certificate
        status, order, body = await reauth(cloud, node, cloud.old_cert(node, days), thief)
        assert (status, order) == (401, None), body
    # nobody else is affected
    assert await mtls(cloud, other) == [(200, None), (200, None), (101, None)]


async def test_keep_order_and_a_wipe_added_later(cloud: Cloud) -> None:
    node = await cloud.enrol("k")
    await decommission_node(cloud.running.app, node.id, wipe=False, reason="", actor="a")
    assert await mtls(cloud, node) == [(403, "keep")] * 3
    first = await cloud.store.get_node(node.id)
    assert first is not None and first.decommissioned_at is not None
    # decommissioned again with --wipe: the wipe is added, when and by whom stay the first
    again = await decommission_node(cloud.running.app, node.id, wipe=True, reason="", actor="b")
    assert (again.wipe, again.decommissioned_at, again.decommissioned_by) == (
        True, first.decommissioned_at, "a")
    # and never taken back, nor by a revocation
    await decommission_node(cloud.running.app, node.id, wipe=False, reason="", actor="c")
    await revoke_node(cloud.running.app, node.id, reason="", actor="d")
    last = await cloud.store.get_node(node.id)
    assert last is not None and (last.status, last.wipe) == ("decommissioned", True)
    assert await mtls(cloud, node) == [(403, "wipe")] * 3
    audit = [e.detail["wipe"] for e in await cloud.store.list_audit(target=f"node:{node.id}")
             if e.action == "node.decommission"]
    assert audit == [True, False]  # newest first: the first and the wipe added


async def test_live_session_hears_the_order(cloud: Cloud) -> None:
    node = await cloud.enrol("s")
    async with cloud.client(node) as http:
        ws = await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
        await ws.send_bytes(protocol.encode({"t": "hello", "agent": "t/1", "streams": {},
                                             "applied_version": 0}))
        assert protocol.decode((await ws.receive(timeout=5)).data)["t"] == "welcome"
        await decommission_node(cloud.running.app, node.id, wipe=True, reason="r", actor="a")
        msg = protocol.decode((await ws.receive(timeout=5)).data)
        assert msg == {"t": "revoked", "reason": "decommissioned, wipe: r",
                       "decommissioned": True, "wipe": True}
        closed = await ws.receive(timeout=5)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_decommissioned_on_another_replica(tmp_path: Path) -> None:
    """Another replica wrote the decommission to the shared store: this one's maintenance
    reloads the revocations and closes the live session with the order, not a plain revoked."""
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, maintenance_interval=0.1)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            cloud = Cloud(config.data_dir, running, store, boot.ca)
            node = await cloud.enrol("x")
            async with cloud.client(node) as http:
                ws = await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
                await ws.send_bytes(protocol.encode({"t": "hello", "agent": "t/1",
                                                     "streams": {}, "applied_version": 0}))
                assert protocol.decode((await ws.receive(timeout=5)).data)["t"] == "welcome"
                await store.decommission_node(node.id, wipe=True, reason="", actor="other")
                msg = protocol.decode((await ws.receive(timeout=5)).data)
                assert msg == {"t": "revoked", "reason": "decommissioned, wipe",
                               "decommissioned": True, "wipe": True}
        finally:
            await running.stop()


async def test_agent_with_an_expired_certificate_hears_it_through_reauth(
        cloud: Cloud, tmp_path: Path) -> None:
    """The real agent in process: enrolled, stopped, decommissioned with --wipe while it was
    away so long that its certificate expired; at start it re-authenticates, hears the order
    in the 403, wipes and stops with `NodeDecommissioned`."""
    from pydantic import SecretStr

    from edgewise.edge.agent import Agent, AgentConfig
    from edgewise.errors import NodeDecommissioned

    plain, record = EnrolmentToken.issue({"n": "agent"}, timedelta(hours=1), 1)
    await cloud.store.add_enrolment_token(record)
    data = tmp_path / "node"
    agent = Agent(AgentConfig(data_dir=data, cloud=cloud.url, ca=cloud.dir / "pki" / "ca.pem",
                              token=SecretStr(plain.get_secret_value())))
    task = asyncio.create_task(agent.run())
    for _ in range(200):
        if agent.uplink is not None and agent.uplink.state == "connected":
            break
        await asyncio.sleep(0.05)
    assert agent.uplink is not None and agent.uplink.state == "connected"
    agent.stop()
    await asyncio.wait_for(task, 10)
    node_id = (data / "identity" / "node_id").read_text().strip()
    await decommission_node(cloud.running.app, node_id, wipe=True, reason="away", actor="a")
    key = pki.load_key(data / "identity" / "node.key")
    expired = cloud.ca.sign_node_csr(pki.make_csr(key), node_id, timedelta(hours=1),
                                     now=datetime.now(UTC) - timedelta(days=30))
    pki.write_atomic(data / "identity" / "node.pem", expired.pem)

    again = Agent(AgentConfig(data_dir=data))
    with pytest.raises(NodeDecommissioned, match=f"node {node_id} was decommissioned"):
        await asyncio.wait_for(again.run(), 20)
    assert again.identity.reauths == 0
    assert sorted(p.name for p in data.iterdir()) == ["decommissioned.json"]
