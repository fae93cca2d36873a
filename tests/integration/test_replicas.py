"""Two control-plane apps on one PostgreSQL database, as `cloud serve --processes 2` runs them
(issue 11, scale-out): real TLS, real sessions, real LISTEN/NOTIFY between them
(`edgewise.cloud.replicas`). What one process does for a node whose session the other holds
must reach that session: a poke (with its state inline), a newer session of the node (the old
one is closed), a revocation and a quarantine (at once, not at the next maintenance round);
a re-authentication nonce issued by one is taken at the other. Each test fails without the
bus (or the stored nonces): the other process never hears of it.

The processes as real subprocesses: tests/e2e/test_cloud_processes.py."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_cloud_device_api import Cloud, Link, session

from edgewise.cloud.app import start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.desired import DesiredChange, assign
from edgewise.cloud.session import SessionLimits
from edgewise.cloud.state import BUS, POKES, SESSIONS, revoke_node, set_quarantine
from edgewise.cloud.store import Store
from edgewise.cloud.store.notify import CHANNEL, listen_dsn
from edgewise.security import pki

pytestmark = pytest.mark.asyncio


@dataclass
class Pair:
    a: Cloud
    b: Cloud
    db: str


@pytest.fixture
async def pair(tmp_path: Path, postgres: str) -> AsyncIterator[Pair]:
    # maintenance once a minute: what arrives sooner came over the bus
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, db=postgres,
                         maintenance_interval=60.0, node_write_interval=0.05,
                         limits=SessionLimits(hello_timeout=2.0))
    async with Store(config.db_url) as sa, Store(config.db_url) as sb:
        boot = await bootstrap(config.data_dir, sa, host="127.0.0.1",
                               trust_domain="edgewise.local")
        ra = await start(config, boot.ca, store=sa)
        rb = await start(config, boot.ca, store=sb)
        try:
            for r in (ra, rb):  # both buses listening before anything is said
                await until(lambda r=r: r.app[BUS].channel.connected, "bus connected")
            yield Pair(Cloud(config.data_dir, ra, sa, boot.ca),
                       Cloud(config.data_dir, rb, sb, boot.ca), postgres)
        finally:
            await rb.stop()
            await ra.stop()


async def until(check: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


async def recv_within(link: Link, seconds: float) -> dict[str, Any]:
    t0 = time.monotonic()
    msg = await link.recv()
    assert time.monotonic() - t0 < seconds
    return msg


async def test_a_poke_from_one_process_reaches_the_node_at_the_other(pair: Pair) -> None:
    node = await pair.a.enrol("n")
    async with pair.b.client(node) as http:
        link = await session(pair.b, http)
        assert (await link.hello())["desired_version"] == 0
        stored = await pair.a.store.put_desired_state(node.id, config={"rate": 2}, actor="t")
        live = pair.a.running.app[POKES].poke({node.id: stored.version}, 0.0,
                                              {node.id: stored})
        assert live == set()  # not connected to a
        got = await recv_within(link, 5.0)
        # b read the stored state itself and sent it inline, as if the write had been its own
        assert got == {"t": "desired", "version": 1, "state": stored.to_wire()}
        assert pair.a.running.app[POKES].forwarded == 1
        assert pair.b.running.app[POKES].sent == 1
        assert pair.b.running.app[POKES].forwarded == 0  # not sent back round


async def test_a_push_through_one_process_says_a_node_at_the_other_is_notified(
        pair: Pair) -> None:
    on_b, offline = await pair.a.enrol("on-b"), await pair.a.enrol("offline")
    async with pair.b.client(on_b) as http:
        link = await session(pair.b, http)
        await link.hello()
        deadline = time.monotonic() + 5
        while (await pair.a.store.get_node(on_b.id)).status != "online":  # b's status write
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        nodes = [await pair.a.store.get_node(n.id) for n in (on_b, offline)]
        done = await assign(pair.a.store, pair.a.running.app[POKES], nodes,
                            DesiredChange(config={"rate": 3}), actor="t",
                            now=datetime.now(UTC))
        assert [(d.node, d.version, d.notified) for d in done] == [
            (on_b.id, 1, True), (offline.id, 1, False)]
        got = await recv_within(link, 5.0)
        assert (got["version"], got["state"]["config"]) == (1, {"rate": 3})


async def test_one_session_per_node_across_the_processes(pair: Pair) -> None:
    node = await pair.a.enrol("n")
    async with pair.a.client(node) as http_a, pair.b.client(node) as http_b:
        old = await session(pair.a, http_a)
        await old.hello()
        new = await session(pair.b, http_b)
        await new.hello()
        assert await recv_within(old, 5.0) == {
            "t": "error",
            "reason": "replaced by a newer session of this node (at another control-plane "
                      "process)"}
        await until(lambda: len(pair.a.running.app[SESSIONS]) == 0, "old session gone")
        assert pair.a.running.app[SESSIONS].replaced_elsewhere == 1
        # the newer one stays: b's session of the node is the one left
        await new.send({"t": "heartbeat", "ts": time.time()})
        await asyncio.sleep(0.3)
        assert len(pair.b.running.app[SESSIONS]) == 1
        assert not new.ws.closed
        assert pair.b.running.app[SESSIONS].replaced_elsewhere == 0


async def test_a_nonce_issued_by_one_process_is_taken_at_the_other(pair: Pair) -> None:
    node = await pair.a.enrol("n")
    key = pki.load_key(node.key)
    expired = pair.a.ca.sign_node_csr(pki.make_csr(key), node.id, timedelta(hours=1),
                                      now=datetime.now(UTC) - timedelta(days=2)).pem.decode()

    async def reauth(at: Cloud, nonce: bytes) -> tuple[int, dict[str, Any]]:
        async with at.client() as http:
            r = await http.post(f"{at.url}/v1/device/reauth", json={
                "node_id": node.id, "nonce": base64.b64encode(nonce).decode(),
                "signature": base64.b64encode(pki.sign_challenge(key, nonce)).decode(),
                "certificate": expired, "csr": pki.make_csr(key).decode()})
            return r.status, await r.json()

    async with pair.a.client() as http:
        r = await http.post(f"{pair.a.url}/v1/device/reauth/challenge", json={"node_id": node.id})
        nonce = base64.b64decode((await r.json())["nonce"])
    status, body = await reauth(pair.b, nonce)
    assert status == 200, body
    for at in (pair.a, pair.b):  # used up everywhere
        assert await reauth(at, nonce) == (
            401, {"error": "unknown, used or expired challenge nonce; ask for a new one"})


async def test_a_revocation_at_one_process_closes_the_session_at_the_other(pair: Pair) -> None:
    node = await pair.a.enrol("n")
    async with pair.b.client(node) as http:
        link = await session(pair.b, http)
        await link.hello()
        await revoke_node(pair.a.running.app, node.id, reason="stolen", actor="t")
        assert await recv_within(link, 5.0) == {"t": "revoked", "reason": "revoked: stolen"}
        await link.closed()
        # b refuses the certificate from now on, not only after its next maintenance round
        r = await http.get(f"{pair.b.url}/v1/device/desired")
        assert r.status == 403


async def test_a_quarantine_at_one_process_reaches_the_session_at_the_other(pair: Pair) -> None:
    node = await pair.a.enrol("n")
    async with pair.b.client(node) as http:
        link = await session(pair.b, http)
        await link.hello()
        live = pair.b.running.app[SESSIONS].get(node.id)
        assert live is not None and not live.quarantined
        await set_quarantine(pair.a.running.app, node.id, "tampered", actor="t")
        await until(lambda: live.quarantined, "quarantined at b")
        await set_quarantine(pair.a.running.app, node.id, None, actor="t")
        await until(lambda: not live.quarantined, "lifted at b")


async def test_malformed_notifications_are_counted_and_dropped(pair: Pair) -> None:
    url = listen_dsn(pair.db)
    conn = await asyncpg.connect(url)
    bus = pair.b.running.app[BUS]
    before = bus.received
    try:
        for payload in ("not json", '{"k": "poke", "v": [1], "j": 0}',
                        '{"k": "open", "s": {"' + "x" * 200 + '": 1.0}}',
                        '{"k": "revoke", "n": "a"}', '{"k": "nope"}',
                        '{"k": "poke", "v": {"n": true}, "j": 0}'):
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
    finally:
        await conn.close()
    await until(lambda: bus.malformed == 6, "six dropped")
    assert bus.received == before
    assert pair.b.running.app[SESSIONS] is not None  # still serving
    async with pair.b.client() as http:
        assert (await http.get(f"{pair.b.url}/healthz")).status == 200


async def test_the_bus_comes_back_after_its_connection_is_killed(pair: Pair) -> None:
    """PostgreSQL ends the listening connection (a restart, a failover): the bus reconnects
    and later pokes get through again."""
    bus_b = pair.b.running.app[BUS]
    url = listen_dsn(pair.db)
    conn = await asyncpg.connect(url)
    try:
        pid = bus_b.channel._pid
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()
    await until(lambda: bus_b.channel._pid != pid and bus_b.channel.connected,
                "reconnected", timeout=15.0)
    node = await pair.a.enrol("n")
    async with pair.b.client(node) as http:
        link = await session(pair.b, http)
        await link.hello()
        stored = await pair.a.store.put_desired_state(node.id, config={"x": 1}, actor="t")
        pair.a.running.app[POKES].poke({node.id: stored.version}, 0.0)
        assert (await recv_within(link, 5.0))["version"] == stored.version


