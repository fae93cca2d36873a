"""Input hardening of both APIs over real TLS on 127.0.0.1 (the control plane's own app and
SQLite store): JSON errors everywhere, whole bodies up to a documented limit (413 above),
strict JSON (no NaN/Infinity, bounded nesting and integers), security schemes in the served
OpenAPI document, only enrolled nodes authenticate, one key is one node, the per-node
request rate of the device API (429 with Retry-After), and the cap on connections without a
client certificate with the read timeout (the end-to-end version with 1,000 connections is
tests/e2e/test_connection_limits.py)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from openapi_spec_validator import validate

from edgewise.cloud.app import GATE_METRICS, Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig, ServerLimits
from edgewise.cloud.store import Store
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import protocol

RATE, BURST = 2.0, 4  # the device API's rate limit in these tests


@dataclass
class Node:
    id: str
    key: ec.EllipticCurvePrivateKey
    cert: Path
    key_path: Path


@dataclass
class Cloud:
    dir: Path
    running: Running
    store: Store
    ca: CertificateAuthority
    admin: str

    @property
    def url(self) -> str:
        return self.running.url

    def http(self, node: Node | None = None, **kw: Any) -> httpx.AsyncClient:
        files = (node.cert, node.key_path) if node else (None, None)
        ctx = client_context(self.dir / "pki" / "ca.pem", *files)
        return httpx.AsyncClient(base_url=self.url, verify=ctx, timeout=20, **kw)

    async def op(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                 **kw: Any) -> httpx.Response:
        async with self.http() as http:
            return await http.request(method, path, headers={
                **(headers or {}), "Authorization": f"Bearer {self.admin}"}, **kw)

    async def token(self, uses: int = 1) -> str:
        plain, record = EnrolmentToken.issue({"site": "a"}, timedelta(hours=1), uses)
        await self.store.add_enrolment_token(record)
        return plain.get_secret_value()

    async def enrol(self, name: str, key: ec.EllipticCurvePrivateKey | None = None,
                    token: str | None = None) -> httpx.Response:
        key_path = self.dir / f"{name}.key"
        if key is None:
            key = pki.generate_key(key_path)
        body = {"token": token or await self.token(), "csr": pki.make_csr(key).decode()}
        async with self.http() as http:
            return await http.post("/v1/device/enrol", json=body)

    async def node(self, name: str) -> Node:
        r = await self.enrol(name)
        assert r.status_code == 201, r.text
        cert = self.dir / f"{name}.pem"
        cert.write_text(r.json()["certificate"])
        key_path = self.dir / f"{name}.key"
        return Node(r.json()["node_id"], pki.load_key(key_path), cert, key_path)


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the one-key test runs on PostgreSQL too


@pytest.fixture
def db(backend: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("postgres") if backend == "postgres" else None


@pytest.fixture
async def cloud(tmp_path: Path, db: str | None) -> AsyncIterator[Cloud]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, db=db,
                         server=ServerLimits(device_rate=RATE, device_burst=BURST))
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            assert boot.admin_token is not None
            yield Cloud(config.data_dir, running, store, boot.ca, boot.admin_token)
        finally:
            await running.stop()


def is_json_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    message = r.json()["error"]
    for w in words:
        assert w in message, message


# -- d) JSON 404 / 405 everywhere --------------------------------------------------------------


async def test_unknown_paths_and_methods_answer_json(cloud: Cloud) -> None:
    async with cloud.http() as http:
        for path in ("/nope", "/v1/device/nope", "/v1/nodes/x/y/z"):
            is_json_error(await http.get(path), 404, "no such endpoint")
        r = await http.delete("/v1/config")
        is_json_error(r, 405, "DELETE", "GET", "PUT")
        assert set(r.headers["Allow"].split(",")) >= {"GET", "PUT"}
        is_json_error(await http.post("/healthz"), 405, "allowed: GET")


# -- a) huge integers and deep nesting: 400, not a plain-text 500 ------------------------------


async def test_huge_integers_and_deep_nesting_are_400(cloud: Cloud) -> None:
    node = await cloud.node("a")
    huge = str(10**30)
    r = await cloud.op("GET", "/v1/data/query",
                       params={"node": node.id, "stream": "raw", "from_seq": huge})
    is_json_error(r, 400, "from_seq")
    r = await cloud.op("GET", "/v1/audit", params={"before_id": huge})
    is_json_error(r, 400, "before_id")
    async with cloud.http(node) as http:
        is_json_error(await http.get("/v1/device/desired", params={"version": huge}), 400,
                      "version")
    deep = f'{{"node": "{node.id}", "config": {{"x": {"[" * 100_000}1{"]" * 100_000}}}}}'
    r = await cloud.op("PUT", "/v1/config", content=deep,
                       headers={"Content-Type": "application/json"})
    is_json_error(r, 400, "nested deeper than 64")
    nested: Any = 1
    for _ in range(70):  # parses fine, but deeper than the limit
        nested = [nested]
    r = await cloud.op("PUT", "/v1/config", json={"node": node.id, "config": {"x": nested}})
    is_json_error(r, 400, "nested deeper than 64 levels at config.x[0][0]")
    async with cloud.http() as http:
        r = await http.post("/v1/device/reauth/challenge", content="[" * 30_000 + "]" * 30_000)
        is_json_error(r, 400, "nested deeper than 64")


# -- b) whole bodies up to the documented limit, 413 above -------------------------------------


async def test_big_bodies_are_read_whole_up_to_the_limit(cloud: Cloud) -> None:
    node = await cloud.node("a")
    for mib in (1, 2, 7):  # valid JSON of 1-8 MiB used to be refused as "not JSON"
        blob = "x" * (mib * 1024 * 1024)
        r = await cloud.op("PUT", "/v1/config", json={"node": node.id, "config": {"blob": blob}})
        assert r.status_code == 200, (mib, r.text[:300])
    stored = await cloud.store.get_desired_state(node.id)
    assert stored is not None and len(stored.config["blob"]) == 7 * 1024 * 1024
    r = await cloud.op("PUT", "/v1/config",
                       json={"node": node.id, "config": {"blob": "x" * (9 * 1024 * 1024)}})
    is_json_error(r, 413, "over 8 MiB")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        yield b'{"node": "' + node.id.encode() + b'", "config": {"blob": "'
        for _ in range(9):
            yield b"y" * (1024 * 1024)
        yield b'"}}'

    r = await cloud.op("PUT", "/v1/config", content=chunked(),
                       headers={"Content-Type": "application/json"})
    is_json_error(r, 413, "over 8 MiB")
    async with cloud.http() as http:
        r = await http.post("/v1/device/enrol", json={"token": "x" * (70 * 1024), "csr": ""})
        is_json_error(r, 413, "over 64 KiB")


# -- c) NaN / Infinity: refused, naming the field ----------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ('{"config": {"gain": NaN}}', "config.gain"),
    ('{"config": {"limits": [1, 2, Infinity]}}', "config.limits[2]"),
    ('{"setpoints": {"temp": -Infinity}}', "setpoints.temp"),
    ('{"config": {"a": 1}, "expires_in_s": Infinity}', "expires_in_s"),
])
async def test_nan_and_infinity_are_refused_naming_the_field(cloud: Cloud, body: str,
                                                             field: str) -> None:
    node = await cloud.node("a")
    text = f'{{"node": "{node.id}", {body[1:]}'
    r = await cloud.op("PUT", "/v1/config", content=text,
                       headers={"Content-Type": "application/json"})
    is_json_error(r, 400, field)
    assert await cloud.store.get_desired_state(node.id) is None  # nothing stored, nothing sent
    r = await cloud.op("GET", "/v1/data/query",
                       params={"node": node.id, "stream": "raw", "since": "nan"})
    is_json_error(r, 400, "since")


# -- e) security schemes in the served document ------------------------------------------------


async def test_openapi_declares_and_attaches_security_schemes(cloud: Cloud) -> None:
    async with cloud.http() as http:
        doc = (await http.get("/openapi.json")).json()
    validate(doc)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["operatorToken"] == {**schemes["operatorToken"], "type": "http",
                                        "scheme": "bearer"}
    assert schemes["deviceCertificate"]["type"] == "mutualTLS"
    paths = doc["paths"]
    assert paths["/v1/nodes"]["get"]["security"] == [{"operatorToken": []}]
    assert paths["/v1/tokens/operator"]["post"]["security"] == [{"operatorToken": []}]
    assert paths["/v1/device/desired"]["get"]["security"] == [{"deviceCertificate": []}]
    assert paths[protocol.SESSION_PATH]["get"]["security"] == [{"deviceCertificate": []}]
    assert paths["/v1/device/enrol"]["post"]["security"] == []
    assert paths["/healthz"]["get"]["security"] == []
    for path, item in paths.items():
        for method, op in item.items():
            assert "security" in op, (method, path)
            for requirement in op["security"]:
                assert set(requirement) <= set(schemes), (method, path)


# -- f) only enrolled nodes authenticate -------------------------------------------------------


async def test_certificate_for_a_node_never_enrolled_is_refused(cloud: Cloud) -> None:
    await cloud.node("real")
    key_path = cloud.dir / "ghost.key"
    key = pki.generate_key(key_path)
    issued = cloud.ca.sign_node_csr(pki.make_csr(key), "node-ghost0000001")
    ghost = Node("node-ghost0000001", key, cloud.dir / "ghost.pem", key_path)
    ghost.cert.write_bytes(issued.pem)
    async with cloud.http(ghost) as http:
        is_json_error(await http.get("/v1/device/desired"), 401, "not enrolled")
        r = await http.post("/v1/device/renew", json={"csr": pki.make_csr(key).decode()})
        is_json_error(r, 401, "not enrolled")
    ctx = client_context(cloud.dir / "pki" / "ca.pem", ghost.cert, ghost.key_path)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
        assert e.value.status == 401
    # a certificate of a known id with a key that is not the node's: refused too
    other = pki.generate_key(cloud.dir / "other.key")
    real = (await cloud.store.list_nodes())[0]
    forged = cloud.dir / "forged.pem"
    forged.write_bytes(cloud.ca.sign_node_csr(pki.make_csr(other), real.id).pem)
    async with cloud.http(Node(real.id, other, forged, cloud.dir / "other.key")) as http:
        is_json_error(await http.get("/v1/device/desired"), 401, "not the key registered")


# -- g) one key, one node ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_one_key_cannot_enrol_as_two_nodes(cloud: Cloud) -> None:
    key = pki.generate_key(cloud.dir / "k.key")
    first = await cloud.enrol("k", key=key)
    assert first.status_code == 201, first.text
    # the same key with another token (or the same multi-use token): refused, token unused
    spare = await cloud.token(uses=1)
    is_json_error(await cloud.enrol("k2", key=key, token=spare), 409, "already enrolled")
    multi = await cloud.token(uses=5)
    is_json_error(await cloud.enrol("k3", key=key, token=multi), 409, "already enrolled")
    assert [n.id for n in await cloud.store.list_nodes()] == [first.json()["node_id"]]
    other = await cloud.enrol("fresh", token=spare)  # the refused request left it unused
    assert other.status_code == 201, other.text
    # a lost-answer retry of the same single-use token and key is answered as before (401)
    again = await cloud.enrol("k4", key=key, token=spare)
    is_json_error(again, 401, "used up")
    async with cloud.http() as http:
        metrics = (await http.get("/metrics")).text
    assert 'edgewise_enrolments_total{outcome="KeyInUse"} 2.0' in metrics
    # two enrolments of one new key at once: exactly one node
    racer = pki.generate_key(cloud.dir / "racer.key")
    tokens = [await cloud.token() for _ in range(4)]
    answers = await asyncio.gather(*(cloud.enrol(f"r{i}", key=racer, token=t)
                                     for i, t in enumerate(tokens)))
    assert sorted(a.status_code for a in answers) == [201, 409, 409, 409], \
        [a.text for a in answers]


# -- the per-node request rate -----------------------------------------------------------------


async def test_device_requests_over_the_node_rate_get_429(cloud: Cloud) -> None:
    a, b = await cloud.node("a"), await cloud.node("b")
    async with cloud.http(a) as http_a, cloud.http(b) as http_b:
        codes = [(await http_a.get("/v1/device/desired")).status_code for _ in range(BURST)]
        assert codes == [200] * BURST
        r = await http_a.get("/v1/device/desired")
        is_json_error(r, 429, "request rate")
        assert 1 <= int(r.headers["Retry-After"]) <= 1 + int(1 / RATE)
        # the session upgrade counts too; another node is not affected
        ctx = client_context(cloud.dir / "pki" / "ca.pem", a.cert, a.key_path)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as ws_http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await ws_http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
            assert e.value.status == 429
        assert (await http_b.get("/v1/device/desired")).status_code == 200
        await asyncio.sleep(1.2 / RATE)  # a token is back
        assert (await http_a.get("/v1/device/desired")).status_code == 200


async def test_bodies_and_errors_stay_json_when_the_handler_fails(cloud: Cloud) -> None:
    async with cloud.http() as http:
        r = await http.post("/v1/device/reauth/challenge", content=b"\xff\xfe not json")
        is_json_error(r, 400, "not JSON")
        r = await http.post("/v1/device/reauth/challenge", content=json.dumps([1, 2]))
        is_json_error(r, 400, "JSON object")


# -- connections: the cap on unauthenticated ones and the read timeout ----------------------


async def _tls(cloud: Cloud, node: Node | None = None
               ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    files = (node.cert, node.key_path) if node else (None, None)
    ctx = client_context(cloud.dir / "pki" / "ca.pem", *files)
    return await asyncio.open_connection("127.0.0.1", cloud.running.port, ssl=ctx,
                                         server_hostname="127.0.0.1")


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


async def test_cap_counts_connections_without_a_certificate(tmp_path: Path) -> None:
    limits = ServerLimits(max_unauthenticated=3, read_timeout=1.0, idle_timeout=5.0)
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, server=limits)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            assert boot.admin_token is not None
            cloud = Cloud(config.data_dir, running, store, boot.ca, boot.admin_token)
            node = await cloud.node("a")
            gate = running.app[GATE_METRICS].gate
            assert gate is not None
            await asyncio.sleep(0.2)  # the enrolment's connection is gone
            device = await _tls(cloud, node)  # a node: verified certificate, not counted
            anonymous = [await _tls(cloud) for _ in range(3)]
            assert gate.unauthenticated == 3
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await _tls(cloud)  # over the cap: closed at once
            assert gate.refused == 1
            # sending nothing after the handshake: closed by the read timeout (1 s)
            assert all([await _closed_within(r, 3.0) for r, _ in anonymous])
            assert gate.unauthenticated == 0 and gate.read_timeouts >= 3
            # the node's idle connection was closed the same way (no request in 1 s)...
            assert await _closed_within(device[0], 1.0)
            # ...while its session lives on past every timeout
            ctx = client_context(cloud.dir / "pki" / "ca.pem", node.cert, node.key_path)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
                ws = await http.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
                await ws.send_bytes(protocol.encode({
                    "t": "hello", "agent": "t/1", "streams": {}, "applied_version": 0}))
                assert protocol.decode((await ws.receive(timeout=5)).data)["t"] == "welcome"
                await asyncio.sleep(limits.read_timeout + 1.5)
                await ws.send_bytes(protocol.encode({"t": "heartbeat", "ts": 1.0}))
                await asyncio.sleep(0.3)
                assert not ws.closed
                await ws.close()
            for _, w in [device, *anonymous]:
                w.close()
        finally:
            await running.stop()
