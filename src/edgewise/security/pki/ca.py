"""The control plane's certificate authority: made once, then signs node and server certificates.

The CA (ECDSA P-256, self-signed, 10 years, ``pathlen:0``: it signs leaf certificates only)
writes its trust domain into its own certificate as the SAN URI ``spiffe://<trust_domain>``, so
`CertificateAuthority.load` needs no other file. It takes only the public key from a node's CSR
(after checking the CSR's signature) and names the node itself; node certificates allow client
authentication only and live 24 h by default. `CertificateAuthority.verify_node_cert` checks a
node certificate outside TLS (an expired one presented to re-authenticate, within a grace
period).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgewise.common.files import write_atomic
from edgewise.errors import ConfigError, PeerError, StorageError
from edgewise.security.pki.certs import (
    IdentityError,
    as_cert,
    aware,
    node_id_from_cert,
    node_uri,
    uri_sans,
    validate_node_id,
    validate_trust_domain,
)
from edgewise.security.pki.keys import describe_key, load_key, public_key_fingerprint, save_key

DEFAULT_TRUST_DOMAIN = "edgewise.local"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CA_LIFETIME = timedelta(days=3652)  # 10 years
NODE_CERT_LIFETIME = timedelta(hours=24)
SERVER_CERT_LIFETIME = timedelta(days=365)
CLOCK_SKEW = timedelta(minutes=5)  # not_before is back-dated by this much
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR in PEM is about 500 bytes

_DNS_NAME = re.compile(
    r"(\*\.)?([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"
)


class CsrError(PeerError):
    """A certificate signing request cannot be accepted."""

    status = 400  # HTTP status for the API layer


@dataclass(frozen=True)
class IssuedCert:
    """A certificate the CA has just signed, with what the store needs to record about it."""

    pem: bytes
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint: str  # sha256 hex of the certificate's SubjectPublicKeyInfo

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem)


def _now(now: datetime | None) -> datetime:
    # X.509 times have whole seconds; truncating here makes not_before/not_after exact.
    return (aware(now) if now is not None else datetime.now(UTC)).replace(microsecond=0)


class CertificateAuthority:
    """The control plane's CA: signs node certificates (client auth) and its own server cert.

    Make one with `create` (first start) or `load`; both take the CA directory, which holds
    ``ca.pem`` (the trust anchor nodes are given) and ``ca.key`` (mode 0600).
    """

    def __init__(
        self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, trust_domain: str
    ) -> None:
        if public_key_fingerprint(key) != public_key_fingerprint(cert):
            raise ConfigError("CA key and CA certificate do not belong together")
        self._key = key
        self.cert = cert
        self.trust_domain = validate_trust_domain(trust_domain)

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self.trust_domain!r}, "
            f"key={public_key_fingerprint(self.cert)[:16]}…)"
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Make a new CA in ``directory`` (created 0700 if missing); refuse to replace one."""
        validate_trust_domain(trust_domain)
        d = Path(directory)
        key_path, cert_path = d / CA_KEY_FILE, d / CA_CERT_FILE
        if key_path.exists() or cert_path.exists():
            raise ConfigError(f"{d} already holds a CA; load it instead of creating a new one")
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create CA directory {d}: {exc.strerror or exc}") from exc
        t = _now(now)
        key = ec.generate_private_key(ec.SECP256R1())
        # The key's fingerprint in the name keeps CAs of different installations (and an old and
        # a new CA during rotation) apart, even with the same trust domain.
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Edgewise"),
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                f"Edgewise CA {trust_domain} {public_key_fingerprint(key)[:8]}",
            ),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - CLOCK_SKEW)
            .not_valid_after(t + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        save_key(key_path, key)  # the key first: a cert without its key is useless
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cls(key, cert, trust_domain)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Load the CA from ``directory``; `ConfigError` when it is missing or inconsistent."""
        d = Path(directory)
        cert_path = d / CA_CERT_FILE
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(f"no CA in {d} (missing {CA_CERT_FILE})") from exc
        except ValueError as exc:
            raise StorageError(f"{cert_path} is not a readable PEM certificate") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {cert_path}: {exc.strerror or exc}") from exc
        key = load_key(d / CA_KEY_FILE)
        domains = [u for u in uri_sans(cert) if u.startswith("spiffe://")]
        if len(domains) != 1:
            raise StorageError(f"{cert_path} does not name its trust domain (spiffe://<domain>)")
        return cls(key, cert, domains[0].removeprefix("spiffe://").rstrip("/"))

    # -- issuing ----------------------------------------------------------------------------

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        eku: x509.ObjectIdentifier,
        lifetime: timedelta,
        now: datetime | None,
    ) -> IssuedCert:
        if lifetime <= timedelta(0):
            raise ConfigError(f"certificate lifetime must be positive, got {lifetime}")
        t = _now(now)
        not_before, not_after = t - CLOCK_SKEW, t + lifetime
        if not_after > self.cert.not_valid_after_utc:
            raise ConfigError(
                f"the CA expires at {self.cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z, before "
                f"the certificate would ({not_after:%Y-%m-%d %H:%M}Z); rotate the CA"
            )
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCert(
            pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=serial,
            not_before=not_before,
            not_after=not_after,
            fingerprint=public_key_fingerprint(public_key),
        )

    def issue_server_cert(
        self,
        hostnames: Iterable[str],
        ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        lifetime: timedelta = SERVER_CERT_LIFETIME,
        *,
        now: datetime | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, IssuedCert]:
        """A fresh P-256 key and a server-auth certificate for these DNS names and IPs.

        Save the key with `save_key` and the certificate with `write_atomic`.
        """
        names = list(hostnames)
        for h in names:
            if not isinstance(h, str) or len(h) > 253 or not _DNS_NAME.fullmatch(h):
                raise ConfigError(f"invalid host name {h!r} for the server certificate")
        try:
            addrs = [ipaddress.ip_address(ip) for ip in ips]
        except ValueError as exc:
            raise ConfigError(f"invalid IP address for the server certificate: {exc}") from exc
        if not names and not addrs:
            raise ConfigError("a server certificate needs at least one host name or IP address")
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in names]
        sans += [x509.IPAddress(a) for a in addrs]
        common = names[0] if names else str(addrs[0])
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Edgewise"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ])
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._leaf(
            subject, key.public_key(), sans, ExtendedKeyUsageOID.SERVER_AUTH, lifetime, now
        )
        return key, issued

    def sign_node_csr(
        self,
        csr_pem: bytes | str,
        node_id: str,
        lifetime: timedelta = NODE_CERT_LIFETIME,
        *,
        now: datetime | None = None,
    ) -> IssuedCert:
        """Sign a node's CSR: the certificate names ``node_id`` and allows client auth only.

        Only the CSR's public key is used (after its signature is checked); whatever subject,
        SANs or extensions it asks for are ignored. ``now`` overrides the clock (tests: a
        certificate issued in the past). Raises `CsrError`, `InvalidNodeId`, `ConfigError`.
        """
        validate_node_id(node_id)
        data = csr_pem.encode() if isinstance(csr_pem, str) else bytes(csr_pem)
        if len(data) > MAX_CSR_BYTES:
            raise CsrError(f"CSR is {len(data)} bytes; the limit is {MAX_CSR_BYTES}")
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CsrError("not a readable PEM certificate signing request") from exc
        try:
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise CsrError("the CSR's public key cannot be read") from exc
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CsrError(f"the CSR's key must be ECDSA P-256, not {describe_key(public_key)}")
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify (it was not made with its key)")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(node_uri(self.trust_domain, node_id))
        ]
        return self._leaf(
            subject, public_key, sans, ExtendedKeyUsageOID.CLIENT_AUTH, lifetime, now
        )

    def verify_node_cert(
        self,
        cert: x509.Certificate | bytes | str,
        *,
        now: datetime | None = None,
        grace: timedelta = timedelta(0),
    ) -> str:
        """Check a node certificate outside TLS, e.g. an expired one presented to re-authenticate.

        Verifies it was signed by this CA, allows client auth and names a node of our trust
        domain, and that ``now`` lies between its not_before and not_after + ``grace``. Returns
        the node id. Revocation and proof of possession are the caller's to check.
        Raises `IdentityError`.
        """
        certificate = as_cert(cert)
        try:
            certificate.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise IdentityError("certificate was not issued by this CA") from exc
        try:
            eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise IdentityError("certificate does not allow client authentication")
        node_id = node_id_from_cert(certificate, self.trust_domain)
        t = aware(now) if now is not None else datetime.now(UTC)
        if t < certificate.not_valid_before_utc:
            raise IdentityError(f"certificate of node {node_id} is not valid yet")
        if t > certificate.not_valid_after_utc + grace:
            raise IdentityError(
                f"certificate of node {node_id} expired at "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z, beyond the grace "
                f"period of {grace}; the node must enrol again with a new token"
            )
        return node_id
