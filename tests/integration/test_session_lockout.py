"""Issue 11's lock-out bug: one storage failure must not lock a node out. Real control plane
in-process over mutual TLS, a real node certificate; the one injected fault is a `StorageError`
from the first group write of node statuses (`Store.write_node_batch`; `attach` itself no longer
writes to the store)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from cryptography import x509

from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.session import SessionLimits
from edgewise.cloud.state import SESSIONS
from edgewise.cloud.store import Store
from edgewise.errors import StorageError
from edgewise.security import pki
from edgewise.security.tls import client_context, public_key_fingerprint
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec, protocol

TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Running, Store, Path]]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, maintenance_interval=0.2,
                         node_write_interval=0.1, limits=SessionLimits(hello_timeout=2.0))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield running, store, config.data_dir
        finally:
            await running.stop()


async def _enrol(running: Running, store: Store, data: Path) -> tuple[str, Path, Path]:
    plain, record = EnrolmentToken.issue({}, timedelta(hours=1), 1)
    await store.add_enrolment_token(record)
    key_path = data / "n.key"
    key = pki.generate_key(key_path)
    ctx = client_context(data / "pki" / "ca.pem", None, None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=TIMEOUT) as http:
        r = await http.post(f"{running.url}/v1/device/enrol", json={
            "token": plain.get_secret_value(), "csr": pki.make_csr(key).decode()})
        assert r.status == 201, await r.text()
        body = await r.json()
    cert_path = data / "n.pem"
    cert_path.write_text(body["certificate"])
    return body["node_id"], cert_path, key_path


async def test_one_storage_failure_in_the_status_write_does_not_lock_the_node_out(
    served: tuple[Running, Store, Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`attach` no longer writes to the store (issue 11: each attempt wrote before the hello
    was read); the status goes with the next group write (`node_writes`). One failure of that
    write delays the status, never the session: the node gets its welcome, reconnects at
    once, and the status is written by the next group."""
    running, store, data = served
    node_id, cert, key = await _enrol(running, store, data)
    real = store.write_node_batch
    calls: list[dict[str, str]] = []

    async def fails_once(statuses, reports, losses=None, **kw):  # type: ignore[no-untyped-def]
        calls.append({n: st for n, (st, _when) in statuses.items()})
        if len(calls) == 1:
            raise StorageError("injected: QueuePool limit of size 10 overflow 10 reached")
        await real(statuses, reports, losses or {}, **kw)

    monkeypatch.setattr(store, "write_node_batch", fails_once)
    ctx = client_context(data / "pki" / "ca.pem", cert, key)
    hello = protocol.encode({"t": "hello", "agent": "test/1", "streams": {"raw": 5},
                             "applied_version": 0})
    caplog.set_level(logging.WARNING, logger="edgewise.cloud.node_writes")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=TIMEOUT) as http:
        first = await http.ws_connect(f"{running.url}{protocol.SESSION_PATH}")
        await asyncio.sleep(0.3)  # connected, no hello yet: nothing written for it
        assert calls == []
        await first.send_bytes(hello)
        msg = await first.receive(timeout=5)
        assert protocol.decode(msg.data)["t"] == "welcome"
        for _ in range(100):  # the group write fails once, then writes "online"
            if len(calls) == 2:
                break
            await asyncio.sleep(0.05)
        await first.close()
        second = await http.ws_connect(f"{running.url}{protocol.SESSION_PATH}")
        await second.send_bytes(hello)
        msg = await second.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data)
        welcome = protocol.decode(msg.data)
        assert (welcome["t"], welcome["node_id"]) == ("welcome", node_id)
        assert len(running.app[SESSIONS]) == 1
        for _ in range(100):
            if (await store.get_node(node_id)).status == "online" and len(calls) >= 4:
                break
            await asyncio.sleep(0.05)
        assert (await store.get_node(node_id)).status == "online"
        await second.close()
    # failed "online", its retry, then offline and online again (maybe in one group: the
    # newest per node wins)
    assert calls[:2] == [{node_id: "online"}, {node_id: "online"}]
    assert calls[-1] == {node_id: "online"}
    failures = [r.getMessage() for r in caplog.records if "writes failed" in r.getMessage()]
    assert failures == ["node status and report writes failed (tried again in 0.1 s): "
                        "injected: QueuePool limit of size 10 overflow 10 reached"]


class _Stuck:
    """A replaced session that never ends (its commit hangs): only what `attach` uses."""

    def __init__(self, node_id: str, cert: Path) -> None:
        self.node_id = node_id
        # what the maintenance task checks (`SessionRegistry.enforce`)
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        self.serial = parsed.serial_number
        self.fingerprint = public_key_fingerprint(parsed)
        self.not_after = parsed.not_valid_after_utc
        self.settled = asyncio.Event()
        self.finished = asyncio.Event()
        self.replaced = False

    def replace(self) -> None:
        self.replaced = True


async def test_attach_waits_for_the_replaced_session_a_bounded_time(
    served: tuple[Running, Store, Path], caplog: pytest.LogCaptureFixture,
) -> None:
    running, store, data = served
    node_id, cert, _ = await _enrol(running, store, data)
    reg = running.app[SESSIONS]
    reg.replace_timeout = 0.3
    stuck, new = _Stuck(node_id, cert), _Stuck(node_id, cert)
    reg._sessions[node_id] = stuck  # type: ignore[assignment]
    caplog.set_level(logging.WARNING, logger="edgewise.cloud.sessions")
    await asyncio.wait_for(reg.attach(new), 3)  # type: ignore[arg-type]
    assert stuck.replaced and reg.get(node_id) is new
    # attach writes nothing: the session queues "online" once it has read the hello
    assert (await store.get_node(node_id)).status == "enrolled"
    assert [r.getMessage() for r in caplog.records] == [
        f"session of {node_id}: the session it replaces did not settle its commits within "
        "0.3 s; going on without it"]
    del reg._sessions[node_id]


async def test_attach_does_not_wait_for_the_replaced_sessions_close_handshake(
    served: tuple[Running, Store, Path], caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 11, the storm: a replaced session whose commits are settled but whose socket is
    still closing (aiohttp waits up to 10 s for the close frame of a peer that went away) does
    not hold up the new session: before, `attach` waited for ``finished`` for as long as the
    agent's welcome timeout, so each new session of a node that gave up missed its welcome too."""
    running, store, data = served
    node_id, cert, _ = await _enrol(running, store, data)
    reg = running.app[SESSIONS]
    reg.replace_timeout = 30.0
    closing, new = _Stuck(node_id, cert), _Stuck(node_id, cert)
    closing.settled.set()  # its commits ended; ``finished`` never comes (close handshake)
    reg._sessions[node_id] = closing  # type: ignore[assignment]
    caplog.set_level(logging.WARNING, logger="edgewise.cloud.sessions")
    await asyncio.wait_for(reg.attach(new), 10)  # type: ignore[arg-type]
    assert closing.replaced and reg.get(node_id) is new
    assert not closing.finished.is_set()
    assert [r.getMessage() for r in caplog.records] == []
    del reg._sessions[node_id]


async def test_a_failed_ingest_commit_is_never_acknowledged_and_is_stored_once_on_resend(
    served: tuple[Running, Store, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session's acknowledgements follow its commits in order (`Session._settle`, the
    done-callback of each submitted write): the first failed commit fails the session with
    ``storage failure`` and neither its batch nor the one chained after it is acknowledged;
    the node sends both again on its next session and each is stored once."""
    running, store, data = served
    node_id, cert, key = await _enrol(running, store, data)
    real = store.commit_ingest
    calls: list[int] = []

    async def fails_first(chunks, gaps=(), marks=(), **kw):  # type: ignore[no-untyped-def]
        calls.append(len(chunks))
        if len(calls) == 1:
            raise StorageError("injected: disk I/O error")
        return await real(chunks, gaps, marks, **kw)

    monkeypatch.setattr(store, "commit_ingest", fails_first)
    running.app[SESSIONS].committer.linger = 0.3  # both batches in the first group

    def batch(cid: int, seq: int) -> bytes:
        return protocol.encode({
            "t": "batch", "id": cid, "stream": "raw", "seq": seq, "count": 10, "records": 10,
            "compacted": False,
            "payload": codec.encode({"v": np.arange(seq, seq + 10, dtype=np.int64)})})

    hello = protocol.encode({"t": "hello", "agent": "test/1", "streams": {"raw": 5},
                             "applied_version": 0})
    ctx = client_context(data / "pki" / "ca.pem", cert, key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=TIMEOUT) as http:
        first = await http.ws_connect(f"{running.url}{protocol.SESSION_PATH}")
        await first.send_bytes(hello)
        assert protocol.decode((await first.receive(timeout=5)).data)["t"] == "welcome"
        await first.send_bytes(batch(1, 0))
        await first.send_bytes(batch(2, 10))
        got = []
        while True:
            msg = await first.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            got.append(protocol.decode(msg.data))
        assert [m["t"] for m in got] == ["error"], got  # no ack before the error
        assert got[0]["reason"] == "storage failure: injected: disk I/O error"
        assert calls == [2]

        second = await http.ws_connect(f"{running.url}{protocol.SESSION_PATH}")
        await second.send_bytes(hello)
        welcome = protocol.decode((await second.receive(timeout=5)).data)
        assert welcome["streams"] == {"raw": 0}  # nothing of the failed group was stored
        await second.send_bytes(batch(1, 0))
        await second.send_bytes(batch(2, 10))
        acked: list[int] = []
        while len(acked) < 2:
            msg = protocol.decode((await second.receive(timeout=5)).data)
            assert msg["t"] == "ack", msg
            acked += msg["ids"]
        assert acked == [1, 2]
        await second.close()
    (raw,) = [s for s in await store.stream_stats(node_id) if s.stream == "raw"]
    assert (raw.stored_records, raw.contiguous) == (20, 20)
