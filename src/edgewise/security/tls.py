"""TLS settings for the device channel, the peer's node identity, and revocation.

* `server_context`: TLS 1.3 only, the client certificate verified against our CA (required by
  default; optional for the enrolment endpoint, where a node has no certificate yet).
* `client_context`: TLS 1.3 only, the server verified against our CA only (not the system store)
  with host name checking on.
* `peer_node_id`: the node id from the verified certificate of a TLS session, never from a
  header or the peer's address.
* `authenticate_peer`: what the server checks right after the handshake (identity, validity,
  revocation).
* `RevocationList`: Python's ``ssl`` module verifies the chain during the handshake but cannot ask
  our database whether a certificate was revoked. So the server checks the verified peer
  certificate against a `RevocationList` right after the handshake, before it reads a request:
  a revoked certificate gets 403 and the session is closed. Certificates are short-lived, so a
  revoked one is also dead within a day at most; revoking the node's key fingerprint also stops
  it from renewing or re-authenticating.

Errors: `ConfigError` for unreadable certificate or key files, `IdentityError` (a `PeerError`)
when the peer has no usable identity, `CertificateRevoked` (a `PeerError`) when it is revoked.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509

from edgewise.errors import ConfigError, PeerError
from edgewise.security.pki.certs import IdentityError, node_id_from_cert
from edgewise.security.pki.keys import public_key_fingerprint


class CertificateRevoked(PeerError):
    """The peer's certificate, or its key, has been revoked. Answer 403 and close the session."""

    status = 403


class _HasPeerCert(Protocol):
    context: ssl.SSLContext

    def getpeercert(self, binary_form: bool = ...) -> object: ...


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # RFC 5280 checks OpenSSL skips by default (our CA issues compliant certificates).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _load_ca(ctx: ssl.SSLContext, ca_path: str | os.PathLike[str]) -> None:
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca_path))
    except FileNotFoundError as exc:
        raise ConfigError(f"CA certificate {ca_path} not found") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load CA certificate {ca_path}: {exc}") from exc


def _load_chain(
    ctx: ssl.SSLContext, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> None:
    for p in (cert_path, key_path):
        if not Path(p).is_file():
            raise ConfigError(f"{p} not found")
    try:
        ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load certificate {cert_path} with key {key_path}: {exc} "
            "(do they belong together?)"
        ) from exc


def server_context(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    ca_path: str | os.PathLike[str],
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """The control plane's TLS context for the device API.

    TLS 1.3 only; client certificates verified against ``ca_path``. With
    ``require_client_cert=False`` (enrolment and re-authentication endpoints only) a client may
    connect without a certificate, but one it does present must still verify.
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, cert_path, key_path)
    _load_ca(ctx, ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # No TLS 1.3 session tickets: a resumed session skips certificate verification, so a node
    # could resume after its certificate expired. Sessions are long-lived; a full handshake on
    # reconnect costs a few milliseconds (docs/security.md).
    ctx.num_tickets = 0
    return ctx


def client_context(
    ca_path: str | os.PathLike[str],
    cert_path: str | os.PathLike[str] | None = None,
    key_path: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A node's TLS context: trusts only our CA, checks the host name, TLS 1.3 only.

    Give both ``cert_path`` and ``key_path`` to authenticate as a node, or neither (enrolment).
    """
    if (cert_path is None) != (key_path is None):
        raise ConfigError("give both the client certificate and its key, or neither")
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca_path)
    if cert_path is not None and key_path is not None:
        _load_chain(ctx, cert_path, key_path)
    return ctx


def peer_certificate(ssl_object: _HasPeerCert) -> x509.Certificate:
    """The verified certificate of the peer of a TLS session (`ssl.SSLObject` or `SSLSocket`).

    Raises `IdentityError` when the peer sent none, or when the session's context does not
    verify peer certificates (a certificate that was not verified names nobody).
    """
    if ssl_object is None:
        raise IdentityError("not a TLS session: there is no peer certificate")
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        raise IdentityError("this TLS context does not verify peer certificates")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("the peer presented no client certificate")
    return x509.load_der_x509_certificate(der)  # type: ignore[arg-type]


def peer_node_id(ssl_object: _HasPeerCert, trust_domain: str) -> str:
    """The node id named by the verified client certificate of a TLS session.

    With aiohttp: ``request.transport.get_extra_info("ssl_object")``; with asyncio streams:
    ``writer.get_extra_info("ssl_object")``. Raises `IdentityError`.
    """
    return node_id_from_cert(peer_certificate(ssl_object), trust_domain)


class RevocationList:
    """Revoked certificate serials and revoked key fingerprints, checked after the handshake.

    Pure and in memory: the store loads it at start and adds to it when an operator revokes a
    node (revoke the node's key fingerprint to stop renewals and re-authentication too). Safe to
    share between threads.
    """

    def __init__(self, serials: Iterable[int] = (), fingerprints: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._serials: set[int] = set(serials)
        self._fingerprints: set[str] = {f.lower() for f in fingerprints}

    def __repr__(self) -> str:
        return f"RevocationList({len(self._serials)} serials, {len(self._fingerprints)} keys)"

    def __len__(self) -> int:
        return len(self._serials) + len(self._fingerprints)

    def revoke_serial(self, serial: int) -> None:
        with self._lock:
            self._serials.add(serial)

    def revoke_key(self, fingerprint: str) -> None:
        """Revoke every certificate for this key (sha256 SPKI hex, `public_key_fingerprint`)."""
        with self._lock:
            self._fingerprints.add(fingerprint.lower())

    def is_revoked(self, cert: x509.Certificate, fingerprint: str | None = None) -> bool:
        """``fingerprint``: ``cert``'s `public_key_fingerprint` when the caller has it."""
        return self.revoked(cert.serial_number, fingerprint or public_key_fingerprint(cert))

    def revoked(self, serial: int, fingerprint: str) -> bool:
        """`is_revoked` for a certificate's serial and key fingerprint read before (a live
        session's, checked every maintenance round: no parse, no hash)."""
        with self._lock:
            return serial in self._serials or fingerprint in self._fingerprints

    def check(self, cert: x509.Certificate, fingerprint: str | None = None) -> None:
        """Raise `CertificateRevoked` when ``cert``'s serial or key is revoked."""
        if self.is_revoked(cert, fingerprint):
            raise CertificateRevoked(
                f"certificate serial {cert.serial_number:x} (or its key) has been revoked"
            )


def authenticate_peer(
    ssl_object: _HasPeerCert,
    trust_domain: str,
    revocations: RevocationList | None = None,
    *,
    now: datetime | None = None,
    cert: x509.Certificate | None = None,
    fingerprint: str | None = None,
) -> str:
    """Everything the device API checks right after the handshake; returns the node id.

    The peer's verified certificate must name a node of ``trust_domain``, be within its
    validity period at ``now`` (checked again here because a resumed TLS session does not
    re-verify the certificate), and be neither revoked by serial nor by key. Raises
    `IdentityError` (answer 401) or `CertificateRevoked` (answer 403); close the session after.
    ``cert`` and ``fingerprint``: `peer_certificate` of ``ssl_object`` and its key's
    fingerprint, when the caller has them already (each costs a parse or a hash per session).
    """
    cert = cert if cert is not None else peer_certificate(ssl_object)
    node_id = node_id_from_cert(cert, trust_domain)
    t = now if now is not None else datetime.now(UTC)
    if not cert.not_valid_before_utc <= t <= cert.not_valid_after_utc:
        raise IdentityError(
            f"certificate of node {node_id} is not valid at {t:%Y-%m-%d %H:%M:%S}Z "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z)"
        )
    if revocations is not None:
        revocations.check(cert, fingerprint)
    return node_id
