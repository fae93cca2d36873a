"""The device API and session over real TLS on 127.0.0.1 (aiohttp server in-process, aiohttp
client, node certificates from the real CA): enrolment, renewal, re-authentication, desired
state, the uplink session with exactly-once ingest, and the security table."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from cryptography import x509

from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.session import SessionLimits
from edgewise.cloud.state import SESSIONS, STORE, revoke_node
from edgewise.cloud.store import Store
from edgewise.outbox import Outbox, PendingChunk
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec, protocol
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import ReportedState

TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class Cloud:
    dir: Path
    running: Running
    store: Store
    ca: CertificateAuthority

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def ca_pem(self) -> Path:
        return self.dir / "pki" / "ca.pem"

    async def token(self, uses: int = 1, ttl: timedelta = timedelta(hours=1),
                    labels: dict[str, str] | None = None, now: datetime | None = None) -> str:
        plain, record = EnrolmentToken.issue(labels or {"site": "plant1"}, ttl, uses, now=now)
        await self.store.add_enrolment_token(record)
        return plain.get_secret_value()

    def client(self, node: Node | None = None) -> aiohttp.ClientSession:
        ctx = client_context(self.ca_pem, *(node.files if node else (None, None)))
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=TIMEOUT)

    async def enrol(self, name: str, **token_kw: Any) -> Node:
        key_path = self.dir / f"{name}.key"
        key = pki.generate_key(key_path)
        async with self.client() as http:
            r = await http.post(f"{self.url}/v1/device/enrol", json={
                "token": await self.token(**token_kw), "csr": pki.make_csr(key).decode()})
            assert r.status == 201, await r.text()
            body = await r.json()
        cert_path = self.dir / f"{name}.pem"
        cert_path.write_text(body["certificate"])
        return Node(body["node_id"], key_path, cert_path)


@dataclass
class Node:
    id: str
    key: Path
    cert: Path

    @property
    def files(self) -> tuple[Path, Path]:
        return self.cert, self.key


@pytest.fixture
def backend() -> str:
    return "sqlite"  # tests parametrize this to run on PostgreSQL too


@pytest.fixture
def db(backend: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("postgres") if backend == "postgres" else None


@pytest.fixture
async def cloud(tmp_path: Path, db: str | None) -> AsyncIterator[Cloud]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, db=db, maintenance_interval=0.2,
                         node_write_interval=0.05,
                         limits=SessionLimits(hello_timeout=2.0))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield Cloud(config.data_dir, running, store, boot.ca)
        finally:
            await running.stop()


class Link:
    """A node's side of a session, speaking the protocol frame by frame."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send_bytes(protocol.encode(msg))

    async def recv(self) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
        return protocol.decode(msg.data)

    async def closed(self) -> int | None:
        msg = await self.ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING), (msg.type, msg.data)
        return self.ws.close_code

    async def hello(self, streams: dict[str, int] | None = None) -> dict[str, Any]:
        await self.send({"t": "hello", "agent": "test/1", "streams": streams or {"raw": 5},
                         "applied_version": 0})
        welcome = await self.recv()
        assert welcome["t"] == "welcome"
        return welcome


async def session(cloud: Cloud, http: aiohttp.ClientSession) -> Link:
    ws = await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
    return Link(ws)


def outbox_chunks(tmp: Path, sizes: list[int], stream: str = "raw") -> list[Any]:
    """Real outbox chunks: readings through `Outbox.commit`, read back with `peek`."""
    with Outbox(tmp / "outbox.db") as ob:
        ob.register_stream(stream, 5)
        start_ts = 1_700_000_000.0
        for n in sizes:
            cols = {
                "sensor": np.array([f"line1/temp/{i % 3:03d}" for i in range(n)], dtype=object),
                "ts": start_ts + np.arange(n) * 0.02,
                "value": np.round(20 + np.arange(n) * 0.01, 2),
            }
            ob.commit([PendingChunk(stream, cols, n)])
            start_ts += n
        return ob.peek()


def batch(chunk: Any) -> dict[str, Any]:
    return {"t": "batch", "id": chunk.id, "stream": chunk.stream, "seq": chunk.seq_first,
            "count": chunk.seq_count, "records": chunk.records, "compacted": chunk.compacted,
            "payload": chunk.payload}


# -- enrolment ------------------------------------------------------------------------------


async def test_enrol_single_use_token(cloud: Cloud) -> None:
    node = await cloud.enrol("a", labels={"site": "plant1", "line": "1"})
    cert = x509.load_pem_x509_certificate(node.cert.read_bytes())
    assert pki.node_id_from_cert(cert, "edgewise.local") == node.id
    stored = await cloud.store.get_node(node.id)
    assert stored.labels == {"site": "plant1", "line": "1"}
    assert stored.cert_serial == cert.serial_number
    token = await cloud.token()
    key = pki.generate_key(cloud.dir / "b.key")
    csr = pki.make_csr(key).decode()
    async with cloud.client() as http:
        r1 = await http.post(f"{cloud.url}/v1/device/enrol", json={"token": token, "csr": csr})
        other = pki.make_csr(pki.generate_key(cloud.dir / "c.key")).decode()
        r2 = await http.post(f"{cloud.url}/v1/device/enrol", json={"token": token, "csr": other})
        assert (r1.status, r2.status) == (201, 401)  # another key: the token is used up
        assert "used up" in (await r2.json())["error"]
        expired = await cloud.token(ttl=timedelta(minutes=1),
                                    now=datetime.now(UTC) - timedelta(minutes=2))
        r3 = await http.post(f"{cloud.url}/v1/device/enrol", json={"token": expired, "csr": csr})
        assert r3.status == 401
        assert "expired" in (await r3.json())["error"]
        r4 = await http.post(f"{cloud.url}/v1/device/enrol",
                             json={"token": "ewo_" + "a" * 43, "csr": csr})
        assert (r4.status, (await r4.json())["error"]) == (
            401, "wrong kind of token: ewo_..., expected ewe_...")
        r5 = await http.post(f"{cloud.url}/v1/device/enrol",
                             json={"token": await cloud.token(), "csr": "not a csr"})
        assert r5.status == 400
        r6 = await http.post(f"{cloud.url}/v1/device/enrol", data=b"{not json")
        assert (r6.status, (await r6.json())["error"]) == (400, "request body is not JSON")
    assert await cloud.store.count_nodes() == 2


async def _post_enrol(cloud: Cloud, token: str, csr: str) -> tuple[int, dict[str, Any]]:
    async with cloud.client() as http:
        r = await http.post(f"{cloud.url}/v1/device/enrol", json={"token": token, "csr": csr})
        return r.status, await r.json()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_enrolment_retried_with_the_same_key_and_token_gets_the_same_node(
    cloud: Cloud,
) -> None:
    """An enrolment whose answer was lost, sent again: the same node with a fresh certificate
    (200), not a used-up token and an orphan node. Another key with that token is refused, and
    the key with another token is still KeyInUse (test_cloud_hardening.py)."""
    key = pki.generate_key(cloud.dir / "n.key")
    csr = pki.make_csr(key).decode()
    token = await cloud.token()
    first = await _post_enrol(cloud, token, csr)
    again = await _post_enrol(cloud, token, pki.make_csr(key).decode())  # a new CSR, same key
    assert (first[0], again[0]) == (201, 200), (first, again)
    node_id = first[1]["node_id"]
    assert again[1]["node_id"] == node_id and again[1]["trust_domain"] == "edgewise.local"
    cert = x509.load_pem_x509_certificate(again[1]["certificate"].encode())
    assert pki.node_id_from_cert(cert, "edgewise.local") == node_id
    assert pki.public_key_fingerprint(cert) == pki.public_key_fingerprint(key)
    stored = await cloud.store.get_node(node_id)
    assert stored is not None and stored.cert_serial == cert.serial_number  # the one it holds
    assert stored.labels == {"site": "plant1"}
    assert await cloud.store.count_nodes() == 1
    # the certificate of the retry is the node's: it authenticates
    (cloud.dir / "n.pem").write_text(again[1]["certificate"])
    async with cloud.client(Node(node_id, cloud.dir / "n.key", cloud.dir / "n.pem")) as http:
        assert (await http.get(f"{cloud.url}/v1/device/desired")).status == 200
    # another key with the used token: refused; this key with another token: one key one node
    stranger = pki.make_csr(pki.generate_key(cloud.dir / "s.key")).decode()
    assert (await _post_enrol(cloud, token, stranger))[0] == 401
    assert (await _post_enrol(cloud, await cloud.token(), csr))[0] == 409
    # four retries at once: all the same node
    answers = await asyncio.gather(*(_post_enrol(cloud, token, csr) for _ in range(4)))
    assert [(a[0], a[1]["node_id"]) for a in answers] == [(200, node_id)] * 4
    # a multi-use token: the same key again is the same node, and leaves the other uses
    multi = await cloud.token(uses=3)
    key2 = pki.make_csr(pki.generate_key(cloud.dir / "m.key")).decode()
    m1, m2 = await _post_enrol(cloud, multi, key2), await _post_enrol(cloud, multi, key2)
    assert (m1[0], m2[0], m2[1]["node_id"]) == (201, 200, m1[1]["node_id"])
    assert (await _post_enrol(cloud, multi, stranger))[0] == 201
    assert await cloud.store.count_nodes() == 3
    audit = [e.action for e in await cloud.store.list_audit(target=f"node:{node_id}")]
    assert audit.count("node.enrol") == 1 and audit.count("node.enrol.retry") == 5


async def test_enrolment_retry_after_the_token_expired_or_the_node_was_revoked(
    cloud: Cloud,
) -> None:
    key = pki.generate_key(cloud.dir / "n.key")
    csr = pki.make_csr(key).decode()
    token = await cloud.token(ttl=timedelta(seconds=2))
    status, body = await _post_enrol(cloud, token, csr)
    assert status == 201
    await asyncio.sleep(2.2)  # the token's lifetime is the window for a retry
    status, answer = await _post_enrol(cloud, token, csr)
    assert (status, "expired" in answer["error"]) == (401, True)
    # a revoked node cannot come back through a retry either
    key2 = pki.generate_key(cloud.dir / "r.key")
    csr2 = pki.make_csr(key2).decode()
    token2 = await cloud.token()
    status, body = await _post_enrol(cloud, token2, csr2)
    assert status == 201
    await revoke_node(cloud.running.app, body["node_id"], reason="stolen", actor="test")
    status, answer = await _post_enrol(cloud, token2, csr2)
    assert status == 403, answer
    assert await cloud.store.count_nodes() == 2


# -- the session ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_session_round_trip_exactly_once(cloud: Cloud, tmp_path: Path) -> None:
    node = await cloud.enrol("n")
    chunks = outbox_chunks(tmp_path, [50, 30, 20])
    assert [(c.seq_first, c.seq_count) for c in chunks] == [(0, 50), (50, 30), (80, 20)]
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        welcome = await link.hello()
        assert welcome == {"t": "welcome", "node_id": node.id, "streams": {"raw": 0},
                           "desired_version": 0}
        for c in chunks:
            await link.send(batch(c))
        acked: list[int] = []
        while len(acked) < 3:
            msg = await link.recv()
            assert msg["t"] == "ack"
            acked += msg["ids"]
        assert sorted(acked) == sorted(c.id for c in chunks)
        await link.send(batch(chunks[1]))  # resent (e.g. the ack was lost)
        assert await link.recv() == {"t": "ack", "ids": [chunks[1].id]}
        await link.ws.close()
    stats = await cloud.store.stream_stats(node.id)
    assert [(s.stream, s.contiguous, s.stored_records) for s in stats] == [("raw", 100, 100)]
    stored = await cloud.store.read_chunks(node.id, "raw")
    assert [(c.seq_first, c.seq_count) for c in stored] == [(0, 50), (50, 30), (80, 20)]
    values = np.concatenate([codec.decode(c.payload)["value"] for c in stored])
    assert len(values) == 100
    # reconnect: the welcome carries the contiguous mark; a resend is still acked, not stored
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        assert (await link.hello())["streams"] == {"raw": 100}
        await link.send(batch(chunks[0]))
        assert await link.recv() == {"t": "ack", "ids": [chunks[0].id]}
        await link.ws.close()
    assert len(await cloud.store.read_chunks(node.id, "raw")) == 3
    async with cloud.client() as http:
        text = await (await http.get(f"{cloud.url}/metrics")).text()
    assert 'edgewise_batches_total{outcome="stored"} 3.0' in text
    assert 'edgewise_batches_total{outcome="duplicate"} 2.0' in text
    assert "edgewise_records_total 100.0" in text
    assert "edgewise_duplicate_records_total 80.0" in text
    assert 'edgewise_session_bytes_total{direction="in"}' in text
    wire_in = [ln for ln in text.splitlines()
               if ln.startswith('edgewise_wire_bytes_total{direction="in"}')]
    assert float(wire_in[0].split()[-1]) > sum(len(c.payload) for c in chunks)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_out_of_order_overlaps_gaps_and_bad_payloads(cloud: Cloud, tmp_path: Path) -> None:
    node = await cloud.enrol("n")
    chunks = outbox_chunks(tmp_path, [10, 10, 10, 10])
    c0, c1, c2, c3 = chunks
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        await link.hello()
        await link.send(batch(c2))  # above the mark: stored, the mark stays at 0
        assert await link.recv() == {"t": "ack", "ids": [c2.id]}
        overlapping = batch(c1) | {"id": 99, "seq": 15}  # 15..24 overlaps 20..29 (stored)
        await link.send(overlapping)
        refuse = await link.recv()
        assert (refuse["t"], refuse["id"]) == ("refuse", 99)
        assert "overlaps 20..29, already stored" in refuse["reason"]
        await link.send(batch(c1) | {"id": 98, "payload": b"garbage"})
        refuse = await link.recv()
        assert (refuse["id"], refuse["reason"][:29]) == (98, "payload is not a zstd frame: ")
        wrong_count = codec.encode({"v": np.arange(9, dtype=np.int64)})
        await link.send(batch(c1) | {"id": 97, "payload": wrong_count})
        assert await link.recv() == {"t": "refuse", "id": 97,
                                     "reason": "payload holds 9 records, the batch says 10"}
        # the node dropped c0 under pressure and says so: loss recorded, the mark moves on
        await link.send({"t": "gap", "stream": "raw", "seq": 0, "count": 10,
                         "reason": "outbox full"})
        await link.send(batch(c1))
        assert await link.recv() == {"t": "ack", "ids": [c1.id]}
        await link.send(batch(c0))  # now below the mark: a duplicate, acked, never stored
        assert await link.recv() == {"t": "ack", "ids": [c0.id]}
        await link.send(batch(c3))
        assert await link.recv() == {"t": "ack", "ids": [c3.id]}
        # a gap over a stored chunk and beyond (its ack was lost, then it was evicted): only
        # what the cloud does not hold is recorded as lost, and the session goes on
        await link.send({"t": "gap", "stream": "raw", "seq": 30, "count": 20,
                         "reason": "outbox full"})
        for _ in range(100):
            [s] = await cloud.store.stream_stats(node.id)
            if s.contiguous == 50:
                break
            await asyncio.sleep(0.02)
        await link.send(batch(c3))
        assert await link.recv() == {"t": "ack", "ids": [c3.id]}
        await link.ws.close()
    [s] = await cloud.store.stream_stats(node.id)
    assert (s.contiguous, s.stored_records, s.gap_records) == (50, 30, 20)
    assert [c.seq_first for c in await cloud.store.read_chunks(node.id, "raw")] == [10, 20, 30]
    assert [(g.seq_first, g.seq_count) for g in await cloud.store.list_gaps(node.id)] == [
        (0, 10), (40, 10)]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xc1garbage", "malformed frame: frame is not valid msgpack"),
        (msgpack.packb([1, 2]), "malformed frame: a message must be a map, got list"),
        (msgpack.packb({"t": "nonsense"}), "malformed frame: unknown message type 'nonsense'"),
        (protocol.encode({"t": "ack", "ids": [1]}),
         "malformed frame: unexpected message type 'ack' from a node"),
        (msgpack.packb({"t": "batch", "id": 1, "stream": "raw", "seq": -1, "count": 1,
                        "records": 1, "compacted": False, "payload": b""}),
         "malformed frame: batch with seq=-1 count=1"),
    ],
)
async def test_garbage_gets_error_and_close(cloud: Cloud, frame: bytes, reason: str) -> None:
    node = await cloud.enrol("n")
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        await link.hello()
        await link.ws.send_bytes(frame)
        msg = await link.recv()
        assert msg["t"] == "error"
        assert msg["reason"].startswith(reason), msg["reason"]
        assert await link.closed() == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_first_frame_must_be_hello_and_text_is_refused(cloud: Cloud) -> None:
    node = await cloud.enrol("n")
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        await link.send({"t": "heartbeat", "ts": 1.0})
        msg = await link.recv()
        assert msg == {"t": "error", "reason": "malformed frame: the first message must be "
                                               "hello, not heartbeat"}
        await link.closed()
        link = await session(cloud, http)
        await link.hello()
        await link.ws.send_str("hello")
        assert (await link.recv())["reason"].startswith("malformed frame: text frames")
        await link.closed()
        link = await session(cloud, http)  # says nothing: closed after the hello timeout
        msg = await link.recv()
        assert msg == {"t": "error", "reason": "no hello within 2 s"}


async def test_oversized_frame_is_refused(cloud: Cloud) -> None:
    node = await cloud.enrol("n")
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        await link.hello()
        big = {"t": "batch", "id": 1, "stream": "raw", "seq": 0, "count": 1, "records": 1,
               "compacted": False, "payload": b"\0" * protocol.MAX_FRAME_BYTES}
        await link.send(big)
        # aiohttp drops the connection at once (the node sees an abnormal closure, 1006)
        assert await link.closed() in (aiohttp.WSCloseCode.ABNORMAL_CLOSURE,
                                       aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    assert await cloud.store.read_chunks(node.id, "raw") == []
    async with cloud.client() as http:
        text = await (await http.get(f"{cloud.url}/metrics")).text()
    assert 'edgewise_session_errors_total{reason="transport"} 1.0' in text
    assert len(cloud.running.app[SESSIONS]) == 0


async def test_desired_poke_report_and_revocation_in_session(cloud: Cloud) -> None:
    node = await cloud.enrol("n")
    await cloud.store.put_desired_state(node.id, config={"rate": 1}, actor="test")
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        assert (await link.hello())["desired_version"] == 1
        state = await cloud.store.put_desired_state(node.id, config={"rate": 2}, actor="test")
        assert await cloud.running.app[SESSIONS].notify_desired(node.id, state.version)
        assert await link.recv() == {"t": "desired", "version": 2}
        r = await http.get(f"{cloud.url}/v1/device/desired")
        assert (await r.json())["desired"]["config"] == {"rate": 2}
        r = await http.get(f"{cloud.url}/v1/device/desired", params={"version": "1"})
        assert (await r.json())["desired"]["config"] == {"rate": 1}
        setpoints = LwwMap()
        setpoints.set("limit", 80.5, HLC(1_700_000_000_000, 0, node.id))
        await link.send({"t": "report", "report": ReportedState(2, "running", {"in": 7},
                                                                 setpoints).to_wire()})
        await link.send({"t": "heartbeat", "ts": 1.0})
        for _ in range(50):
            if await cloud.store.get_reported_state(node.id):
                break
            await asyncio.sleep(0.02)
        info = await cloud.store.get_reported_state(node.id)
        assert (info.state.applied_version, info.state.setpoints.to_dict()) == (
            2, {"limit": 80.5})
        assert (await cloud.store.get_node(node.id)).status == "online"
        await revoke_node(cloud.running.app, node.id, reason="stolen", actor="test")
        assert await link.recv() == {"t": "revoked", "reason": "revoked: stolen"}
        await link.closed()
        # the same certificate is refused from now on
        r = await http.get(f"{cloud.url}/v1/device/desired")
        assert r.status == 403
    assert (await cloud.store.get_node(node.id)).status == "revoked"


async def test_new_session_replaces_the_old_one(cloud: Cloud, tmp_path: Path) -> None:
    node = await cloud.enrol("n")
    [c0] = outbox_chunks(tmp_path, [5])
    async with cloud.client(node) as http:
        first = await session(cloud, http)
        await first.hello()
        await first.send(batch(c0))
        assert (await first.recv())["t"] == "ack"
        second = await session(cloud, http)
        assert (await second.hello())["streams"] == {"raw": 5}
        assert await first.recv() == {"t": "error",
                                      "reason": "replaced by a newer session of this node"}
        assert len(cloud.running.app[SESSIONS]) == 1


# -- the security table ---------------------------------------------------------------------


async def _status(cloud: Cloud, node: Node | None, method: str, path: str) -> int:
    async with cloud.client(node) as http:
        r = await http.request(method, f"{cloud.url}{path}", json={})
        return r.status


async def test_security_table(cloud: Cloud, tmp_path: Path) -> None:
    a = await cloud.enrol("a")
    b = await cloud.enrol("b")
    await cloud.store.put_desired_state(a.id, config={"owner": "a"}, actor="t")
    await cloud.store.put_desired_state(b.id, config={"owner": "b"}, actor="t")
    # no client certificate: 401 on every device endpoint that needs one
    for method, path in (("GET", "/v1/device/desired"), ("POST", "/v1/device/renew"),
                         ("GET", protocol.SESSION_PATH)):
        assert await _status(cloud, None, method, path) == 401, path
    # node A asks for B's desired state every way it can: it always gets its own
    async with cloud.client(a) as http:
        for params in ({}, {"node_id": b.id}, {"node": b.id}):
            r = await http.get(f"{cloud.url}/v1/device/desired", params=params,
                               headers={"X-Node-Id": b.id})
            assert (await r.json())["desired"]["config"] == {"owner": "a"}
        r = await http.get(f"{cloud.url}/v1/device/desired/{b.id}")
        assert r.status == 404
    # a certificate from another CA, an expired one: the handshake is refused
    other = CertificateAuthority.create(tmp_path / "other", "edgewise.local")
    key = pki.generate_key(tmp_path / "x.key")
    (tmp_path / "other.pem").write_bytes(other.sign_node_csr(pki.make_csr(key), a.id).pem)
    old = datetime.now(UTC) - timedelta(hours=3)
    (tmp_path / "expired.pem").write_bytes(
        cloud.ca.sign_node_csr(pki.make_csr(key), a.id, timedelta(hours=1), now=old).pem)
    for name in ("other", "expired"):
        bad = Node(a.id, tmp_path / "x.key", tmp_path / f"{name}.pem")
        with pytest.raises(aiohttp.ClientError):
            await _status(cloud, bad, "GET", "/v1/device/desired")
    # revoked: the handshake succeeds, the request gets 403
    await revoke_node(cloud.running.app, b.id, reason="test", actor="t")
    assert await _status(cloud, b, "GET", "/v1/device/desired") == 403
    assert await _status(cloud, b, "GET", protocol.SESSION_PATH) == 403
    assert await _status(cloud, a, "GET", "/v1/device/desired") == 200


# -- renewal and re-authentication ----------------------------------------------------------


async def test_renew_keeps_the_key(cloud: Cloud) -> None:
    node = await cloud.enrol("n")
    key = pki.load_key(node.key)
    async with cloud.client(node) as http:
        r = await http.post(f"{cloud.url}/v1/device/renew",
                            json={"csr": pki.make_csr(key).decode()})
        assert r.status == 200
        new = x509.load_pem_x509_certificate((await r.json())["certificate"].encode())
        assert pki.public_key_fingerprint(new) == pki.public_key_fingerprint(key)
        assert (await cloud.store.get_node(node.id)).cert_serial == new.serial_number
        other_key = pki.generate_key(cloud.dir / "other.key")
        r = await http.post(f"{cloud.url}/v1/device/renew",
                            json={"csr": pki.make_csr(other_key).decode()})
        assert r.status == 400
        assert "renewal keeps the key" in (await r.json())["error"]


async def test_reauth_after_expiry_within_grace(cloud: Cloud) -> None:
    node = await cloud.enrol("n")
    key = pki.load_key(node.key)
    expired = cloud.ca.sign_node_csr(pki.make_csr(key), node.id, timedelta(hours=1),
                                     now=datetime.now(UTC) - timedelta(days=2)).pem.decode()
    url = f"{cloud.url}/v1/device/reauth"

    async def attempt(http: aiohttp.ClientSession, cert: str, sign_with: Any = key,
                      nonce: bytes | None = None) -> tuple[int, dict[str, Any], bytes]:
        if nonce is None:
            r = await http.post(f"{url}/challenge", json={"node_id": node.id})
            nonce = base64.b64decode((await r.json())["nonce"])
        r = await http.post(url, json={
            "node_id": node.id, "nonce": base64.b64encode(nonce).decode(),
            "signature": base64.b64encode(pki.sign_challenge(sign_with, nonce)).decode(),
            "certificate": cert, "csr": pki.make_csr(key).decode()})
        return r.status, await r.json(), nonce

    async with cloud.client() as http:  # no client certificate: it expired
        status, body, nonce = await attempt(http, expired)
        assert status == 200, body
        assert (await cloud.store.get_node(node.id)).cert_serial == \
            x509.load_pem_x509_certificate(body["certificate"].encode()).serial_number
        status, body, _ = await attempt(http, expired, nonce=nonce)  # nonces are single use
        assert (status, body["error"]) == (
            401, "unknown, used or expired challenge nonce; ask for a new one")
        status, body, _ = await attempt(http, expired, sign_with=pki.generate_key(
            cloud.dir / "thief.key"))
        assert (status, body["error"]) == (401, "proof-of-possession signature does not verify")
        too_old = cloud.ca.sign_node_csr(pki.make_csr(key), node.id, timedelta(hours=1),
                                         now=datetime.now(UTC) - timedelta(days=9)).pem.decode()
        status, body, _ = await attempt(http, too_old)
        assert status == 401
        assert "beyond the grace period" in body["error"]
        await revoke_node(cloud.running.app, node.id, reason="x", actor="t")
        status, body, _ = await attempt(http, expired)
        assert status == 403


async def test_healthz_and_openapi_need_no_certificate(cloud: Cloud) -> None:
    async with cloud.client() as http:
        r = await http.get(f"{cloud.url}/healthz")
        assert (r.status, (await r.json())["status"]) == (200, "ok")
        spec = await (await http.get(f"{cloud.url}/openapi.json")).json()
        assert {"/v1/device/enrol", "/v1/device/renew", "/v1/device/reauth",
                "/v1/device/reauth/challenge", "/v1/device/desired",
                "/v1/device/session"} <= set(spec["paths"])
    assert cloud.running.app[STORE] is cloud.store


async def test_session_ends_when_its_certificate_expires(cloud: Cloud, tmp_path: Path) -> None:
    node = await cloud.enrol("n")
    short = cloud.ca.sign_node_csr(pki.make_csr(pki.load_key(node.key)), node.id,
                                   timedelta(seconds=1.5))
    (tmp_path / "short.pem").write_bytes(short.pem)
    brief = Node(node.id, node.key, tmp_path / "short.pem")
    async with cloud.client(brief) as http:
        link = await session(cloud, http)
        await link.hello()
        for _ in range(50):  # the status goes with the next group write (every 0.05 s here)
            if (await cloud.store.get_node(node.id)).status == "online":
                break
            await asyncio.sleep(0.02)
        assert (await cloud.store.get_node(node.id)).status == "online"
        msg = await link.recv()  # the maintenance task (every 0.2 s here) closes it
        assert msg == {"t": "error", "reason": "certificate expired: renew it and reconnect"}
        await link.closed()
    for _ in range(50):
        if (await cloud.store.get_node(node.id)).status == "offline":
            break
        await asyncio.sleep(0.02)
    assert (await cloud.store.get_node(node.id)).status == "offline"


async def test_shutdown_tells_live_sessions(cloud: Cloud, tmp_path: Path) -> None:
    node = await cloud.enrol("n")
    [c0] = outbox_chunks(tmp_path, [5])
    async with cloud.client(node) as http:
        link = await session(cloud, http)
        await link.hello()
        await link.send(batch(c0))
        assert await link.recv() == {"t": "ack", "ids": [c0.id]}
        stop = asyncio.create_task(cloud.running.stop())
        assert await link.recv() == {"t": "error", "reason": "the control plane is shutting down"}
        await link.closed()
        await stop


async def test_a_session_upgrade_reads_the_store_only_once_admitted(
        cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a reconnect storm every upgrade read its node from the store before asking for a
    start slot; those reads queued on the read connections until they timed out and the storm
    collapsed (issue 11). An upgrade told to retry now reads nothing, and one whose node the
    store refuses gives its slot back."""
    node = await cloud.enrol("n")
    registry = cloud.running.app[SESSIONS]
    reads: list[str] = []
    get_node = cloud.store.get_node

    async def counted(node_id: str) -> Any:
        reads.append(node_id)
        return await get_node(node_id)

    monkeypatch.setattr(cloud.store, "get_node", counted)
    adm = registry.admission
    adm.admit_wait = 0.05
    adm.starting = adm.limit()  # every start slot taken
    async with cloud.client(node) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
        assert refused.value.status == 429
        assert reads == []  # no store read for an upgrade that was not admitted
        adm.starting = 0
        await revoke_node(cloud.running.app, node.id, reason="test", actor="test")
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
    assert adm.starting == 0  # the refused node's slot came back
