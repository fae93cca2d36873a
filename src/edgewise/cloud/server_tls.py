"""The control plane's TLS with an organisation's own PKI: ``edgewise cloud serve --tls-cert
--tls-key [--tls-ca] [--client-ca]`` (docs/security.md, *Bringing your own PKI*).

Who issues and who verifies what:

* **The server certificate.** By default the enrolment CA (``DIR/pki/ca.pem``) issues
  ``DIR/pki/server.pem`` at start. With ``--tls-cert FILE --tls-key FILE`` the server presents
  that chain instead (the leaf first, then its intermediates) and issues none. Clients must
  trust its issuer: agents get that CA as ``agent run --ca``; the operator CLI gets it through
  ``cli.json``, whose ``ca`` is ``--tls-ca`` (default: the self-signed last certificate of
  ``--tls-cert``, when the file carries its root).
* **Node certificates** are always issued by the enrolment CA, at enrolment and renewal; a
  node is known by its enrolment (the store keeps its key, and a certificate with another key
  is refused even when it verifies). Certificates issued outside Edgewise are not node
  identities: that is not supported.
* **Verifying node certificates.** By default against the enrolment CA alone. With
  ``--client-ca BUNDLE`` against the CA certificates in BUNDLE instead; the enrolment CA must be
  one of them or be issued directly by one of them (checked at start: otherwise enrolment would
  hand out certificates the TLS layer refuses). That is how an organisation's root signs node
  identities: it issues Edgewise an intermediate CA (ECDSA P-256, ``CA:true``, a subject key
  identifier, the SAN URI ``spiffe://<trust domain>``), placed as ``DIR/pki/ca.pem`` and
  ``ca.key`` before the first start, and ``--client-ca`` is the root. An enrolment CA that is
  not self-signed needs ``--client-ca`` (the root its chain ends in); the server certificate it
  issues then carries it as an intermediate, and clients trust the root (``cli.json``'s ``ca``
  is the root from the bundle, unless ``--tls-ca`` or ``--tls-cert`` say otherwise).
"""

from __future__ import annotations

import logging
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from edgewise.common.files import write_atomic
from edgewise.errors import ConfigError
from edgewise.security.pki import CA_CERT_FILE, CertificateAuthority
from edgewise.security.tls import server_context

SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CLIENT_TRUST = "clients-ca.pem"
"""In ``DIR/pki``: what clients verify the server with, when it is not ``ca.pem``."""
MAX_PEM_BYTES = 1024 * 1024  # a certificate bundle; read before it is parsed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTls:
    """The TLS files of ``cloud serve`` (all None: the control plane's own PKI only)."""

    cert: Path | None = None  # --tls-cert: chain the server presents
    key: Path | None = None  # --tls-key
    ca: Path | None = None  # --tls-ca: what clients verify --tls-cert with
    client_ca: Path | None = None  # --client-ca: what node certificates are verified with

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("give --tls-cert and --tls-key together (the server's "
                              "certificate chain and its private key)")
        if self.ca is not None and self.cert is None:
            raise ConfigError("--tls-ca names the CA of --tls-cert; give --tls-cert and "
                              "--tls-key too")

    @property
    def own_server_cert(self) -> bool:
        """True when the control plane issues its server certificate itself."""
        return self.cert is None


def read_certs(path: Path, flag: str) -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (at least one); `ConfigError` naming ``flag``."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ConfigError(f"{flag} {path}: larger than {MAX_PEM_BYTES} bytes; give PEM "
                          "certificates")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{flag} {path}: not PEM certificates ({exc})") from None
    return certs


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    return _issued_by(cert, cert)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_client_ca(ca: CertificateAuthority, bundle: list[x509.Certificate],
                    path: Path) -> list[x509.Certificate]:
    """The certificates of ``bundle`` the enrolment CA is or is issued by; `ConfigError` when
    none (enrolment would issue node certificates the TLS layer refuses)."""
    anchors = [c for c in bundle if c == ca.cert or _issued_by(ca.cert, c)]
    if not anchors:
        raise ConfigError(
            f"--client-ca {path}: the enrolment CA ({ca.cert.subject.rfc4514_string()}) is "
            "neither in it nor issued by a certificate in it, so the node certificates it "
            "issues would be refused; give the CA that issued DIR/pki/ca.pem, or see "
            "docs/security.md, 'Bringing your own PKI'")
    return anchors


def prepare(tls: ServerTls, ca: CertificateAuthority, pki: Path) -> Path:
    """Check the files against the enrolment CA and write what clients need; returns the file
    clients verify the server with (for ``cli.json``: ``ca.pem`` or ``clients-ca.pem``)."""
    anchors: list[x509.Certificate] = []
    if tls.client_ca is not None:
        anchors = check_client_ca(ca, read_certs(tls.client_ca, "--client-ca"), tls.client_ca)
    elif not self_signed(ca.cert):
        raise ConfigError(
            f"{pki / CA_CERT_FILE} is not self-signed (an intermediate CA): give --client-ca "
            "with the root it is issued by, so node certificates verify")
    if tls.key is not None:
        try:
            mode = tls.key.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"--tls-key {tls.key}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("--tls-key %s has mode %o; it should be 0600 (chmod 600 %s)", tls.key,
                        stat.S_IMODE(mode), tls.key)
    if tls.cert is not None:
        chain = read_certs(tls.cert, "--tls-cert")
        if tls.ca is not None:
            trust = read_certs(tls.ca, "--tls-ca")
        elif self_signed(chain[-1]) and len(chain) > 1:
            trust = [chain[-1]]
        else:
            raise ConfigError(
                f"--tls-cert {tls.cert} does not end in its root CA: give --tls-ca with the "
                "CA certificate that verifies it (the operator CLI's cli.json names it; give "
                "agents the same file as --ca)")
    elif not self_signed(ca.cert):
        trust = [a for a in anchors if self_signed(a)] or anchors
    else:
        (pki / CLIENT_TRUST).unlink(missing_ok=True)  # from an earlier start with own PKI
        return pki / CA_CERT_FILE
    path = pki / CLIENT_TRUST
    write_atomic(path, _pem(trust), mode=0o644)
    return path


def server_chain_extra(ca: CertificateAuthority) -> bytes:
    """What follows the leaf in ``server.pem``: the enrolment CA when it is an intermediate
    (clients trust its root, so the server must send it), else nothing."""
    return b"" if self_signed(ca.cert) else ca.cert_pem


def client_trust(pki: Path) -> Path:
    """The file clients verify the server with, as the last start left it."""
    return pki / CLIENT_TRUST if (pki / CLIENT_TRUST).exists() else pki / CA_CERT_FILE


def tls_context(pki: Path, tls: ServerTls) -> ssl.SSLContext:
    """TLS 1.3; client certificates optional at the TLS layer (enrolment, re-authentication)
    but verified when presented, against ``--client-ca`` (with the enrolment CA for building
    the chain) or the enrolment CA; device endpoints require one."""
    ctx = server_context(tls.cert or pki / SERVER_CERT, tls.key or pki / SERVER_KEY,
                         tls.client_ca or pki / CA_CERT_FILE, require_client_cert=False)
    if tls.client_ca is not None:
        # the enrolment CA joins the bundle so that a node's chain (nodes send their leaf
        # only) can be built; when it is not self-signed it is no anchor by itself: OpenSSL
        # needs a self-signed root, with partial chains off
        ctx.load_verify_locations(cadata=(pki / CA_CERT_FILE).read_text(encoding="ascii"))
        ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx
