"""The control plane's release routes over real TLS (its own app and store, SQLite and
PostgreSQL): publishing (files first, 409 naming the missing ones, a version never reused with
other content, roles), blobs stored only when their bytes hash to their name, the nodes' TUF
routes (client certificate required, only release data, metadata by version), the TUF root in
the enrolment answer, and re-signing before expiry."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import httpx
import pytest
from tuf.api.metadata import Metadata

from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import CloudConfig
from edgewise.cloud.releases.api import RELEASES
from edgewise.cloud.releases.blobs import BlobMismatch
from edgewise.cloud.releases.keys import init_keys, rotate_keys
from edgewise.cloud.store import Store
from edgewise.errors import ConfigError
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken, OperatorToken
from edgewise.sync.release import Manifest, ReleaseFile

pytestmark = pytest.mark.asyncio

DATA = b"weights" * 1000
SHA = hashlib.sha256(DATA).hexdigest()
PIPE = b"name: line\n"
PIPE_SHA = hashlib.sha256(PIPE).hexdigest()
MANIFEST = Manifest("1.0.0", (ReleaseFile("models/w.bin", SHA, len(DATA), "model"),
                              ReleaseFile("pipelines/line.yaml", PIPE_SHA, len(PIPE),
                                          "pipeline")), {"t": 1})


@dataclass
class Cloud:
    dir: Path
    running: Running
    store: Store
    http: httpx.AsyncClient
    tokens: dict[str, str]

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def put_blob(self, data: bytes, sha: str, role: str = "operator") -> httpx.Response:
        return await self.http.put(f"/v1/releases/blobs/{sha}", content=data,
                                   headers=self.auth(role))

    async def publish(self, manifest: bytes, role: str = "operator") -> httpx.Response:
        return await self.http.post("/v1/releases", content=manifest, headers=self.auth(role))

    async def enrol(self) -> tuple[dict, Path, Path]:
        _plain, record = EnrolmentToken.issue({"site": "a"}, timedelta(hours=1), 1)
        plain = _plain.get_secret_value()
        await self.store.add_enrolment_token(record)
        key_path = self.dir / "node.key"
        key = pki.generate_key(key_path, overwrite=True)
        ctx = client_context(self.dir / "pki" / "ca.pem")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            r = await http.post(f"{self.running.url}/v1/device/enrol", json={
                "token": plain, "csr": pki.make_csr(key).decode()})
            assert r.status == 201, await r.text()
            body = await r.json()
        cert = self.dir / "node.pem"
        cert.write_text(body["certificate"])
        return body, cert, key_path

    def device(self, cert: Path | None = None, key: Path | None = None
               ) -> aiohttp.ClientSession:
        ctx = client_context(self.dir / "pki" / "ca.pem", cert, key)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def db(backend: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("postgres") if backend == "postgres" else None


@pytest.fixture
async def cloud(tmp_path: Path, db: str | None) -> AsyncIterator[Cloud]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, db=db)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        ctx = ssl.create_default_context(cafile=str(boot.ca_path))
        try:
            async with httpx.AsyncClient(base_url=running.url, verify=ctx, timeout=10) as http:
                assert boot.admin_token is not None
                tokens = {"admin": boot.admin_token}
                for role in ("operator", "viewer"):
                    plain, rec = OperatorToken.issue(f"{role}-1", role)
                    await store.add_operator_token(rec)
                    tokens[role] = plain.get_secret_value()
                yield Cloud(config.data_dir, running, store, http, tokens)
        finally:
            await running.stop()


def blob_files(cloud: Cloud) -> list[str]:
    root = cloud.dir / "releases" / "blobs"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_publish_flow(cloud: Cloud, tmp_path: Path) -> None:
    data = MANIFEST.to_bytes()
    r = await cloud.publish(data)
    assert r.status_code == 400 and "no online TUF keys" in r.json()["error"]
    await init_keys(tmp_path / "root", cloud.dir, cloud.store)

    r = await cloud.publish(data)
    assert r.status_code == 409
    assert r.json()["missing"] == sorted([SHA, PIPE_SHA])

    # a blob whose bytes do not hash to its name is not stored; nor a short one
    r = await cloud.put_blob(DATA[:-1] + b"X", SHA)
    assert r.status_code == 400 and "the bytes have sha256" in r.json()["error"]
    blobs = cloud.running.app[RELEASES].blobs  # a stream longer than declared stops there
    pieces = [DATA[:5000], DATA[5000:]]

    async def read(n: int) -> bytes:
        return pieces.pop(0) if pieces else b""

    with pytest.raises(BlobMismatch, match="more than the 6000 bytes declared"):
        await blobs.receive(SHA, 6000, read)
    assert blob_files(cloud) == []
    r = await cloud.put_blob(DATA, SHA, role="viewer")
    assert r.status_code == 403
    r = await cloud.put_blob(DATA, "../" + SHA)  # the client resolves it: /v1/releases/<sha>
    assert r.status_code == 405
    r = await cloud.put_blob(DATA, SHA.upper())
    assert r.status_code == 400 and "64 lowercase hex" in r.json()["error"]
    assert blob_files(cloud) == []

    r = await cloud.put_blob(DATA, SHA)
    assert (r.status_code, r.json()) == (201, {"sha256": SHA, "stored": True})
    r = await cloud.put_blob(DATA, SHA)
    assert (r.status_code, r.json()) == (200, {"sha256": SHA, "stored": False})
    r = await cloud.publish(data)
    assert r.status_code == 409 and r.json()["missing"] == [PIPE_SHA]
    assert (await cloud.put_blob(PIPE, PIPE_SHA)).status_code == 201
    assert blob_files(cloud) == sorted([SHA, PIPE_SHA])

    assert (await cloud.publish(data, role="viewer")).status_code == 403
    r = await cloud.publish(data)
    assert r.status_code == 201, r.text
    assert r.json()["new"] is True
    assert r.json()["release"]["digest"] == MANIFEST.digest()
    assert r.json()["release"]["files"] == 2 and r.json()["release"]["bytes"] == 7011
    r = await cloud.publish(data)
    assert r.status_code == 200 and r.json()["new"] is False
    other = Manifest("1.0.0", MANIFEST.files[:1]).to_bytes()
    r = await cloud.publish(other)
    assert r.status_code == 409 and "exists with other content" in r.json()["error"]
    r = await cloud.publish(data.replace(b'"format":1', b'"format": 1'))
    assert r.status_code == 400 and "not in canonical form" in r.json()["error"]

    r = await cloud.http.get("/v1/releases", headers=cloud.auth("viewer"))
    assert [x["version"] for x in r.json()["releases"]] == ["1.0.0"]
    r = await cloud.http.get("/v1/releases/1.0.0", headers=cloud.auth("viewer"))
    assert r.json()["manifest"]["files"][0]["sha256"] == SHA
    r = await cloud.http.get("/v1/releases/2.0.0", headers=cloud.auth("viewer"))
    assert r.status_code == 404
    assert (await cloud.http.get("/v1/releases")).status_code == 401

    top = await cloud.store.tuf_top()
    assert top is not None
    # keys init signed targets v1 (empty); the release is targets v2 with 3 targets
    assert [top.version(x) for x in ("root", "targets", "snapshot", "timestamp")] == [1, 2, 2, 2]
    assert sorted(Metadata.from_bytes(top.targets).signed.targets) == sorted([
        f"blobs/{PIPE_SHA}", f"blobs/{SHA}", "releases/1.0.0/manifest.json"])
    audit = await cloud.store.list_audit(target="release:1.0.0")
    assert [a.action for a in audit] == ["release.publish"]


async def test_device_routes_and_enrolment_root(cloud: Cloud, tmp_path: Path) -> None:
    body, cert, key = await cloud.enrol()
    assert body["tuf_root"] is None  # no keys made yet
    await init_keys(tmp_path / "root", cloud.dir, cloud.store)
    body, cert, key = await cloud.enrol()
    assert body["tuf_root"].encode() == (tmp_path / "root" / "1.root.json").read_bytes()
    url = cloud.running.url + "/v1/device/tuf/"

    async with cloud.device() as http:  # no client certificate
        r = await http.get(url + "timestamp.json")
        assert r.status == 401
    async with cloud.device(cert, key) as http:
        r = await http.get(url + "1.root.json")
        assert r.status == 200 and await r.read() == body["tuf_root"].encode()
        r = await http.get(url + "timestamp.json")
        assert r.status == 200
        assert Metadata.from_bytes(await r.read()).signed.version == 1
        assert (await http.get(url + "1.targets.json")).status == 200
        assert (await http.get(url + "1.snapshot.json")).status == 200
        for missing in ("2.root.json", "0.root.json", "root.json", "2.targets.json",
                        "x.json", "targets/blobs/" + SHA, "targets/blobs/..%2f..%2fcli.json",
                        "targets/releases/1.0.0/manifest.json"):
            r = await http.get(url + missing)
            assert r.status == 404, missing
        # an operator token is not a way in
        r = await http.get(url + "timestamp.json",
                           headers={"Authorization": f"Bearer {cloud.tokens['admin']}"})
        assert r.status == 200  # it is the certificate that counts, the header is ignored


async def test_a_node_certificate_is_no_way_into_the_operator_release_routes(
        cloud: Cloud, tmp_path: Path) -> None:
    """An enrolled node's client certificate opens the TUF routes only: listing, reading,
    uploading and publishing releases need an operator token (401), and nothing is stored."""
    await init_keys(tmp_path / "root", cloud.dir, cloud.store)
    _, cert, key = await cloud.enrol()
    url = cloud.running.url
    async with cloud.device(cert, key) as http:
        for method, path, data in (("GET", "/v1/releases", None),
                                   ("GET", "/v1/releases/1.0.0", None),
                                   ("PUT", f"/v1/releases/blobs/{SHA}", DATA),
                                   ("POST", "/v1/releases", MANIFEST.to_bytes())):
            r = await http.request(method, url + path, data=data)
            body = await r.json()
            assert (r.status, r.headers["WWW-Authenticate"]) == (401, 'Bearer realm="edgewise"')
            assert "no operator token" in body["error"], (method, path, body)
    assert blob_files(cloud) == []
    assert await cloud.store.list_releases() == []


async def test_timestamp_is_re_signed_before_it_expires(cloud: Cloud, tmp_path: Path) -> None:
    await init_keys(tmp_path / "root", cloud.dir, cloud.store)
    service = cloud.running.app[RELEASES]
    assert await service.resign() is not None
    top = await cloud.store.tuf_top()
    assert top is not None and top.version("timestamp") == 1  # nothing due yet
    service.clock = lambda: datetime.now(UTC) + timedelta(hours=13)
    top = await service.resign()
    assert top is not None
    assert [top.version(x) for x in ("targets", "snapshot", "timestamp")] == [1, 1, 2]
    service.clock = lambda: datetime.now(UTC) + timedelta(days=5)
    top = await service.resign()
    assert top is not None
    assert [top.version(x) for x in ("targets", "snapshot", "timestamp")] == [2, 2, 3]
    actions = [a.action for a in await cloud.store.list_audit(target="tuf")]
    assert actions == ["tuf.resign", "tuf.resign", "tuf.keys.init"]


async def test_large_upload_streams_past_the_json_body_limit(cloud: Cloud, tmp_path: Path
                                                             ) -> None:
    big = os.urandom(9 << 20)  # over the 8 MiB the app reads into memory for a request
    sha = hashlib.sha256(big).hexdigest()
    r = await cloud.put_blob(big, sha)
    assert (r.status_code, r.json()) == (201, {"sha256": sha, "stored": True})
    assert (cloud.dir / "releases" / "blobs" / sha[:2] / sha).read_bytes() == big


async def test_rotating_the_root_keys(cloud: Cloud, tmp_path: Path) -> None:
    root_dir = tmp_path / "root"
    made = await init_keys(root_dir, cloud.dir, cloud.store)
    (first,) = made.root_keys
    online_before = (cloud.dir / "tuf" / "keys" / "targets.key").read_bytes()
    rotated = await rotate_keys(root_dir, cloud.dir, cloud.store, online=False, new_root=True)
    assert rotated.root_version == 2
    (second,) = rotated.root_keys
    assert second != first and not Path(first).exists()
    assert (root_dir / f"retired-{Path(first).name}").exists()
    assert (cloud.dir / "tuf" / "keys" / "targets.key").read_bytes() == online_before
    assert sorted(p.name for p in root_dir.iterdir() if p.suffix == ".new") == []
    v1 = Metadata.from_bytes((root_dir / "1.root.json").read_bytes())
    v2 = Metadata.from_bytes((root_dir / "2.root.json").read_bytes())
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # the old key signed it
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # and the new one
    top = await cloud.store.tuf_top()
    assert top is not None and top.root == (root_dir / "2.root.json").read_bytes()
    assert [top.version(x) for x in ("targets", "snapshot", "timestamp")] == [2, 2, 2]
    # the next rotation needs the new root key only (the retired one is not read)
    third = await rotate_keys(root_dir, cloud.dir, cloud.store)
    assert third.root_version == 3
    assert (cloud.dir / "tuf" / "keys" / "targets.key").read_bytes() != online_before
    # a folder with other root keys cannot rotate this repository
    stranger = tmp_path / "stranger"
    async with Store(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}") as other:
        await init_keys(stranger, tmp_path / "other-data", other)
    with pytest.raises(ConfigError, match="sign 0 of the 1 signatures root version 3 needs"):
        await rotate_keys(stranger, cloud.dir, cloud.store)
    assert not list((cloud.dir / "tuf" / "keys").glob("*.new"))
