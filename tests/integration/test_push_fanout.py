"""A selector push end to end in one real control plane (mutual TLS, real node certificates,
real sessions): one bulk store operation, pokes from the fan-out task carrying the fetch jitter
hint and the state inline, statuses written by the group writer after each hello, counters on
/metrics."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import aiohttp

from edgewise.cloud.app import start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig, ServerLimits
from edgewise.cloud.store import Store
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import protocol

TIMEOUT = aiohttp.ClientTimeout(total=10)
HELLO = protocol.encode({"t": "hello", "agent": "test/1", "streams": {"raw": 5},
                         "applied_version": 0})


async def test_a_selector_push_pokes_each_live_node_once_with_a_jitter_hint(
        tmp_path: Path) -> None:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, node_write_interval=0.05,
                         server=ServerLimits.parse(["push_fetch_rate=10"]))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            plain, record = EnrolmentToken.issue({"site": "p1"}, timedelta(hours=1), 4)
            await store.add_enrolment_token(record)
            ca_pem = config.data_dir / "pki" / "ca.pem"
            nodes: list[tuple[str, Path, Path]] = []
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=client_context(ca_pem, None, None)),
                    timeout=TIMEOUT) as http:
                for i in range(4):
                    key_path = tmp_path / f"n{i}.key"
                    key = pki.generate_key(key_path)
                    r = await http.post(f"{running.url}/v1/device/enrol", json={
                        "token": plain.get_secret_value(), "csr": pki.make_csr(key).decode()})
                    assert r.status == 201, await r.text()
                    body = await r.json()
                    (tmp_path / f"n{i}.pem").write_text(body["certificate"])
                    nodes.append((body["node_id"], tmp_path / f"n{i}.pem", key_path))
            links = []
            https = []
            for node_id, cert, key in nodes[:3]:  # three connected, the fourth is not
                http = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=client_context(ca_pem, cert, key)),
                    timeout=TIMEOUT)
                https.append(http)
                ws = await http.ws_connect(f"{running.url}{protocol.SESSION_PATH}")
                await ws.send_bytes(HELLO)
                welcome = protocol.decode((await ws.receive(timeout=5)).data)
                assert welcome["node_id"] == node_id
                links.append(ws)
            for _ in range(100):  # "online" goes with the next group write
                statuses = [(await store.get_node(n)).status for n, _c, _k in nodes]
                if statuses == ["online"] * 3 + ["enrolled"]:
                    break
                await asyncio.sleep(0.02)
            assert statuses == ["online"] * 3 + ["enrolled"]

            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=client_context(ca_pem, None, None)),
                    timeout=TIMEOUT) as op:
                r = await op.put(f"{running.url}/v1/config",
                                 headers={"Authorization": f"Bearer {boot.admin_token}"},
                                 json={"selector": "site=p1", "config": {"rate": 5}})
                assert r.status == 200, await r.text()
                answer = await r.json()
                assert sorted((n["node"], n["version"], n["notified"])
                              for n in answer["nodes"]) == sorted(
                    [(n, 1, True) for n, _c, _k in nodes[:3]] + [(nodes[3][0], 1, False)])
                # 4 nodes / 10 fetches per s: each poke says "spread your fetch over 0.4 s",
                # and carries the node's stored state (small), so the node need not fetch
                for ws, (node_id, _c, _k) in zip(links, nodes, strict=False):
                    msg = protocol.decode((await ws.receive(timeout=5)).data)
                    stored = await store.get_desired_state(node_id)
                    assert stored is not None and stored.config == {"rate": 5}
                    assert msg == {"t": "desired", "version": 1, "jitter_s": 0.4,
                                   "state": stored.to_wire()}
                text = await (await op.get(f"{running.url}/metrics")).text()
            assert 'edgewise_pokes_total{outcome="sent"} 3.0' in text
            assert 'edgewise_pokes_inline_total 3.0' in text
            assert 'edgewise_pokes_total{outcome="dropped"} 0.0' in text
            for ws in links:
                await ws.close()
            for http in https:
                await http.close()
            for _ in range(100):
                statuses = [(await store.get_node(n)).status for n, _c, _k in nodes]
                if statuses == ["offline"] * 3 + ["enrolled"]:
                    break
                await asyncio.sleep(0.02)
            assert statuses == ["offline"] * 3 + ["enrolled"]
        finally:
            await running.stop()
