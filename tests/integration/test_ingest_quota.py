"""A node's ingest quota: over it, the session reads the node's next frame later, so its window
fills (backpressure); nothing is refused or dropped. Real TLS, in-process server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from test_ingest_isolation import TIMEOUT, enrol, open_session

from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.ratelimit import ByteQuota
from edgewise.cloud.session import SessionLimits
from edgewise.cloud.store import Store
from edgewise.sync import codec, protocol

RATE = 64 * 1024  # bytes/s
BURST = 64 * 1024


def test_quota_debits_and_says_how_long_to_wait() -> None:
    now = [0.0]
    q = ByteQuota(100.0, 300.0, clock=lambda: now[0])
    assert [q.take(100), q.take(200)] == [0.0, 0.0]  # the burst
    assert q.take(50) == 0.5  # 50 bytes over at 100 B/s
    now[0] += 0.5
    assert q.take(100) == 1.0  # back to zero after 0.5 s, then 100 over
    now[0] += 10.0
    assert q.take(300) == 0.0  # refilled up to the burst, no more
    assert q.take(1) == 0.01
    with pytest.raises(ValueError, match="rate and a burst above 0"):
        ByteQuota(0, 1)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[tuple[Running, Store, Path]]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0,
                         limits=SessionLimits(hello_timeout=2.0, ingest_bytes_per_s=RATE,
                                              ingest_burst_bytes=BURST))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield running, store, config.data_dir
        finally:
            await running.stop()


async def test_a_node_over_its_quota_is_slowed_not_refused(
    cloud: tuple[Running, Store, Path],
) -> None:
    running, store, data = cloud
    _node, ctx = await enrol(running, store, data, "heavy")
    rng = np.random.default_rng(1)
    batches = []
    for i in range(8):  # incompressible payloads of ~32 KiB each: 4 bursts' worth in all
        payload = codec.encode({"v": rng.random(4096)})
        batches.append({"t": "batch", "id": i, "stream": "raw", "seq": i * 4096, "count": 4096,
                        "records": 4096, "compacted": False, "payload": payload})
    total = sum(len(b["payload"]) for b in batches)
    assert total > 3 * BURST
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=TIMEOUT) as http:
        ws = await open_session(http, running.url)
        started = time.monotonic()
        for b in batches:
            await ws.send_bytes(protocol.encode(b))
        acked: list[int] = []
        while len(acked) < len(batches):
            msg = protocol.decode((await ws.receive(timeout=30)).data)
            assert msg["t"] == "ack", msg  # never refused
            acked.extend(msg["ids"])
        took = time.monotonic() - started
        await ws.close()
    assert sorted(acked) == list(range(8))
    assert took >= (total - BURST) / RATE * 0.9, took  # held back to the quota
    stats = await store.stream_stats(_node)
    assert [(s.stream, s.contiguous) for s in stats] == [("raw", 8 * 4096)]
