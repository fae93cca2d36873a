"""Node names and certificates: who a certificate names, and when it is due for renewal.

A node is named by exactly one SAN URI ``spiffe://<trust_domain>/node/<node_id>``
(`node_uri`); `node_id_from_cert` reads it back and checks it against the trust domain.
`needs_renewal` says when 2/3 of a certificate's lifetime has passed. No signatures are checked
here: see `edgewise.security.pki.ca.CertificateAuthority.verify_node_cert` and
`edgewise.security.tls`.
"""

from __future__ import annotations

import re
from datetime import datetime

from cryptography import x509

from edgewise.errors import ConfigError, PeerError

RENEW_FRACTION = 2 / 3

_NODE_ID = re.compile(r"[a-z0-9-]{1,64}")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")


class InvalidNodeId(ConfigError):
    """A node id or trust domain does not match the allowed pattern."""


class IdentityError(PeerError):
    """A certificate does not carry a node identity of our trust domain."""

    status = 401  # HTTP status for the API layer


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


def as_cert(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    """A certificate object from a certificate, PEM or DER; `IdentityError` if unreadable."""
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode() if isinstance(cert, str) else bytes(cert)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError("not a readable X.509 certificate") from exc


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The SAN URIs of ``cert`` (none when it has no SAN extension)."""
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
    certificate = as_cert(cert)
    uris = uri_sans(certificate)
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


def needs_renewal(
    cert: x509.Certificate | bytes | str, now: datetime, fraction: float = RENEW_FRACTION
) -> bool:
    """True once ``fraction`` of the certificate's validity period has passed at ``now``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    certificate = as_cert(cert)
    start = certificate.not_valid_before_utc
    end = certificate.not_valid_after_utc
    return aware(now) >= start + (end - start) * fraction


def aware(now: datetime) -> datetime:
    """``now``, refused (ValueError) when it has no time zone."""
    if now.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (use datetime.now(UTC))")
    return now

