"""TPM enrolment and attestation through the control plane's device API over real TLS
(in-process control plane, swtpm): a certificate only for the challenged TPM, a copied TLS key
cannot attest (quarantined, visible in the fleet view), one TPM one node, attestation: none and
--require-attestation."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import swtpm
from edgewise.cloud.app import Running, start
from edgewise.cloud.bootstrap import bootstrap
from edgewise.cloud.config import AttestationSettings, CloudConfig
from edgewise.cloud.store import Store
from edgewise.edge.tpm_node import TpmNode
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.security.tokens import EnrolmentToken
from edgewise.security.tpm.measure import agent_code_digest

swtpm_factory = swtpm.swtpm_factory  # fixture
TIMEOUT = aiohttp.ClientTimeout(total=30)
AGENT = agent_code_digest()


@dataclass
class Cloud:
    dir: Path
    running: Running
    store: Store

    async def token(self) -> str:
        plain, record = EnrolmentToken.issue({"site": "p1"}, timedelta(hours=1), 1)
        await self.store.add_enrolment_token(record)
        return plain.get_secret_value()

    def http(self, key: Path | None = None, cert: Path | None = None) -> aiohttp.ClientSession:
        ctx = client_context(self.dir / "pki" / "ca.pem", cert, key)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=TIMEOUT)

    async def post(self, path: str, body: dict[str, Any], key: Path | None = None,
                   cert: Path | None = None) -> tuple[int, dict[str, Any]]:
        async with self.http(key, cert) as http:
            r = await http.post(self.running.url + path, json=body)
            return r.status, await r.json()


async def _cloud(tmp_path: Path, settings: AttestationSettings) -> AsyncIterator[Cloud]:
    config = CloudConfig(data_dir=tmp_path / "cloud", port=0, maintenance_interval=0.2,
                         node_write_interval=0.05, attestation=settings)
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host="127.0.0.1",
                               trust_domain="edgewise.local")
        running = await start(config, boot.ca, store=store)
        try:
            yield Cloud(config.data_dir, running, store)
        finally:
            await running.stop()


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    async for c in _cloud(tmp_path, AttestationSettings(agents=(AGENT,))):
        yield c


async def enrol(cloud: Cloud, node: TpmNode, key_path: Path) -> tuple[str, Path]:
    """TPM enrolment of the TLS key at ``key_path``; returns (node id, certificate path)."""
    key = pki.generate_key(key_path)
    token = await cloud.token()
    status, challenge = await cloud.post("/v1/device/enrol/tpm", {
        "token": token, **node.enrolment_evidence(pki.make_csr(key))})
    assert status == 200, challenge
    status, body = await cloud.post("/v1/device/enrol/tpm/finish", {
        "token": token, "challenge": challenge["challenge"],
        "answers": node.activate(challenge)})
    assert status == 201, body
    cert = key_path.with_suffix(".pem")
    cert.write_text(body["certificate"])
    return body["node_id"], cert


async def attest(cloud: Cloud, node: TpmNode, key: Path, cert: Path) -> dict[str, Any]:
    status, challenge = await cloud.post("/v1/device/attest/challenge", {}, key, cert)
    assert status == 200, challenge
    status, verdict = await cloud.post("/v1/device/attest", node.evidence(challenge), key, cert)
    assert status == 200, verdict
    return verdict


async def quarantine_of(cloud: Cloud, node_id: str) -> str | None:
    node = await cloud.store.get_node(node_id)
    return (await cloud.store.fleet_rows([node]))[0].quarantine


async def test_tpm_node_enrols_attests_and_a_copied_key_is_quarantined(
    cloud: Cloud, swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    with TpmNode(swtpm_factory("a"), tmp_path / "a") as a, \
            TpmNode(swtpm_factory("b"), tmp_path / "b") as b:
        node_id, cert = await enrol(cloud, a, tmp_path / "a" / "node.key")
        record = await cloud.store.tpm_of(node_id)
        assert record is not None and record.ak_public == a.ak.public_area()
        a.measure(AGENT, None)
        verdict = await attest(cloud, a, tmp_path / "a" / "node.key", cert)
        assert (verdict["attestation"], verdict["quarantined"], verdict["measurements"]) == \
            ("tpm", False, {"agent": AGENT})
        assert await quarantine_of(cloud, node_id) is None
        # the TLS key and certificate copied to machine b: the session opens, attestation fails
        b.measure(AGENT, None)
        verdict = await attest(cloud, b, tmp_path / "a" / "node.key", cert)
        assert verdict["quarantined"] and verdict["reason"] == (
            "quote signature does not verify with the node's registered attestation key")
        assert await quarantine_of(cloud, node_id) == verdict["reason"]
        assert (await cloud.store.tpm_of(node_id)).verdict == verdict
        # the real node attests again: the attestation's own quarantine is lifted
        verdict = await attest(cloud, a, tmp_path / "a" / "node.key", cert)
        assert not verdict["quarantined"]
        assert await quarantine_of(cloud, node_id) is None
        # an operator's quarantine is never lifted by an attestation
        await cloud.store.set_quarantine(node_id, "operator says so", actor="op")
        assert not (await attest(cloud, a, tmp_path / "a" / "node.key", cert))["quarantined"]
        assert await quarantine_of(cloud, node_id) == "operator says so"


async def test_tpm_enrolment_refused_without_the_challenged_tpm(
    cloud: Cloud, swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    with TpmNode(swtpm_factory("a"), tmp_path / "a") as a, \
            TpmNode(swtpm_factory("b"), tmp_path / "b") as b:
        key = pki.generate_key(tmp_path / "k1.key")
        token = await cloud.token()
        evidence = a.enrolment_evidence(pki.make_csr(key))
        status, body = await cloud.post("/v1/device/enrol/tpm",
                                        {**evidence, "token": "not-a-token"})
        assert status == 401, body  # a token of the wrong form: no challenge made
        # another TLS key's CSR under a's binding: refused
        other = pki.make_csr(pki.generate_key(tmp_path / "k2.key")).decode()
        status, body = await cloud.post("/v1/device/enrol/tpm",
                                        {"token": token, **evidence, "csr": other})
        assert (status, body["error"]) == (
            401, "binding: the CSR is not signed by the TPM node key")
        status, challenge = await cloud.post("/v1/device/enrol/tpm",
                                             {"token": token, **evidence})
        assert status == 200
        with pytest.raises(Exception, match="activating"):
            b.activate(challenge)  # b has not got a's EK
        status, body = await cloud.post("/v1/device/enrol/tpm/finish", {
            "token": token, "challenge": challenge["challenge"],
            "answers": ["AAAA", "AAAA"]})
        assert (status, body["error"]) == (
            401, "TPM challenge: wrong answer (not the challenged TPM)")
        # the token was not used: the node with the TPM enrols with it... once per TPM
        await enrol(cloud, a, tmp_path / "a.key")
        status, challenge = await cloud.post("/v1/device/enrol/tpm", {
            "token": (t := await cloud.token()),
            **a.enrolment_evidence(pki.make_csr(pki.generate_key(tmp_path / "a2.key")))})
        assert status == 200
        status, body = await cloud.post("/v1/device/enrol/tpm/finish", {
            "token": t, "challenge": challenge["challenge"], "answers": a.activate(challenge)})
        assert status == 409 and "already enrolled as another node" in body["error"]


async def test_node_without_tpm_is_attestation_none_and_refused_when_required(
    tmp_path: Path,
) -> None:
    async for cloud in _cloud(tmp_path / "open", AttestationSettings()):
        key = pki.generate_key(tmp_path / "plain.key")
        status, body = await cloud.post("/v1/device/enrol", {
            "token": await cloud.token(), "csr": pki.make_csr(key).decode()})
        assert status == 201
        cert = tmp_path / "plain.pem"
        cert.write_text(body["certificate"])
        status, verdict = await cloud.post("/v1/device/attest", {}, tmp_path / "plain.key",
                                           cert)
        assert (status, verdict["attestation"], verdict["quarantined"]) == (200, "none", False)
    async for cloud in _cloud(tmp_path / "strict", AttestationSettings(require=True)):
        key = pki.generate_key(tmp_path / "plain2.key")
        status, body = await cloud.post("/v1/device/enrol", {
            "token": await cloud.token(), "csr": pki.make_csr(key).decode()})
        assert (status, body["error"]) == (
            403, "this control plane enrols only nodes with a TPM (enrol with --tpm)")


async def test_a_tpm_node_renews_only_with_its_tpms_signature(
    cloud: Cloud, swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    with TpmNode(swtpm_factory("a"), tmp_path / "a") as a, \
            TpmNode(swtpm_factory("b"), tmp_path / "b") as b:
        key_path = tmp_path / "a" / "node.key"
        _, cert = await enrol(cloud, a, key_path)
        csr = pki.make_csr(pki.load_key(key_path))
        # the TLS key and certificate alone (a copy): no renewal
        status, body = await cloud.post("/v1/device/renew", {"csr": csr.decode()},
                                        key_path, cert)
        assert (status, body["error"]) == (401, "binding: the TPM node key's signature over "
                                                "the CSR is required for this node")
        forged = base64.b64encode(b.bind(csr)).decode()  # another TPM's node key
        status, body = await cloud.post("/v1/device/renew",
                                        {"csr": csr.decode(), "binding": forged}, key_path, cert)
        assert (status, body["error"]) == (401, "binding: the CSR is not signed by the TPM "
                                                "node key")
        status, body = await cloud.post("/v1/device/renew", {
            "csr": csr.decode(), "binding": base64.b64encode(a.bind(csr)).decode()},
            key_path, cert)
        assert status == 200 and "certificate" in body


async def test_node_identity_with_a_tpm_enrols_renews_and_reauthenticates(
    tmp_path: Path, swtpm_factory: Callable[[str], str],
) -> None:
    """The agent's own code (NodeIdentity with a TpmNode) against the real control plane."""
    from pydantic import SecretStr

    from edgewise.edge.identity import NodeIdentity

    async for cloud in _cloud(tmp_path / "c", AttestationSettings(agents=(AGENT,))):
        ident = NodeIdentity(tmp_path / "node", cloud.running.url,
                             cloud.dir / "pki" / "ca.pem", SecretStr(await cloud.token()))
        ident.prepare()
        with TpmNode(swtpm_factory("a"), ident.dir) as tpm:
            ident.tpm = tpm
            await ident.ensure_usable()  # enrols through the TPM
            assert ident.node_id is not None and ident.cert is not None
            record = await cloud.store.tpm_of(ident.node_id)
            assert record is not None and record.ak_public == tpm.ak.public_area()
            first = ident.cert.serial
            await ident.renew()  # with the TPM's signature over the CSR
            assert ident.renewals == 1 and ident.cert.serial != first
            await ident._reauth()  # the re-authentication path carries it too
            assert ident.reauths == 1
