"""Admission control (issue 11): a token bucket paces TLS handshakes and enrolments, so a storm
becomes a queue instead of timeouts. Real control plane in-process, real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from edgewise.cloud.app import GATE_METRICS, Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig, ServerLimits
from edgewise.cloud.ratelimit import ENROL_PACER, Pacer
from edgewise.cloud.store import Store
from edgewise.errors import ConfigError
from edgewise.security.tls import client_context


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, limits: list[str]) -> AsyncIterator[tuple[Running, Path]]:
    """A control plane with these ``--limit`` values: (running, data folder)."""
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0,
                         server=ServerLimits.parse(limits))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield running, config.data_dir
        finally:
            await running.stop()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Running, Path]]:
    async with serve(tmp_path, ["handshake_rate=20", "handshake_burst=1",
                                "handshake_queue=5", "backlog=4096"]) as got:
        yield got


async def test_handshakes_beyond_the_rate_wait_in_a_queue_and_all_succeed(
        served: tuple[Running, Path]) -> None:
    running, data = served
    ctx = client_context(data / "pki" / "ca.pem", None, None)

    async def health() -> int:
        # one connection each (no pooling): each is one TLS handshake
        async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                          timeout=aiohttp.ClientTimeout(total=10)) as http,
                    http.get(f"{running.url}/healthz") as r):
            return r.status

    statuses = await asyncio.gather(*(health() for _ in range(6)))
    gate = running.app[GATE_METRICS].gate
    assert gate is not None
    assert statuses == [200] * 6
    # the burst (1) started at once, the 5 others waited for a token; none refused or failed
    assert (gate.queued, gate.refused, gate.handshake_failures) == (5, 0, 0)


async def test_a_full_handshake_queue_closes_the_newest_connections(
        served: tuple[Running, Path]) -> None:
    running, _data = served
    gate = running.app[GATE_METRICS].gate
    assert gate is not None
    gate.bucket.rate = 0.01  # no token comes back during the test
    gate.bucket._tokens = 1.0
    port = running.port
    conns = []
    for _ in range(8):
        try:
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        except ConnectionResetError:  # closed at once: the reset can beat connect()'s return
            pass
    for _ in range(100):
        if gate.queued + gate.refused >= 7:
            break
        await asyncio.sleep(0.01)
    # 1 handshake started (it waits for a ClientHello), 5 queued, 2 closed at once
    assert (gate.queued, gate.refused) == (5, 2)
    for _r, w in conns:
        w.close()


async def test_enrolments_wait_their_turn_and_a_full_queue_is_told_when_to_retry() -> None:
    pacer = Pacer(rate=50.0, burst=2, max_waiting=3)
    done: list[int] = []

    async def one(i: int) -> float:
        retry = await pacer.admit()
        if retry == 0.0:
            done.append(i)
        return retry

    results = await asyncio.gather(*(one(i) for i in range(6)))
    # 2 from the burst, 3 waited (in arrival order), 1 refused with a Retry-After
    assert done == [0, 1, 2, 3, 4]
    assert results[:5] == [0.0] * 5 and results[5] > 0
    assert (pacer.waited, pacer.refused, pacer.waiting) == (3, 1, 0)


def test_admission_limits_are_parsed_and_checked() -> None:
    limits = ServerLimits.parse(["handshake_rate=150", "enrol-rate=10", "backlog=1024"])
    assert (limits.handshake_rate, limits.enrol_rate, limits.backlog) == (150.0, 10.0, 1024)
    with pytest.raises(ConfigError, match=r"limit handshake_rate must be a positive number of "
                                          r"handshakes per second, not 0\.0"):
        ServerLimits.parse(["handshake_rate=0"])
    with pytest.raises(ConfigError, match="limit handshake_queue must be a whole number"):
        ServerLimits.parse(["handshake_queue=0"])


async def test_a_connection_waiting_for_a_token_is_closed_after_queue_wait(
        served: tuple[Running, Path]) -> None:
    """A connection that waited ``queue_wait`` for a handshake token is closed: its node is
    about to give up on its connect (before, it waited without bound)."""
    running, _data = served
    gate = running.app[GATE_METRICS].gate
    assert gate is not None
    gate.bucket.rate = 0.01  # no token comes back during the test
    gate.bucket._tokens = 0.0
    gate.queue_wait = 0.5
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    t0 = asyncio.get_running_loop().time()
    try:
        got = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        got = b""
    waited = asyncio.get_running_loop().time() - t0
    assert got == b"" and 0.3 < waited < 3.0, (got, waited)
    assert (gate.queued, gate.expired, gate.refused, gate.unauthenticated) == (1, 1, 0, 0)
    writer.close()


async def test_enrolments_in_flight_leave_half_the_cap_to_session_handshakes(
        tmp_path: Path) -> None:
    """Enrolments hold unauthenticated connections while they wait; at most half of the
    listener's cap (``max_unauthenticated``) may: one more is told to retry (429) at once
    and its connection closes, so a node's handshake still finds room. Before, 8 waiting
    enrolments filled a cap of 8 and the next connection was closed at the cap."""
    async with serve(tmp_path, ["max_unauthenticated=8"]) as (running, data):
        pacer = running.app[ENROL_PACER]
        pacer.bucket.rate, pacer.bucket._tokens = 0.01, 0.0  # every enrolment waits
        ctx = client_context(data / "pki" / "ca.pem", None, None)

        async def request(method: str, path: str, body: object = None) -> int:
            async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                              timeout=aiohttp.ClientTimeout(total=20))
                        as http,
                        http.request(method, f"{running.url}{path}", json=body) as r):
                return r.status

        enrols = [asyncio.create_task(request("POST", "/v1/device/enrol",
                                              {"token": "t", "csr": "c"}))
                  for _ in range(8)]
        refused = []
        for _ in range(500):
            refused = [t.result() for t in enrols if t.done()]
            if pacer.inflight == 4 and len(refused) == 4:
                break
            await asyncio.sleep(0.01)
        assert (pacer.inflight, refused) == (4, [429] * 4)
        assert await request("GET", "/healthz") == 200  # room for a handshake
        for t in enrols:
            t.cancel()
        await asyncio.gather(*enrols, return_exceptions=True)
