"""The CA, node keys, CSR signing, identities in certificates, proof of possession, renewal."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgewise.errors import ConfigError, PeerError, StorageError
from edgewise.security import pki
from edgewise.security.pki import (
    CA_LIFETIME,
    CLOCK_SKEW,
    CertificateAuthority,
    ChallengeError,
    CsrError,
    IdentityError,
    InvalidNodeId,
    generate_key,
    load_key,
    make_csr,
    needs_renewal,
    node_id_from_cert,
    public_key_fingerprint,
    sign_challenge,
    verify_challenge,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "ca", now=NOW)


@pytest.fixture(scope="module")
def node_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


# --- the CA ------------------------------------------------------------------------------------


def test_ca_files_modes_and_extensions(ca: CertificateAuthority, tmp_path: Path) -> None:
    d = tmp_path / "fresh"
    fresh = CertificateAuthority.create(d, "plant.example", now=NOW)
    assert sorted(p.name for p in d.iterdir()) == ["ca.key", "ca.pem"]  # no temp files left
    assert mode(d / "ca.key") == 0o600
    assert mode(d / "ca.pem") == 0o644
    assert mode(d) == 0o700
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    assert cert == fresh.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == (
        f"CN=Edgewise CA plant.example {public_key_fingerprint(cert)[:8]},O=Edgewise"
    )
    cert.verify_directly_issued_by(cert)  # self-signed
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical is True
    assert (bc.value.ca, bc.value.path_length) == (True, 0)
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical is True
    assert (ku.value.key_cert_sign, ku.value.crl_sign, ku.value.digital_signature) == (
        True, True, False)
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + CA_LIFETIME
    assert timedelta(days=3652) == CA_LIFETIME
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://plant.example"]
    assert fresh.trust_domain == "plant.example"
    assert "BEGIN" not in repr(fresh) and "plant.example" in repr(fresh)


def test_ca_load_round_trip(tmp_path: Path) -> None:
    made = CertificateAuthority.create(tmp_path / "ca", "edge.test")
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.cert == made.cert
    assert loaded.trust_domain == "edge.test"
    assert loaded.cert_pem == (tmp_path / "ca" / "ca.pem").read_bytes()
    # the loaded CA signs certificates the original's certificate verifies
    issued = loaded.sign_node_csr(make_csr(ec.generate_private_key(ec.SECP256R1())), "n1")
    issued.cert.verify_directly_issued_by(made.cert)


def test_ca_default_trust_domain(ca: CertificateAuthority) -> None:
    assert ca.trust_domain == "edgewise.local"


def test_ca_create_refuses_to_overwrite(tmp_path: Path) -> None:
    CertificateAuthority.create(tmp_path)
    key_before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a CA"):
        CertificateAuthority.create(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == key_before


def test_ca_load_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no CA in .* \(missing ca.pem\)"):
        CertificateAuthority.load(tmp_path)


def test_ca_load_key_of_another_ca(tmp_path: Path) -> None:
    CertificateAuthority.create(tmp_path / "a")
    CertificateAuthority.create(tmp_path / "b")
    os.replace(tmp_path / "b" / "ca.key", tmp_path / "a" / "ca.key")
    with pytest.raises(ConfigError, match="do not belong together"):
        CertificateAuthority.load(tmp_path / "a")


@pytest.mark.parametrize("domain", ["", "Edgewise.local", "a b", "spiffe://x", "x/y", "-x"])
def test_ca_rejects_bad_trust_domain(tmp_path: Path, domain: str) -> None:
    with pytest.raises(InvalidNodeId, match="invalid trust domain"):
        CertificateAuthority.create(tmp_path, domain)
    assert list(tmp_path.iterdir()) == []


# --- node certificates -------------------------------------------------------------------------


def test_sign_node_csr(ca: CertificateAuthority, node_key: ec.EllipticCurvePrivateKey) -> None:
    issued = ca.sign_node_csr(make_csr(node_key), "pump-07", now=NOW)
    cert = x509.load_pem_x509_certificate(issued.pem)
    cert.verify_directly_issued_by(ca.cert)
    assert cert.issuer == ca.cert.subject
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pump-07")])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://edgewise.local/node/pump-07")]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = ext(cert, x509.BasicConstraints)
    assert (bc.critical, bc.value.ca) == (True, False)
    ku = ext(cert, x509.KeyUsage).value
    assert (ku.digital_signature, ku.key_cert_sign, ku.crl_sign) == (True, False, False)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=24)
    assert (issued.not_before, issued.not_after) == (NOW - CLOCK_SKEW, NOW + timedelta(hours=24))
    assert issued.serial == cert.serial_number
    assert issued.fingerprint == public_key_fingerprint(node_key)
    assert public_key_fingerprint(cert) == public_key_fingerprint(node_key)
    assert node_id_from_cert(cert, "edgewise.local") == "pump-07"


def test_node_cert_custom_lifetime(ca: CertificateAuthority, node_key) -> None:
    issued = ca.sign_node_csr(make_csr(node_key), "n", timedelta(hours=2), now=NOW)
    assert issued.cert.not_valid_after_utc == NOW + timedelta(hours=2)
    with pytest.raises(ConfigError, match="lifetime must be positive"):
        ca.sign_node_csr(make_csr(node_key), "n", timedelta(0), now=NOW)
    with pytest.raises(ConfigError, match="the CA expires"):
        ca.sign_node_csr(make_csr(node_key), "n", timedelta(days=4000), now=NOW)


def test_serials_are_random_and_distinct(ca: CertificateAuthority, node_key) -> None:
    csr = make_csr(node_key)
    serials = {ca.sign_node_csr(csr, "n1", now=NOW).serial for _ in range(20)}
    assert len(serials) == 20
    assert all(0 < s < 2**159 for s in serials)
    assert max(s.bit_length() for s in serials) > 100  # random, not a counter


def test_forged_csr_subject_sans_and_extensions_are_ignored(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier("spiffe://edgewise.local/node/victim"),
                x509.DNSName("control.example"),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = ca.sign_node_csr(forged, "attacker", now=NOW).cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "attacker"
    assert list(ext(cert, x509.SubjectAlternativeName).value) == [
        x509.UniformResourceIdentifier("spiffe://edgewise.local/node/attacker")
    ]
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert len(cert.extensions) == 6  # exactly ours: BC, KU, EKU, SAN, SKI, AKI
    assert node_id_from_cert(cert, "edgewise.local") == "attacker"


def test_csr_with_bad_signature_is_refused(ca: CertificateAuthority, node_key) -> None:
    der = x509.load_pem_x509_csr(make_csr(node_key)).public_bytes(serialization.Encoding.DER)
    tampered = der[:-1] + bytes([der[-1] ^ 0x01])  # last byte of the signature's s value
    pem = x509.load_der_x509_csr(tampered).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrError, match="signature does not verify"):
        ca.sign_node_csr(pem, "n1")


def test_csr_with_other_key_types_is_refused(ca: CertificateAuthority) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(p384, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrError, match="must be ECDSA P-256, not ECDSA secp384r1"):
        ca.sign_node_csr(csr, "n1")


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (b"", "not a readable PEM certificate signing request"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
         "not a readable PEM"),
        (b"x" * (pki.MAX_CSR_BYTES + 1), "the limit is 16384"),
    ],
    ids=["empty", "garbage", "oversized"],
)
def test_unreadable_csr(ca: CertificateAuthority, csr: bytes, message: str) -> None:
    with pytest.raises(CsrError, match=message) as info:
        ca.sign_node_csr(csr, "n1")
    assert isinstance(info.value, PeerError)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "node_id", ["", "Pump", "a_b", "a.b", "a/b", "../etc", "node 1", "x" * 65, "é", "a\n"]
)
def test_node_id_validation_refuses(ca: CertificateAuthority, node_key, node_id: str) -> None:
    with pytest.raises(InvalidNodeId, match="use 1 to 64 characters of a-z, 0-9 and '-'"):
        ca.sign_node_csr(make_csr(node_key), node_id)


@pytest.mark.parametrize("node_id", ["a", "0", "-", "pump-07", "x" * 64])
def test_node_id_validation_accepts(ca: CertificateAuthority, node_key, node_id: str) -> None:
    cert = ca.sign_node_csr(make_csr(node_key), node_id).cert
    assert node_id_from_cert(cert, "edgewise.local") == node_id


# --- server certificate ------------------------------------------------------------------------


def test_issue_server_cert(ca: CertificateAuthority) -> None:
    key, issued = ca.issue_server_cert(
        ["cloud.example", "localhost"], ["127.0.0.1", "::1"], timedelta(days=30), now=NOW
    )
    cert = issued.cert
    cert.verify_directly_issued_by(ca.cert)
    assert public_key_fingerprint(key) == issued.fingerprint == public_key_fingerprint(cert)
    assert key.curve.name == "secp256r1"
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cloud.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    with pytest.raises(IdentityError, match="has 0 SAN URIs"):
        node_id_from_cert(cert, "edgewise.local")


@pytest.mark.parametrize(
    ("hostnames", "ips", "message"),
    [
        ([], [], "at least one host name or IP"),
        (["bad host"], [], "invalid host name 'bad host'"),
        (["ok.example"], ["300.1.1.1"], "invalid IP address"),
    ],
)
def test_issue_server_cert_bad_names(ca, hostnames, ips, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ca.issue_server_cert(hostnames, ips)


# --- node keys ---------------------------------------------------------------------------------


def test_generate_and_load_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = os.umask(0o000)  # even with a permissive umask the key is 0600
    try:
        key = generate_key(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]
    assert key.curve.name == "secp256r1"
    loaded = load_key(path)
    assert public_key_fingerprint(loaded) == public_key_fingerprint(key)
    with pytest.raises(ConfigError, match="already holds a key"):
        generate_key(path)
    assert public_key_fingerprint(load_key(path)) == public_key_fingerprint(key)
    replaced = generate_key(path, overwrite=True)
    assert public_key_fingerprint(load_key(path)) == public_key_fingerprint(replaced)
    assert mode(path) == 0o600


def test_load_key_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="no key at"):
        load_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(StorageError, match="does not hold a readable unencrypted PEM key"):
        load_key(tmp_path / "junk.key")
    p384 = ec.generate_private_key(ec.SECP384R1())
    pki.save_key(tmp_path / "p384.key", p384)
    with pytest.raises(StorageError, match="expected ECDSA P-256"):
        load_key(tmp_path / "p384.key")
    generate_key(tmp_path / "open.key")
    os.chmod(tmp_path / "open.key", 0o644)
    with caplog.at_level(logging.WARNING, logger="edgewise.security.pki"):
        load_key(tmp_path / "open.key")
    assert [r.getMessage() for r in caplog.records] == [
        f"key file {tmp_path / 'open.key'} has mode 644; it should be 0600 "
        f"(chmod 600 {tmp_path / 'open.key'})"
    ]


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.pem"
    pki.write_atomic(path, b"one")
    pki.write_atomic(path, b"two", mode=0o640)
    assert path.read_bytes() == b"two"
    assert mode(path) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pem"]
    with pytest.raises(StorageError, match="cannot write"):
        pki.write_atomic(tmp_path / "no-such-dir" / "f", b"x")


def test_make_csr(node_key) -> None:
    csr = x509.load_pem_x509_csr(make_csr(node_key))
    assert csr.is_signature_valid
    assert public_key_fingerprint(csr) == public_key_fingerprint(node_key)


# --- identities in certificates ----------------------------------------------------------------


def _cert_with_uris(ca: CertificateAuthority, uris: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(hours=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        ([], "has 0 SAN URIs"),
        (["spiffe://edgewise.local/node/a", "spiffe://edgewise.local/node/b"], "has 2 SAN URIs"),
        (["spiffe://other.domain/node/a"], "not a node of trust domain edgewise.local"),
        (["spiffe://edgewise.local/operator/a"], "not a node of trust domain"),
        (["spiffe://edgewise.local.evil/node/a"], "not a node of trust domain"),
        (["spiffe://edgewise.local/node/A"], "not a valid node id"),
        (["spiffe://edgewise.local/node/a/b"], "not a valid node id"),
        (["spiffe://edgewise.local/node/"], "not a valid node id"),
    ],
    ids=["none", "two", "other-domain", "not-node", "domain-suffix", "upper", "slash", "empty"],
)
def test_node_id_from_cert_refuses(ca, uris: list[str], message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        node_id_from_cert(_cert_with_uris(ca, uris), "edgewise.local")


def test_node_id_from_cert_accepts_pem_and_der(ca, node_key) -> None:
    issued = ca.sign_node_csr(make_csr(node_key), "n-9")
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    assert node_id_from_cert(issued.pem, "edgewise.local") == "n-9"
    assert node_id_from_cert(issued.pem.decode(), "edgewise.local") == "n-9"
    assert node_id_from_cert(der, "edgewise.local") == "n-9"
    with pytest.raises(IdentityError, match=r"not a readable X\.509 certificate"):
        node_id_from_cert(b"junk", "edgewise.local")
    with pytest.raises(IdentityError, match=r"not a node of trust domain other\.local"):
        node_id_from_cert(issued.pem, "other.local")


def test_verify_node_cert_for_reauthentication(tmp_path: Path, ca, node_key) -> None:
    issued = ca.sign_node_csr(make_csr(node_key), "n1", timedelta(hours=24), now=NOW)
    end = NOW + timedelta(hours=24)
    assert ca.verify_node_cert(issued.pem, now=NOW) == "n1"
    assert ca.verify_node_cert(issued.pem, now=end + timedelta(days=6),
                               grace=timedelta(days=7)) == "n1"
    with pytest.raises(IdentityError, match="beyond the grace period of 7 days"):
        ca.verify_node_cert(issued.pem, now=end + timedelta(days=7, seconds=1),
                            grace=timedelta(days=7))
    with pytest.raises(IdentityError, match="beyond the grace period"):
        ca.verify_node_cert(issued.pem, now=end + timedelta(seconds=1))
    with pytest.raises(IdentityError, match="not valid yet"):
        ca.verify_node_cert(issued.pem, now=NOW - timedelta(hours=1))
    other = CertificateAuthority.create(tmp_path / "other")
    with pytest.raises(IdentityError, match="not issued by this CA"):
        ca.verify_node_cert(other.sign_node_csr(make_csr(node_key), "n1").pem)
    _, server = ca.issue_server_cert(["localhost"])
    with pytest.raises(IdentityError, match="does not allow client authentication"):
        ca.verify_node_cert(server.pem)


# --- proof of possession and fingerprints ------------------------------------------------------


def test_challenge_good_signature(ca, node_key) -> None:
    sig = sign_challenge(node_key, NONCE)
    pub = node_key.public_key()
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert = ca.sign_node_csr(make_csr(node_key), "n1").cert
    for form in (pub, pem, pem.decode(), cert, cert.public_bytes(serialization.Encoding.PEM)):
        assert verify_challenge(form, NONCE, sig) is None
    # the signature covers the context string, not the bare nonce
    pub.verify(sig, pki.CHALLENGE_CONTEXT + NONCE, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    "case", ["other-nonce", "other-key", "flipped-bit", "garbage", "empty", "bare-nonce"]
)
def test_challenge_bad_signature(node_key, case: str) -> None:
    nonce, key, sig = NONCE, node_key.public_key(), sign_challenge(node_key, NONCE)
    if case == "other-nonce":
        nonce = bytes(32)
    elif case == "other-key":
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
    elif case == "flipped-bit":
        sig = sig[:-1] + bytes([sig[-1] ^ 0x01])
    elif case == "garbage":
        sig = b"\x30\x03\x02\x01"
    elif case == "empty":
        sig = b""
    elif case == "bare-nonce":  # a signature over the nonce alone is not a proof
        sig = node_key.sign(NONCE, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ChallengeError, match="does not verify") as info:
        verify_challenge(key, nonce, sig)
    assert info.value.status == 401


def test_challenge_needs_a_real_nonce(node_key) -> None:
    with pytest.raises(ChallengeError, match="at least 16 random bytes"):
        sign_challenge(node_key, b"short")
    with pytest.raises(ChallengeError, match="at least 16 random bytes"):
        verify_challenge(node_key.public_key(), b"", b"sig")
    with pytest.raises(ChallengeError, match="not a readable PEM"):
        verify_challenge(b"junk", NONCE, b"sig")


def test_public_key_fingerprint(ca, node_key) -> None:
    spki = node_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = hashlib.sha256(spki).hexdigest()
    csr_pem = make_csr(node_key)
    issued = ca.sign_node_csr(csr_pem, "n1")
    forms = [node_key, node_key.public_key(), issued.cert, issued.pem,
             x509.load_pem_x509_csr(csr_pem), csr_pem]
    assert [public_key_fingerprint(f) for f in forms] == [expected] * 6
    assert len(expected) == 64
    assert public_key_fingerprint(ca.cert) != expected


# --- renewal -----------------------------------------------------------------------------------


def test_needs_renewal_threshold(ca, node_key) -> None:
    cert = ca.sign_node_csr(make_csr(node_key), "n1", timedelta(hours=24), now=NOW).cert
    start = NOW - CLOCK_SKEW
    validity = timedelta(hours=24) + CLOCK_SKEW  # 24 h 5 min
    threshold = start + validity * 2 / 3  # 16 h 3 min 20 s into the validity
    assert threshold == NOW + timedelta(hours=15, minutes=58, seconds=20)
    assert needs_renewal(cert, NOW) is False
    assert needs_renewal(cert, threshold - timedelta(seconds=1)) is False
    assert needs_renewal(cert, threshold) is True
    assert needs_renewal(cert, NOW + timedelta(days=3)) is True  # also once expired
    half = start + validity / 2
    assert needs_renewal(cert, half - timedelta(seconds=1), fraction=0.5) is False
    assert needs_renewal(cert, half, fraction=0.5) is True
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            needs_renewal(cert, NOW, fraction=bad)
    with pytest.raises(ValueError, match="timezone-aware"):
        needs_renewal(cert, datetime(2026, 3, 1, 12))
