"""Node identity: the certificate authority, node keys, CSRs and proof of possession.

Pure cryptography plus atomic file writes; no network, no database. The control plane's store and
device API call these functions; the agent calls the node-side ones.

Identity model (see docs/security.md):

* The control plane owns one CA (ECDSA P-256, self-signed, 10 years, ``pathlen:0``: it signs leaf
  certificates only). Its trust domain is written into the CA certificate as the SAN URI
  ``spiffe://<trust_domain>``, so `CertificateAuthority.load` needs no other file.
* A node makes its own P-256 key, which never leaves it, and sends a CSR. The CA takes only the
  public key from the CSR (after checking the CSR's signature); subject, SANs and extensions the
  CSR asks for are ignored. The certificate names the node by exactly one SAN URI
  ``spiffe://<trust_domain>/node/<node_id>`` and allows client authentication only.
* Certificates are short-lived (24 h by default) and renewed once 2/3 of their lifetime has passed
  (`needs_renewal`). A node whose certificate expired during an outage proves possession of its
  registered key (`sign_challenge` / `verify_challenge`, matched by `public_key_fingerprint`) and
  the control plane checks the old certificate with `CertificateAuthority.verify_node_cert` and a
  grace period.

Errors:

    ConfigError ── InvalidNodeId        a node id or trust domain that is not allowed
    PeerError ──┬─ CsrError             the CSR is unreadable, badly signed or has the wrong key
                ├─ IdentityError        a certificate does not name a node of our trust domain
                └─ ChallengeError       a proof-of-possession signature does not verify
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgewise.errors import ConfigError, PeerError, StorageError

log = logging.getLogger(__name__)

DEFAULT_TRUST_DOMAIN = "edgewise.local"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CA_LIFETIME = timedelta(days=3652)  # 10 years
NODE_CERT_LIFETIME = timedelta(hours=24)
SERVER_CERT_LIFETIME = timedelta(days=365)
CLOCK_SKEW = timedelta(minutes=5)  # not_before is back-dated by this much
RENEW_FRACTION = 2 / 3
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR in PEM is about 500 bytes
MIN_NONCE_BYTES = 16
# Prepended to every proof-of-possession nonce, so a node key never signs data chosen freely by
# the other side (a challenge signature cannot be reused as a signature over anything else).
CHALLENGE_CONTEXT = b"edgewise proof-of-possession v1\x00"

_NODE_ID = re.compile(r"[a-z0-9-]{1,64}")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")
_DNS_NAME = re.compile(
    r"(\*\.)?([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"
)


class InvalidNodeId(ConfigError):
    """A node id or trust domain does not match the allowed pattern."""


class CsrError(PeerError):
    """A certificate signing request cannot be accepted."""

    status = 400  # HTTP status for the API layer


class IdentityError(PeerError):
    """A certificate does not carry a node identity of our trust domain."""

    status = 401  # HTTP status for the API layer


class ChallengeError(PeerError):
    """A proof-of-possession signature does not verify."""

    status = 401  # HTTP status for the API layer


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


# ---------------------------------------------------------------------------------------------
# files


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    Temp file in the same directory (created with ``mode`` before any byte is written), fsync,
    ``os.replace``, fsync of the directory. Raises `StorageError` when the disk refuses.
    """
    target = Path(path)
    directory = target.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here on, closes it on every path
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is done
    finally:
        os.close(dfd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def save_key(path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key as unencrypted PKCS#8 PEM, mode 0600, atomically."""
    write_atomic(path, _key_pem(key), mode=0o600)


def generate_key(
    path: str | os.PathLike[str], *, overwrite: bool = False
) -> ec.EllipticCurvePrivateKey:
    """Make a node's P-256 key and store it at ``path`` (mode 0600, atomic).

    Refuses (`ConfigError`) to replace an existing key unless ``overwrite``: the key is the
    node's identity, and losing it means enrolling again.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise ConfigError(
            f"{target} already holds a key; load it with load_key() or delete it to re-enrol"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    save_key(target, key)
    return key


def load_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read a P-256 private key written by `generate_key` or `save_key`.

    Raises `ConfigError` when the file is missing, `StorageError` when it is not a P-256 key.
    Logs a warning when the file is readable by group or others.
    """
    target = Path(path)
    try:
        data = target.read_bytes()
        st_mode = target.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError(f"no key at {target}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read key {target}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise StorageError(f"{target} does not hold a readable unencrypted PEM key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise StorageError(f"{target} holds a key of the wrong type; expected ECDSA P-256")
    if st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "key file %s has mode %o; it should be 0600 (chmod 600 %s)",
            target, stat.S_IMODE(st_mode), target,
        )
    return key


# ---------------------------------------------------------------------------------------------
# names


def validate_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is 1-64 characters of ``[a-z0-9-]``, else raise `InvalidNodeId`."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise InvalidNodeId(
            f"invalid node id {node_id!r}: use 1 to 64 characters of a-z, 0-9 and '-'"
        )
    return node_id


def validate_trust_domain(trust_domain: str) -> str:
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidNodeId(
            f"invalid trust domain {trust_domain!r}: use lower-case letters, digits, '.', '-' "
            "and '_' (like a DNS name), e.g. edgewise.local"
        )
    return trust_domain


def node_uri(trust_domain: str, node_id: str) -> str:
    """The SPIFFE id of a node: ``spiffe://<trust_domain>/node/<node_id>``."""
    return f"spiffe://{validate_trust_domain(trust_domain)}/node/{validate_node_id(node_id)}"


def _as_cert(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode() if isinstance(cert, str) else bytes(cert)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError("not a readable X.509 certificate") from exc


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def node_id_from_cert(cert: x509.Certificate | bytes | str, trust_domain: str) -> str:
    """The node id named by ``cert``'s SAN URI, checked against ``trust_domain``.

    Does not check the certificate's signature or validity: call it on a certificate the TLS
    layer has verified (see `edgewise.security.tls.peer_node_id`), or after
    `CertificateAuthority.verify_node_cert`. Raises `IdentityError`.
    """
    certificate = _as_cert(cert)
    uris = _uri_sans(certificate)
    if len(uris) != 1:
        raise IdentityError(
            f"certificate (serial {certificate.serial_number:x}) has {len(uris)} SAN URIs; "
            "a node certificate has exactly one, spiffe://<trust-domain>/node/<id>"
        )
    prefix = f"spiffe://{trust_domain}/node/"
    uri = uris[0]
    if not uri.startswith(prefix):
        raise IdentityError(f"certificate names {uri!r}, not a node of trust domain {trust_domain}")
    node_id = uri[len(prefix):]
    if not _NODE_ID.fullmatch(node_id):
        raise IdentityError(f"certificate names {uri!r}, which is not a valid node id")
    return node_id


# ---------------------------------------------------------------------------------------------
# keys and proof of possession

KeyLike = (
    ec.EllipticCurvePrivateKey
    | ec.EllipticCurvePublicKey
    | x509.Certificate
    | x509.CertificateSigningRequest
)


def _any_public_key(obj: KeyLike | bytes | str, error: type[PeerError]) -> PublicKeyTypes:
    if isinstance(obj, str | bytes):
        data = obj.encode() if isinstance(obj, str) else obj
        try:
            if b"CERTIFICATE REQUEST-----" in data:
                obj = x509.load_pem_x509_csr(data)
            elif b"CERTIFICATE-----" in data:
                obj = x509.load_pem_x509_certificate(data)
            else:
                obj = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise error("not a readable PEM public key, certificate or CSR") from exc
    if isinstance(obj, x509.Certificate | x509.CertificateSigningRequest):
        return obj.public_key()
    if hasattr(obj, "public_bytes"):  # already a public key
        return obj  # type: ignore[return-value]
    if hasattr(obj, "public_key"):  # a private key
        return obj.public_key()
    raise error(f"expected a key, certificate or CSR, got {type(obj).__name__}")


def _public_key(obj: KeyLike | bytes | str) -> ec.EllipticCurvePublicKey:
    pub = _any_public_key(obj, ChallengeError)
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise ChallengeError(f"expected an ECDSA public key, got {_describe(pub)}")
    return pub


def public_key_fingerprint(key_or_cert: KeyLike | bytes | str) -> str:
    """sha256 (hex, 64 characters) of the DER SubjectPublicKeyInfo of a key, cert or CSR.

    The same value for a node's private key, its public key, its CSR and its certificates, so
    the control plane can match a node to the key it registered at enrolment. Raises
    `IdentityError` for input that holds no key.
    """
    spki = _any_public_key(key_or_cert, IdentityError).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _check_nonce(nonce: bytes) -> bytes:
    if not isinstance(nonce, bytes | bytearray) or len(nonce) < MIN_NONCE_BYTES:
        raise ChallengeError(f"challenge nonce must be at least {MIN_NONCE_BYTES} random bytes")
    return bytes(nonce)


def sign_challenge(key: ec.EllipticCurvePrivateKey, nonce: bytes) -> bytes:
    """Prove possession of ``key``: an ECDSA-SHA256 signature (DER) over the server's nonce.

    What is signed is `CHALLENGE_CONTEXT` + nonce, so the signature is good for nothing else.
    """
    return key.sign(CHALLENGE_CONTEXT + _check_nonce(nonce), ec.ECDSA(hashes.SHA256()))


def verify_challenge(
    public_key: KeyLike | bytes | str, nonce: bytes, signature: bytes
) -> None:
    """Check a `sign_challenge` signature; raise `ChallengeError` unless it verifies.

    ``public_key`` may be a public key, a certificate or CSR, or any of these in PEM.
    """
    pub = _public_key(public_key)
    try:
        pub.verify(bytes(signature), CHALLENGE_CONTEXT + _check_nonce(nonce),
                   ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise ChallengeError("proof-of-possession signature does not verify") from exc


def needs_renewal(
    cert: x509.Certificate | bytes | str, now: datetime, fraction: float = RENEW_FRACTION
) -> bool:
    """True once ``fraction`` of the certificate's validity period has passed at ``now``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    certificate = _as_cert(cert)
    start = certificate.not_valid_before_utc
    end = certificate.not_valid_after_utc
    return _aware(now) >= start + (end - start) * fraction


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for ``key``. Its subject is a placeholder: the CA names the node itself."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgewise-node")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (use datetime.now(UTC))")
    return now


def _now(now: datetime | None) -> datetime:
    # X.509 times have whole seconds; truncating here makes not_before/not_after exact.
    return (_aware(now) if now is not None else datetime.now(UTC)).replace(microsecond=0)


# ---------------------------------------------------------------------------------------------
# the CA


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
        domains = [u for u in _uri_sans(cert) if u.startswith("spiffe://")]
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
            raise CsrError(f"the CSR's key must be ECDSA P-256, not {_describe(public_key)}")
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
        certificate = _as_cert(cert)
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
        t = _aware(now) if now is not None else datetime.now(UTC)
        if t < certificate.not_valid_before_utc:
            raise IdentityError(f"certificate of node {node_id} is not valid yet")
        if t > certificate.not_valid_after_utc + grace:
            raise IdentityError(
                f"certificate of node {node_id} expired at "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z, beyond the grace "
                f"period of {grace}; the node must enrol again with a new token"
            )
        return node_id


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.lstrip("_")
