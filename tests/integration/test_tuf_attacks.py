"""The TUF attack table, mirroring python-tuf's own tests: every attack on release metadata or a
release file is refused with the expected error, and nothing is written where the file was asked
for.

The repository is made with our repository code (`edgewise.security.tuf.repository`: root,
publish, rotation) and served by a local aiohttp server over mutual TLS (a test CA, a node
certificate), under the paths the control plane uses (``/v1/device/tuf/...``); the client is the
node's real `ReleaseFetcher` (``tuf.ngclient`` behind `MtlsFetcher`). Each case starts from a
node that has refreshed once against the honest repository (so it trusts versions it must
not go back from), then mounts its attack and runs one step of the node: refresh, a manifest, or
a file into ``dest``.

The last cases show that the refusals come from the protection: the same forged metadata is
accepted while the root still names the compromised key, and refused once the root is rotated.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

from edgewise.edge.release_fetcher import ReleaseFetcher
from edgewise.errors import TransportError, UpdateRefused
from edgewise.security import pki
from edgewise.security.pki import CertificateAuthority
from edgewise.security.tls import client_context, server_context
from edgewise.security.tuf import client as tuf_client
from edgewise.security.tuf import keys as tk
from edgewise.security.tuf import repository as repo
from edgewise.security.tuf.repository import TopMetadata
from edgewise.sync.release import Manifest, ReleaseFile, blob_target, manifest_target

pytestmark = pytest.mark.asyncio

PREFIX = "/v1/device/tuf/"
VERSION = "1.0.0"
BLOB = b"model weights " * 1000
SHA = hashlib.sha256(BLOB).hexdigest()


@dataclass
class Repo:
    """An honest repository (signers, newest metadata) and what the server serves."""

    root_signers: list[CryptoSigner]
    online: dict[str, CryptoSigner]
    top: TopMetadata
    served: dict[str, bytes] = field(default_factory=dict)
    targets: dict[str, tuple[int, str]] = field(default_factory=dict)
    manifest: bytes = b""
    history: list[TopMetadata] = field(default_factory=list)  # every state served, oldest first

    @classmethod
    def create(cls) -> Repo:
        roots = [tk.generate()]
        online = {r: tk.generate() for r in repo.ONLINE_ROLES}
        root = repo.new_root(roots, {r: s.public_key for r, s in online.items()}, now=now())
        r = cls(roots, online, TopMetadata(root))
        r.served["1.root.json"] = root
        manifest = Manifest(VERSION, (ReleaseFile("models/m.bin", SHA, len(BLOB), "model"),))
        r.manifest = manifest.to_bytes()
        r.served["targets/" + manifest_target(VERSION)] = r.manifest
        r.served["targets/" + blob_target(SHA)] = BLOB
        r.targets = {manifest_target(VERSION): (len(r.manifest), manifest.digest()),
                     blob_target(SHA): (len(BLOB), SHA)}
        r.publish()
        return r

    def serve(self, top: TopMetadata) -> None:
        for role in ("targets", "snapshot"):
            self.served[f"{top.version(role)}.{role}.json"] = getattr(top, role)
        self.served[f"{top.version('root')}.root.json"] = top.root
        self.served["timestamp.json"] = top.timestamp  # type: ignore[assignment]
        self.top = top
        self.history.append(top)

    def publish(self, *, when: datetime | None = None) -> TopMetadata:
        top = repo.publish(self.top, self.targets, self.online, now=when or now())
        self.serve(top)
        return top


def now() -> datetime:
    return datetime.now(UTC)


def sign(signed: object, *signers: CryptoSigner) -> bytes:
    md = Metadata(signed)  # type: ignore[arg-type]
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes()


def signed_of(data: bytes) -> object:
    return Metadata.from_bytes(data).signed


def later(days: float = 1) -> datetime:
    return (now() + timedelta(days=days)).replace(microsecond=0)


# -- the attacks ----------------------------------------------------------------------------------
# each mounts itself on the repository the node already trusts (timestamp/snapshot/targets v1)


def rollback_timestamp(r: Repo) -> None:
    """The node has seen timestamp v2; it is sent v1 again (a valid, unexpired old one)."""
    r.served["timestamp.json"] = r.history[0].timestamp  # type: ignore[assignment]


def rollback_snapshot(r: Repo) -> None:
    """The node has seen snapshot v2; a new, validly signed timestamp names snapshot v1."""
    snapshot_v1 = r.history[0].snapshot
    assert snapshot_v1 is not None
    r.served["timestamp.json"] = sign(
        Timestamp(version=r.top.version("timestamp") + 5, expires=later(),
                  snapshot_meta=MetaFile.from_data(1, snapshot_v1, ["sha256"])),
        r.online["timestamp"])


def rollback_targets(r: Repo) -> None:
    """The node has seen targets v2; a new, validly signed snapshot names targets v1."""
    targets_v1 = r.history[0].targets
    assert targets_v1 is not None
    snap = Snapshot(version=r.top.version("snapshot") + 1, expires=later(),
                    meta={"targets.json": MetaFile.from_data(1, targets_v1, ["sha256"])})  # type: ignore[arg-type]
    _serve_snapshot(r, sign(snap, r.online["snapshot"]))


def _serve_snapshot(r: Repo, snapshot: bytes) -> None:
    version = signed_of(snapshot).version  # type: ignore[attr-defined]
    r.served[f"{version}.snapshot.json"] = snapshot
    r.served["timestamp.json"] = sign(
        Timestamp(version=r.top.version("timestamp") + 1, expires=later(),
                  snapshot_meta=MetaFile.from_data(version, snapshot, ["sha256"])),
        r.online["timestamp"])


def freeze(r: Repo) -> None:
    """A timestamp that expired (a replay of an old one, re-served after its day)."""
    r.publish(when=now() - timedelta(days=2))


def mix_and_match(r: Repo) -> None:
    """The new snapshot names targets v2 (by version, length and hash); the server gives the
    node targets v1, properly signed, from an older state of the repository."""
    r.publish()
    old = r.history[0].targets
    assert old is not None
    r.served[f"{r.top.version('targets')}.targets.json"] = old


def arbitrary_blob(r: Repo) -> None:
    r.served["targets/" + blob_target(SHA)] = bytes(reversed(BLOB))  # same length, other bytes


def arbitrary_manifest(r: Repo) -> None:
    other = Manifest(VERSION, (ReleaseFile("models/m.bin", "cd" * 32, len(BLOB), "model"),))
    data = other.to_bytes()
    assert len(data) == len(r.manifest)
    r.served["targets/" + manifest_target(VERSION)] = data


def endless_blob(r: Repo) -> None:
    r.served["targets/" + blob_target(SHA)] = BLOB + b"\0" * 10_000_000


def endless_timestamp(r: Repo) -> None:
    r.served["timestamp.json"] = b"{" + b" " * 20_000_000 + b"}"


def endless_targets(r: Repo) -> None:
    """The snapshot gives the targets' length; a longer targets file is cut off there."""
    r.publish()
    v = r.top.version("targets")
    r.served[f"{v}.targets.json"] = r.top.targets + b" " * 1_000_000  # type: ignore[operator]


def timestamp_bad_signature(r: Repo) -> None:
    r.publish()
    ts = signed_of(r.top.timestamp)  # type: ignore[arg-type]
    r.served["timestamp.json"] = sign(ts, tk.generate())  # a key the root does not name


def timestamp_tampered(r: Repo) -> None:
    r.publish()
    md = Metadata.from_bytes(r.top.timestamp)  # type: ignore[arg-type]
    md.signed.version += 1  # the signature no longer covers what is sent
    r.served["timestamp.json"] = md.to_bytes()


def targets_bad_signature(r: Repo) -> None:
    """Snapshot and timestamp keys sign, the targets are signed by a key the root does not
    name (its holder adds a file of theirs)."""
    evil = dict(r.targets) | {blob_target("ab" * 32): (5, "ab" * 32)}
    files = {n: TargetFile(length, {"sha256": sha}, n) for n, (length, sha) in evil.items()}
    targets = sign(Targets(version=r.top.version("targets") + 1, expires=later(30),
                           targets=files), tk.generate())
    v = r.top.version("targets") + 1
    r.served[f"{v}.targets.json"] = targets
    snap = Snapshot(version=r.top.version("snapshot") + 1, expires=later(),
                    meta={"targets.json": MetaFile.from_data(v, targets, ["sha256"])})
    _serve_snapshot(r, sign(snap, r.online["snapshot"]))


def root_not_signed_by_old_keys(r: Repo) -> None:
    """A root version 2 signed only by a new root key: the node trusts no such rotation."""
    mine = tk.generate()
    data = repo.rotate_root(r.top.root, r.root_signers, now=now(), new_root_signers=[mine])
    md = Metadata.from_bytes(data)
    md.signatures.clear()
    md.sign(mine)
    r.served["2.root.json"] = md.to_bytes()


def forged_with_stolen_keys(r: Repo) -> None:
    """The online keys are stolen and the thief signs targets with a file of theirs, a
    snapshot and a timestamp. (Accepted while the root names those keys: see the next test.)"""
    _forge(r, r.online)


def _forge(r: Repo, stolen: dict[str, CryptoSigner]) -> None:
    evil_blob = b"evil" * 100
    sha = hashlib.sha256(evil_blob).hexdigest()
    r.served["targets/" + blob_target(sha)] = evil_blob
    evil = dict(r.targets) | {blob_target(sha): (len(evil_blob), sha)}
    files = {n: TargetFile(length, {"sha256": s}, n) for n, (length, s) in evil.items()}
    v = r.top.version("targets") + 10
    targets = sign(Targets(version=v, expires=later(30), targets=files), stolen["targets"])
    r.served[f"{v}.targets.json"] = targets
    sv = r.top.version("snapshot") + 10
    snapshot = sign(Snapshot(version=sv, expires=later(),
                             meta={"targets.json": MetaFile.from_data(v, targets, ["sha256"])}),
                    stolen["snapshot"])
    r.served[f"{sv}.snapshot.json"] = snapshot
    r.served["timestamp.json"] = sign(
        Timestamp(version=r.top.version("timestamp") + 10, expires=later(),
                  snapshot_meta=MetaFile.from_data(sv, snapshot, ["sha256"])),
        stolen["timestamp"])
    r.evil_sha = sha  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Case:
    name: str
    mount: Callable[[Repo], None]
    step: str  # refresh | manifest | blob
    error: str  # regex of the UpdateRefused message
    second_refresh: bool = False  # bring the node to the repository's newest state first


CASES = [
    Case("rollback: timestamp version goes back", rollback_timestamp, "refresh",
         "BadVersionNumberError", second_refresh=True),
    Case("rollback: new timestamp names an older snapshot", rollback_snapshot, "refresh",
         "BadVersionNumberError", second_refresh=True),
    Case("rollback: new snapshot names an older targets", rollback_targets, "refresh",
         "BadVersionNumberError", second_refresh=True),
    Case("freeze: expired timestamp", freeze, "refresh", "ExpiredMetadataError"),
    Case("mix-and-match: targets not the one the snapshot names", mix_and_match, "refresh",
         "LengthOrHashMismatchError"),
    Case("arbitrary package: file with another hash", arbitrary_blob, "blob",
         "LengthOrHashMismatchError"),
    Case("arbitrary package: another manifest", arbitrary_manifest, "manifest",
         "LengthOrHashMismatchError"),
    Case("endless data: file longer than signed", endless_blob, "blob",
         "DownloadLengthMismatchError"),
    Case("endless data: timestamp beyond its bound", endless_timestamp, "refresh",
         "DownloadLengthMismatchError"),
    Case("endless data: targets longer than the snapshot says", endless_targets, "refresh",
         "DownloadLengthMismatchError"),
    Case("bad signature: timestamp by an unknown key", timestamp_bad_signature, "refresh",
         "UnsignedMetadataError"),
    Case("bad signature: timestamp changed after signing", timestamp_tampered, "refresh",
         "UnsignedMetadataError"),
    Case("bad signature: targets by an unknown key", targets_bad_signature, "refresh",
         "UnsignedMetadataError"),
    Case("bad signature: root rotation without the old root keys",
         root_not_signed_by_old_keys, "refresh", "UnsignedMetadataError"),
]


# -- the server and the node ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    server: object
    client: object


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    d = tmp_path_factory.mktemp("tuf-tls")
    ca = CertificateAuthority.create(d / "ca", "edgewise.local")
    key, server = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    pki.save_key(d / "server.key", key)
    pki.write_atomic(d / "server.pem", server.pem)
    node_key = pki.generate_key(d / "node.key")
    pki.write_atomic(d / "node.pem", ca.sign_node_csr(pki.make_csr(node_key), "node-1").pem)
    return Tls(server_context(d / "server.pem", d / "server.key", d / "ca" / "ca.pem"),
               client_context(d / "ca" / "ca.pem", d / "node.pem", d / "node.key"))


@pytest.fixture
async def served(tls: Tls) -> object:
    state: dict[str, Any] = {"slow": set()}  # "repo"; "slow": the paths sent a byte per 50 ms

    async def get(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        data = state["repo"].served.get(tail)
        if data is None:
            raise web.HTTPNotFound()
        if tail not in state["slow"]:
            return web.Response(body=data)
        answer = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await answer.prepare(request)
        for i in range(len(data)):  # ends when the node hangs up (the write fails)
            await answer.write(data[i:i + 1])
            await asyncio.sleep(0.05)
        return answer

    app = web.Application()
    app.router.add_get(PREFIX + "{tail:.+}", get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server)  # type: ignore[arg-type]
    await site.start()
    port = runner.addresses[0][1]
    yield state, f"https://127.0.0.1:{port}"
    await runner.cleanup()


def fetcher(tmp_path: Path, url: str, tls: Tls, r: Repo) -> ReleaseFetcher:
    return ReleaseFetcher(tmp_path / "meta", url, tls.client, r.served["1.root.json"])  # type: ignore[arg-type]


async def honest_start(tmp_path: Path, url: str, tls: Tls, r: Repo) -> ReleaseFetcher:
    f = fetcher(tmp_path, url, tls, r)
    await asyncio.to_thread(f.refresh)
    assert (await asyncio.to_thread(f.manifest, VERSION)).to_bytes() == r.manifest
    return f


def dest_untouched(dest: Path) -> None:
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == []  # no temp file left either


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_attack_is_refused(case: Case, tmp_path: Path, served: object, tls: Tls) -> None:
    state, url = served  # type: ignore[misc]
    r = state["repo"] = Repo.create()
    f = await honest_start(tmp_path, url, tls, r)
    if case.second_refresh:
        r.publish()
        await asyncio.to_thread(f.refresh)
    case.mount(r)
    out = tmp_path / "slot"
    out.mkdir()
    dest = out / "m.bin"
    f = fetcher(tmp_path, url, tls, r)  # as a node would after a restart: trusted state on disk
    with pytest.raises(UpdateRefused, match=case.error) as info:
        if case.step == "refresh":
            await asyncio.to_thread(f.refresh)
        else:
            await asyncio.to_thread(f.refresh)
            if case.step == "manifest":
                await asyncio.to_thread(f.manifest, VERSION)
            else:
                await asyncio.to_thread(f.fetch_blob, SHA, dest)
    assert str(info.value).count("refused by TUF verification") == 1
    dest_untouched(dest)


async def test_honest_updates_pass_the_same_checks(tmp_path: Path, served: object,
                                                   tls: Tls) -> None:
    """The control: without an attack, the node follows new versions and fetches the file."""
    state, url = served  # type: ignore[misc]
    r = state["repo"] = Repo.create()
    await honest_start(tmp_path, url, tls, r)
    r.publish()
    r.publish()
    f = fetcher(tmp_path, url, tls, r)
    await asyncio.to_thread(f.refresh)
    dest = tmp_path / "m.bin"
    await asyncio.to_thread(f.fetch_blob, SHA, dest)
    assert dest.read_bytes() == BLOB
    assert Metadata.from_bytes((tmp_path / "meta" / "timestamp.json").read_bytes()
                               ).signed.version == 3


@pytest.mark.timeout(60)
async def test_a_file_sent_a_byte_at_a_time_is_given_up(
        tmp_path: Path, served: object, tls: Tls, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow retrieval: every read makes progress well within the read timeout, but a byte per
    50 ms would take 700 s for the file. Under the fetcher's floor (here 1,000 bytes/s after
    1 s) the download is given up (`TransportError`: the updater tries again later) and
    nothing is written; before, the node waited for the last byte."""
    monkeypatch.setattr(tuf_client, "MIN_RATE", 1000)
    monkeypatch.setattr(tuf_client, "SLOW_GRACE_S", 1.0)
    state, url = served  # type: ignore[misc]
    r = state["repo"] = Repo.create()
    f = await honest_start(tmp_path, url, tls, r)
    state["slow"].add("targets/" + blob_target(SHA))
    dest = tmp_path / "slot" / "m.bin"
    dest.parent.mkdir()
    with pytest.raises(TransportError, match="under the 1000 bytes/s a download must average"):
        await asyncio.to_thread(f.fetch_blob, SHA, dest)
    dest_untouched(dest)


async def test_stolen_online_keys_work_until_root_rotation(tmp_path: Path, served: object,
                                                           tls: Tls) -> None:
    """A compromised online key replaced by root rotation: forged metadata signed with the
    stolen keys is accepted while root v1 names them (the threat is real), and refused once
    the root is rotated to new online keys (the rotation is the protection)."""
    state, url = served  # type: ignore[misc]
    r = state["repo"] = Repo.create()
    await honest_start(tmp_path / "before", url, tls, r)
    stolen = dict(r.online)
    forged_with_stolen_keys(r)
    f = fetcher(tmp_path / "before", url, tls, r)
    await asyncio.to_thread(f.refresh)
    evil = tmp_path / "before" / "evil.bin"
    await asyncio.to_thread(f.fetch_blob, r.evil_sha, evil)  # type: ignore[attr-defined]
    assert evil.read_bytes() == b"evil" * 100  # accepted: the root still trusts those keys

    # the operator rotates: root v2 (signed by the root key) names new online keys, and the
    # repository is signed again with them
    r2 = state["repo"] = Repo.create()
    await honest_start(tmp_path / "after", url, tls, r2)
    stolen = dict(r2.online)
    new_online = {role: tk.generate() for role in repo.ONLINE_ROLES}
    root2 = repo.rotate_root(r2.top.root, r2.root_signers, now=now(),
                             online={k: s.public_key for k, s in new_online.items()})
    r2.online = new_online
    top = repo.refresh(replace(r2.top, root=root2), new_online, now=now(), force=True)
    assert top is not None
    r2.serve(top)
    f = fetcher(tmp_path / "after", url, tls, r2)
    await asyncio.to_thread(f.refresh)  # the node follows the rotation
    assert (tmp_path / "after" / "meta" / "root_history" / "2.root.json").read_bytes() == root2

    _forge(r2, stolen)  # the thief tries again with the keys root v2 no longer names
    dest = tmp_path / "after" / "slot" / "evil.bin"
    dest.parent.mkdir()
    f = fetcher(tmp_path / "after", url, tls, r2)
    with pytest.raises(UpdateRefused, match="UnsignedMetadataError"):
        await asyncio.to_thread(f.refresh)
    with pytest.raises(UpdateRefused, match="UnsignedMetadataError"):
        await asyncio.to_thread(f.fetch_blob, r2.evil_sha, dest)  # type: ignore[attr-defined]
    dest_untouched(dest)


async def test_the_fetcher_needs_the_node_certificate(tmp_path: Path, served: object,
                                                      tls: Tls) -> None:
    """The server asks for the client certificate; without one there is no connection."""
    from edgewise.errors import TransportError

    state, url = served  # type: ignore[misc]
    r = state["repo"] = Repo.create()
    ctx = ssl.create_default_context()  # no client certificate
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    f = ReleaseFetcher(tmp_path / "meta", url, ctx, r.served["1.root.json"])
    with pytest.raises(TransportError):
        await asyncio.to_thread(f.refresh)
    assert os.listdir(tmp_path / "meta") in (["root_history", "root.json"],
                                             ["root.json", "root_history"])
