"""TPM enrolment and remote attestation against swtpm (issue 16's acceptance): a certificate
only for the challenged TPM; quotes with a modified agent digest, a stale nonce, a replayed
quote, a quote from another TPM are quarantined with the reason; a new release attests again."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import swtpm
from edgewise.cloud.attestation.enrolment import TpmEnrolments, TpmNode
from edgewise.cloud.attestation.verifier import Attestations, Policy
from edgewise.security import pki
from edgewise.security.tpm import KeyBlob, Tpm, TpmError
from edgewise.security.tpm.credential import AttestationRefused
from edgewise.security.tpm.measure import MeasurementLog, agent_code_digest, measure_launch

swtpm_factory = swtpm.swtpm_factory  # fixture

AGENT = agent_code_digest()
R1 = hashlib.sha256(b"release 1 manifest").hexdigest()
R2 = hashlib.sha256(b"release 2 manifest").hexdigest()


@dataclass
class Node:
    tpm: Tpm
    key: KeyBlob
    ak: KeyBlob
    log: MeasurementLog

    def csr(self) -> bytes:
        with self.tpm.signer(self.key) as key:
            return pki.make_csr(key)

    def evidence(self, nonce: bytes) -> dict[str, object]:
        attest, sig = self.tpm.quote(self.ak, nonce, [16])
        return {"nonce": base64.b64encode(nonce).decode(),
                "quote": base64.b64encode(attest).decode(),
                "signature": base64.b64encode(sig).decode(),
                "events": [e.to_json() for e in self.log.events()]}


def make_node(tcti: str, tmp: Path) -> Node:
    tpm = Tpm(tcti)
    return Node(tpm, tpm.create_key("node"), tpm.create_key("ak"),
                MeasurementLog(tmp / f"events-{tcti.rsplit('=', 1)[-1]}.log"))


def enrol(enrolments: TpmEnrolments, node: Node, ek_cert: bytes | None = None) -> TpmNode:
    challenge = enrolments.begin(node.csr(), node.tpm.ek_public(), node.key.public_area(),
                                 node.ak.public_area(), ek_cert)
    answers = [node.tpm.activate_credential(k, blob, secret)
               for k, (blob, secret) in zip((node.key, node.ak), challenge.credentials,
                                            strict=True)]
    registered, csr = enrolments.finish(challenge.id, answers)
    with node.tpm.signer(node.key) as key:  # the CSR to sign is the TPM node key's
        assert pki.public_key_fingerprint(csr) == pki.public_key_fingerprint(key)
    return registered


@pytest.fixture
def two(swtpm_factory: Callable[[str], str], tmp_path: Path):
    a, b = make_node(swtpm_factory("a"), tmp_path), make_node(swtpm_factory("b"), tmp_path)
    yield a, b
    a.tpm.close()
    b.tpm.close()


def test_enrolment_issues_a_certificate_for_the_tpm_key(two, tmp_path: Path) -> None:
    a, _ = two
    registered = enrol(TpmEnrolments(), a)
    ca = pki.CertificateAuthority.create(tmp_path / "ca", trust_domain="edgewise.local")
    issued = ca.sign_node_csr(a.csr(), "n1")
    with a.tpm.signer(a.key) as key:
        assert issued.fingerprint == pki.public_key_fingerprint(key)
    assert registered.ak_public == a.ak.public_area()


def test_enrolment_refused_to_a_tpm_that_was_not_challenged(two) -> None:
    a, b = two
    enrolments = TpmEnrolments()
    # b presents a's EK (public, no secret) with its own keys: b cannot activate
    challenge = enrolments.begin(b.csr(), a.tpm.ek_public(), b.key.public_area(),
                                 b.ak.public_area())
    with pytest.raises(TpmError, match="activating"):
        b.tpm.activate_credential(b.key, *challenge.credentials[0])
    with pytest.raises(AttestationRefused, match="wrong answer"):
        enrolments.finish(challenge.id, [b"\0" * 32, b"\0" * 32])
    with pytest.raises(AttestationRefused, match="unknown, used or expired"):
        enrolments.finish(challenge.id, [b"\0" * 32, b"\0" * 32])  # used up by the wrong one
    # a CSR of a file key with the TPM's node key public area is refused before any challenge
    file_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AttestationRefused, match="not signed by the TPM node key"):
        enrolments.begin(pki.make_csr(file_key), a.tpm.ek_public(), a.key.public_area(),
                         a.ak.public_area())
    # the AK must be restricted: the node key offered as an AK is refused
    with pytest.raises(AttestationRefused, match="restricted"):
        enrolments.begin(a.csr(), a.tpm.ek_public(), a.key.public_area(), a.key.public_area())


def _manufacturer_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test TPM Manufacturer CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=9))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _ek_cert(ca_key, ca_cert, subject_key) -> bytes:
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject).public_key(subject_key).serial_number(2)
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=9))
            .sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_ek_certificate_chain_checked_when_a_manufacturer_ca_is_configured(two) -> None:
    from edgewise.security.tpm.credential import public_key_of

    a, b = two
    ca_key, ca_cert = _manufacturer_ca()
    enrolments = TpmEnrolments(manufacturers=[ca_cert])
    ek_a = public_key_of(a.tpm.ek_public())
    enrol(enrolments, a, _ek_cert(ca_key, ca_cert, ek_a))  # accepted
    with pytest.raises(AttestationRefused, match="required"):
        enrol(enrolments, a, None)
    with pytest.raises(AttestationRefused, match="certifies another key"):
        enrol(enrolments, b, _ek_cert(ca_key, ca_cert, ek_a))  # a's certificate, b's EK
    other_key, other_ca = _manufacturer_ca()
    with pytest.raises(AttestationRefused, match="not issued by a configured"):
        enrol(enrolments, a, _ek_cert(other_key, other_ca, ek_a))


def _launched(node: Node, agent: str = AGENT, release: str | None = R1) -> None:
    measure_launch(node.tpm, node.log, agent=agent, release=release, pcr=16)


def test_attested_then_new_release_attests_again(two) -> None:
    a, _ = two
    registered = enrol(TpmEnrolments(), a)
    verifier = Attestations()
    _launched(a)
    verdict = verifier.verify("n1", registered, Policy.of([AGENT], [R1]),
                              a.evidence(verifier.challenge("n1")))
    assert (verdict.quarantined, verdict.attestation, verdict.measurements) == \
        (False, "tpm", {"agent": AGENT, "release": R1})
    # the updater activates release 2 and the agent restarts: measured again, same PCR
    _launched(a, release=R2)
    stale_policy = Policy.of([AGENT], [R1])
    verdict = verifier.verify("n1", registered, stale_policy, a.evidence(verifier.challenge("n1")))
    assert verdict.quarantined and verdict.reason == "measurement: release not in the allowed set"
    verdict = verifier.verify("n1", registered, Policy.of([AGENT], [R1, R2]),
                              a.evidence(verifier.challenge("n1")))
    assert (verdict.quarantined, verdict.measurements["release"]) == (False, R2)
    assert verifier.quarantined("n1") is None


def test_modified_agent_is_quarantined_without_leaking_the_expected_digest(two) -> None:
    a, _ = two
    registered = enrol(TpmEnrolments(), a)
    verifier = Attestations()
    tampered = hashlib.sha256(b"agent with a backdoor").hexdigest()
    _launched(a, agent=tampered)
    verdict = verifier.verify("n1", registered, Policy.of([AGENT], [R1]),
                              a.evidence(verifier.challenge("n1")))
    assert verdict.quarantined
    assert verdict.reason == "measurement: agent code not in the allowed set"
    assert verifier.quarantined("n1") == verdict.reason
    assert AGENT not in str(verdict.to_json()) and AGENT[:12] not in str(verdict.to_json())
    assert (verdict.allows("report"), verdict.allows("release"), verdict.allows("data")) == \
        (True, True, False)
    # lying in the log (claiming the allowed digest) does not help: the PCR disagrees
    evidence = a.evidence(verifier.challenge("n1"))
    evidence["events"] = [{"pcr": 16, "kind": "agent", "digest": AGENT},
                          {"pcr": 16, "kind": "release", "digest": R1}]
    verdict = verifier.verify("n1", registered, Policy.of([AGENT], [R1]), evidence)
    assert verdict.reason == "quote: PCR values do not match the event log"


def test_stale_nonce_replayed_quote_and_another_nodes_nonce(two) -> None:
    a, _ = two
    registered = enrol(TpmEnrolments(), a)
    policy = Policy.of([AGENT], [R1])
    _launched(a)
    now = [1000.0]
    verifier = Attestations(nonce_ttl=60.0, clock=lambda: now[0])
    stale = a.evidence(verifier.challenge("n1"))
    now[0] += 60.0  # the nonce's lifetime has passed
    verdict = verifier.verify("n1", registered, policy, stale)
    assert verdict.quarantined and "stale, replayed" in (verdict.reason or "")
    verifier = Attestations()
    fresh = a.evidence(verifier.challenge("n1"))
    assert not verifier.verify("n1", registered, policy, fresh).quarantined
    replayed = verifier.verify("n1", registered, policy, fresh)
    assert replayed.quarantined and "stale, replayed" in (replayed.reason or "")
    for_other = a.evidence(verifier.challenge("n2"))
    assert verifier.verify("n1", registered, policy, for_other).quarantined
    # a quote for one nonce sent with another nonce (both issued to n1)
    n1, n2 = verifier.challenge("n1"), verifier.challenge("n1")
    evidence = a.evidence(n1)
    evidence["nonce"] = base64.b64encode(n2).decode()
    verdict = verifier.verify("n1", registered, policy, evidence)
    assert verdict.reason == "quote: not made for this challenge (stale or replayed)"


def test_quote_from_another_tpm_is_quarantined(two) -> None:
    a, b = two
    registered = enrol(TpmEnrolments(), a)
    _launched(a)
    _launched(b)  # b runs the same, allowed software: only its TPM differs
    verifier = Attestations()
    verdict = verifier.verify("n1", registered, Policy.of([AGENT], [R1]),
                              b.evidence(verifier.challenge("n1")))
    assert verdict.quarantined
    assert verdict.reason == ("quote signature does not verify with the node's registered "
                              "attestation key")


def test_node_without_tpm_is_labelled_and_refusable() -> None:
    assert Attestations().no_tpm("n9").to_json() == {
        "node_id": "n9", "attestation": "none", "quarantined": False, "reason": None,
        "measurements": {}}
    refused = Attestations(require_attestation=True).no_tpm("n9")
    assert (refused.quarantined, refused.reason) == (
        True, "attestation required: this node has no TPM")
