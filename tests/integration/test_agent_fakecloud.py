"""A small control plane that speaks the device protocol (docs/decisions/0004), for agent tests.

Real TLS 1.3 with certificates from `edgewise.security.pki`, real aiohttp server on 127.0.0.1,
the node identity from the verified TLS session. It stores batches by (node, stream, seq) and
counts how often each sequence number was stored, so tests can assert exactly-once. Knobs let a
test cut the link mid-stream, revoke a node, push desired state, and issue certificates in the
past. Imported by the other ``test_agent_*`` integration modules; the tests at the bottom check
the fake itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgewise.errors import PeerError
from edgewise.security import pki, tls
from edgewise.sync import codec
from edgewise.sync import protocol as P
from edgewise.sync.twin_state import DesiredState


@dataclass
class NodeRecord:
    node_id: str
    fingerprint: str
    labels: dict[str, str] = field(default_factory=dict)


class FakeCloud:
    """Start with ``async with FakeCloud(tmp_path) as cloud:``; ``cloud.url``, ``cloud.ca_path``."""

    def __init__(
        self,
        tmp: Path,
        *,
        grace: timedelta = timedelta(days=7),
        cert_lifetime: timedelta = timedelta(hours=24),
        port: int | None = None,
    ) -> None:
        self.dir = tmp / "fakecloud"
        self.ca = pki.CertificateAuthority.create(self.dir / "ca", "test.local")
        key, issued = self.ca.issue_server_cert(["localhost"], ["127.0.0.1"])
        pki.save_key(self.dir / "server.key", key)
        pki.write_atomic(self.dir / "server.pem", issued.pem)
        self.ca_path = self.dir / "ca" / pki.CA_CERT_FILE
        self.grace = grace
        self.cert_lifetime = cert_lifetime
        self.issue_at: datetime | None = None  # issue certificates as of this time (tests)
        self.port = port
        self.revocations = tls.RevocationList()
        self.tokens: dict[str, int] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.nonces: dict[str, str] = {}  # nonce b64 -> node id
        self.desired: dict[str, DesiredState] = {}
        # what arrived
        self.stored: dict[tuple[str, str], dict[int, int]] = {}  # (node, stream) -> seq -> times
        self.gaps: dict[tuple[str, str], set[int]] = {}
        self.batches: list[tuple[str, str, int, int, int]] = []  # node, stream, seq, count, id
        self.gap_msgs: list[dict[str, Any]] = []
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self.heartbeats = 0
        self.hellos: list[dict[str, Any]] = []
        self.duplicates = 0
        self.records: dict[tuple[str, str], int] = {}
        self.counts = {"enrol": 0, "renew": 0, "reauth": 0, "sessions": 0, "refused_401": 0,
                       "refused_403": 0, "desired_get": 0}
        # knobs
        self.abort_after_batches: int | None = None  # abort the TCP connection once, unacked
        self.ack_delay = 0.0
        self.refuse_ids: set[int] = set()
        # the session upgrade: None answers it; "silent" never answers; "drip" sends an answer
        # head a byte at a time (each read well within any read timeout)
        self.upgrade_answer: str | None = None
        # Retry-After values: each enrolment attempt answers 429 with the next one, while any
        self.enrol_busy: list[str] = []
        self.enrol_times: list[float] = []  # time.monotonic() of every enrolment attempt
        self.sessions: dict[str, web.WebSocketResponse] = {}
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- setup ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def token(self, uses: int = 1) -> str:
        t = "ewe_" + secrets.token_urlsafe(32)
        self.tokens[t] = uses
        return t

    async def __aenter__(self) -> FakeCloud:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(client_max_size=P.MAX_FRAME_BYTES)
        app.router.add_post("/v1/device/enrol", self.enrol)
        app.router.add_post("/v1/device/renew", self.renew)
        app.router.add_post("/v1/device/reauth/challenge", self.challenge)
        app.router.add_post("/v1/device/reauth", self.reauth)
        app.router.add_get("/v1/device/desired", self.get_desired)
        app.router.add_get(P.SESSION_PATH, self.session)
        ctx = tls.server_context(self.dir / "server.pem", self.dir / "server.key", self.ca_path,
                                 require_client_cert=False)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port or 0))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ctx).start()

    async def stop(self) -> None:
        for ws in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await ws.close()
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- helpers ----------------------------------------------------------------------------
    def _now(self) -> datetime | None:
        return self.issue_at

    def _peer(self, request: web.Request) -> str:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        try:
            return tls.authenticate_peer(ssl_obj, self.ca.trust_domain, self.revocations)
        except tls.CertificateRevoked as exc:
            self.counts["refused_403"] += 1
            raise web.HTTPForbidden(text=f'{{"error": "{exc}"}}',
                                    content_type="application/json") from None
        except PeerError as exc:
            self.counts["refused_401"] += 1
            raise web.HTTPUnauthorized(text=f'{{"error": "{exc}"}}',
                                       content_type="application/json") from None

    @staticmethod
    def _error(status: int, text: str) -> web.Response:
        return web.json_response({"error": text}, status=status)

    def revoke(self, node_id: str) -> None:
        """Revoke the node's key; a live session gets ``revoked`` and is closed."""
        self.revocations.revoke_key(self.nodes[node_id].fingerprint)
        ws = self.sessions.get(node_id)
        if ws is not None:
            self._spawn(self._send_and_close(ws, {"t": P.REVOKED,
                                                  "reason": "revoked by an operator"}))

    async def _send_and_close(self, ws: web.WebSocketResponse, msg: dict[str, Any]) -> None:
        await ws.send_bytes(P.encode(msg))
        await ws.close()

    def set_desired(self, node_id: str, state: DesiredState) -> None:
        self.desired[node_id] = state
        ws = self.sessions.get(node_id)
        if ws is not None and not ws.closed:
            self._spawn(ws.send_bytes(P.encode({"t": P.DESIRED, "version": state.version})))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def mark(self, node: str, stream: str) -> int:
        have = set(self.stored.get((node, stream), {})) | self.gaps.get((node, stream), set())
        m = 0
        while m in have:
            m += 1
        return m

    def stored_seqs(self, node: str, stream: str) -> dict[int, int]:
        return self.stored.get((node, stream), {})

    def issue(self, csr: bytes | str, node_id: str) -> pki.IssuedCert:
        return self.ca.sign_node_csr(csr, node_id, self.cert_lifetime, now=self._now())

    # -- endpoints --------------------------------------------------------------------------
    async def enrol(self, request: web.Request) -> web.Response:
        self.enrol_times.append(time.monotonic())
        if self.enrol_busy:
            return web.json_response({"error": "enrolment queue full"}, status=429,
                                     headers={"Retry-After": self.enrol_busy.pop(0)})
        body = await request.json()
        token = body.get("token")
        if self.tokens.get(token, 0) <= 0:
            return self._error(401, "enrolment token unknown, expired or used up")
        self.tokens[token] -= 1
        node_id = f"node-{len(self.nodes) + 1}"
        try:
            issued = self.issue(body["csr"], node_id)
        except PeerError as exc:
            return self._error(400, str(exc))
        self.nodes[node_id] = NodeRecord(node_id, issued.fingerprint)
        self.counts["enrol"] += 1
        return web.json_response({
            "node_id": node_id, "certificate": issued.pem.decode(),
            "ca": self.ca.cert_pem.decode(), "trust_domain": self.ca.trust_domain,
            "expires_at": issued.not_after.isoformat(),
        }, status=201)

    async def renew(self, request: web.Request) -> web.Response:
        node_id = self._peer(request)
        body = await request.json()
        if pki.public_key_fingerprint(body["csr"]) != self.nodes[node_id].fingerprint:
            return self._error(400, "renewal must keep the same key")
        issued = self.issue(body["csr"], node_id)
        self.counts["renew"] += 1
        return web.json_response({"certificate": issued.pem.decode(),
                                  "expires_at": issued.not_after.isoformat()})

    async def challenge(self, request: web.Request) -> web.Response:
        body = await request.json()
        nonce = base64.b64encode(os.urandom(32)).decode()
        self.nonces[nonce] = body["node_id"]
        return web.json_response({"nonce": nonce})

    async def reauth(self, request: web.Request) -> web.Response:
        body = await request.json()
        node_id = body["node_id"]
        if self.nonces.pop(body["nonce"], None) != node_id:
            return self._error(401, "unknown or used nonce")
        rec = self.nodes.get(node_id)
        if rec is None:
            return self._error(401, "unknown node")
        try:
            cert = pki._as_cert(body["certificate"])
            if self.revocations.is_revoked(cert):
                return self._error(403, "node revoked")
            named = self.ca.verify_node_cert(cert, grace=self.grace)
            if named != node_id or pki.public_key_fingerprint(cert) != rec.fingerprint:
                return self._error(401, "certificate does not belong to this node")
            pki.verify_challenge(cert, base64.b64decode(body["nonce"]),
                                 base64.b64decode(body["signature"]))
            if pki.public_key_fingerprint(body["csr"]) != rec.fingerprint:
                return self._error(400, "CSR of another key")
        except PeerError as exc:
            return self._error(401, str(exc))
        issued = self.issue(body["csr"], node_id)
        self.counts["reauth"] += 1
        return web.json_response({"certificate": issued.pem.decode(),
                                  "expires_at": issued.not_after.isoformat()})

    async def get_desired(self, request: web.Request) -> web.Response:
        node_id = self._peer(request)
        self.counts["desired_get"] += 1
        state = self.desired.get(node_id)
        if state is None:
            return web.json_response({"version": 0, "desired": None})
        return web.json_response({"version": state.version, "desired": state.to_wire()})

    async def session(self, request: web.Request) -> web.StreamResponse:
        node_id = self._peer(request)
        if self.upgrade_answer is not None:
            self.counts["sessions"] += 1
            await self._stall_upgrade(request)
            return web.Response(status=503)  # not sent: the client has gone
        ws = web.WebSocketResponse(max_msg_size=P.MAX_FRAME_BYTES)
        await ws.prepare(request)
        self.counts["sessions"] += 1
        self.sessions[node_id] = ws
        try:
            first = await ws.receive(timeout=5)
            if first.type != aiohttp.WSMsgType.BINARY:
                return ws
            hello = P.decode(first.data)
            assert hello["t"] == P.HELLO
            self.hellos.append(hello)
            streams = {s: self.mark(node_id, s) for s in hello["streams"]}
            desired = self.desired.get(node_id)
            await ws.send_bytes(P.encode({
                "t": P.WELCOME, "node_id": node_id, "streams": streams,
                "desired_version": desired.version if desired else 0,
            }))
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                m = P.decode(msg.data)
                if m["t"] == P.BATCH:
                    if self.abort_after_batches is not None:
                        if self.abort_after_batches <= 0:
                            self.abort_after_batches = None
                            assert request.transport is not None
                            request.transport.abort()  # the link dies: nothing acked
                            return ws
                        self.abort_after_batches -= 1
                    await self._batch(ws, node_id, m)
                elif m["t"] == P.GAP:
                    self.gap_msgs.append(m)
                    self.gaps.setdefault((node_id, m["stream"]), set()).update(
                        range(m["seq"], m["seq"] + m["count"]))
                elif m["t"] == P.REPORT:
                    self.reports.append((node_id, m["report"]))
                elif m["t"] == P.HEARTBEAT:
                    self.heartbeats += 1
        finally:
            if self.sessions.get(node_id) is ws:
                del self.sessions[node_id]
        return ws

    async def _stall_upgrade(self, request: web.Request) -> None:
        """Answer the upgrade as `upgrade_answer` says, until the client hangs up."""
        transport = request.transport
        assert transport is not None
        if self.upgrade_answer == "drip":  # one header line, a byte every 50 ms: 8 KiB in 7 min
            transport.write(b"HTTP/1.1 101 Switching Protocols\r\nX-Drip: ")
        while not transport.is_closing():
            if self.upgrade_answer == "drip":
                transport.write(b".")
            await asyncio.sleep(0.05)

    async def _batch(self, ws: web.WebSocketResponse, node: str, m: dict[str, Any]) -> None:
        self.batches.append((node, m["stream"], m["seq"], m["count"], m["id"]))
        if m["id"] in self.refuse_ids:
            await ws.send_bytes(P.encode({"t": P.REFUSE, "id": m["id"],
                                          "reason": "refused by the test"}))
            return
        cols = codec.decode(m["payload"])
        n = len(next(iter(cols.values()))) if cols else 0
        assert n == m["records"], (n, m["records"])
        seqs = self.stored.setdefault((node, m["stream"]), {})
        if all(s in seqs for s in range(m["seq"], m["seq"] + m["count"])):
            self.duplicates += 1
        else:
            for s in range(m["seq"], m["seq"] + m["count"]):
                seqs[s] = seqs.get(s, 0) + 1
            key = (node, m["stream"])
            self.records[key] = self.records.get(key, 0) + m["records"]
        if self.ack_delay:
            await asyncio.sleep(self.ack_delay)
        await ws.send_bytes(P.encode({"t": P.ACK, "ids": [m["id"]]}))


async def wait_for(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond()`` every 20 ms until true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# -- checks of the fake itself --------------------------------------------------------------------


async def test_fake_refuses_a_session_without_client_certificate(tmp_path: Path) -> None:
    async with FakeCloud(tmp_path) as cloud:
        ctx = tls.client_context(cloud.ca_path)
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(cloud.url.replace("https", "wss") + P.SESSION_PATH, ssl=ctx)
        assert err.value.status == 401
        assert cloud.counts["refused_401"] == 1


async def test_fake_speaks_tls13_only(tmp_path: Path) -> None:
    async with FakeCloud(tmp_path) as cloud:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cloud.ca_path)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                await s.get(cloud.url + "/v1/device/desired", ssl=ctx)
