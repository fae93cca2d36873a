"""One node's bad batch fails only that node's batch: two nodes' sessions over real TLS
(in-process server) whose batches share one group commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.session import SessionLimits
from edgewise.cloud.store import Store
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec, protocol

TIMEOUT = aiohttp.ClientTimeout(total=10)
LINGER = 0.3  # s: batches sent together share a group commit


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[tuple[Running, Store, Path]]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, commit_linger=LINGER,
                         limits=SessionLimits(hello_timeout=2.0))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield running, store, config.data_dir
        finally:
            await running.stop()


async def enrol(running: Running, store: Store, data: Path, name: str) -> tuple[str, Any]:
    """A node's id and an SSL context with its certificate."""
    from datetime import timedelta

    plain, record = EnrolmentToken.issue({"site": "t"}, timedelta(hours=1), 1)
    await store.add_enrolment_token(record)
    key_path = data / f"{name}.key"
    key = pki.generate_key(key_path)
    ca = data / "pki" / "ca.pem"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(ca)),
                                     timeout=TIMEOUT) as http:
        r = await http.post(f"{running.url}/v1/device/enrol", json={
            "token": plain.get_secret_value(), "csr": pki.make_csr(key).decode()})
        assert r.status == 201, await r.text()
        body = await r.json()
    cert = data / f"{name}.pem"
    cert.write_text(body["certificate"])
    return body["node_id"], client_context(ca, cert, key_path)


async def open_session(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{url}{protocol.SESSION_PATH}")
    await ws.send_bytes(protocol.encode({"t": "hello", "agent": "t/1", "streams": {"raw": 5},
                                         "applied_version": 0}))
    assert protocol.decode((await ws.receive(timeout=5)).data)["t"] == "welcome"
    return ws


def batch(cid: int, seq: int, count: int, records: int, compacted: bool = False
          ) -> dict[str, Any]:
    payload = codec.encode({"v": np.arange(records, dtype=np.int64)})
    return {"t": "batch", "id": cid, "stream": "raw", "seq": seq, "count": count,
            "records": records, "compacted": compacted, "payload": payload}


@pytest.mark.parametrize(
    "bad",
    [batch(1, 2**63, 1, 1), batch(1, 0, 2**64 - 1, 1, compacted=True),
     batch(1, 2**63 - 1, 2, 2)],
    ids=["seq 2**63", "count 2**64 - 1", "seq + count over 2**63 - 1"],
)
async def test_a_bad_batch_in_a_shared_group_commit_fails_only_its_node(
        cloud: tuple[Running, Store, Path], bad: dict[str, Any]) -> None:
    running, store, data = cloud
    a_id, a_ctx = await enrol(running, store, data, "a")
    b_id, b_ctx = await enrol(running, store, data, "b")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=a_ctx),
                                     timeout=TIMEOUT) as ha, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=b_ctx),
                                  timeout=TIMEOUT) as hb:
        a, b = await asyncio.gather(open_session(ha, running.url),
                                    open_session(hb, running.url))
        await b.send_bytes(protocol.encode(batch(7, 0, 10, 10)))
        await a.send_bytes(protocol.encode(bad))  # within B's group commit (0.3 s linger)
        answer = protocol.decode((await a.receive(timeout=5)).data)
        assert answer["t"] in ("error", "refuse"), answer
        assert protocol.decode((await b.receive(timeout=5)).data) == {"t": "ack", "ids": [7]}
        await b.send_bytes(protocol.encode(batch(8, 10, 5, 5)))  # B's session goes on
        assert protocol.decode((await b.receive(timeout=5)).data) == {"t": "ack", "ids": [8]}
        await asyncio.gather(a.close(), b.close())
    [s] = await store.stream_stats(b_id)
    assert (s.contiguous, s.stored_records) == (15, 15)
    assert await store.read_chunks(a_id, "raw") == []
