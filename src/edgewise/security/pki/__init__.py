"""Node identity: the certificate authority, node keys, CSRs and proof of possession.

Pure cryptography plus atomic file writes; no network, no database. The control plane's store and
device API call these functions; the agent calls the node-side ones. The parts, by job:

* `edgewise.security.pki.ca`: the CA (`CertificateAuthority`: create, load, issue node and
  server certificates, check a node certificate outside TLS) and `IssuedCert`;
* `edgewise.security.pki.certs`: node names and certificates (`node_uri`, `node_id_from_cert`,
  `needs_renewal`, node id and trust domain checks);
* `edgewise.security.pki.keys`: node keys (`generate_key`, `load_key`, `save_key`), CSRs,
  `public_key_fingerprint` and proof of possession.

This package re-exports their public names, so ``from edgewise.security import pki`` and
``pki.<name>`` keep working; `write_atomic` is the one implementation in
`edgewise.common.files`, re-exported here for callers that save what the CA issued.

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

from edgewise.common.files import write_atomic
from edgewise.security.pki.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CA_LIFETIME,
    CLOCK_SKEW,
    DEFAULT_TRUST_DOMAIN,
    MAX_CSR_BYTES,
    NODE_CERT_LIFETIME,
    SERVER_CERT_LIFETIME,
    CertificateAuthority,
    CsrError,
    IssuedCert,
)
from edgewise.security.pki.certs import (
    RENEW_FRACTION,
    IdentityError,
    InvalidNodeId,
    as_cert,
    needs_renewal,
    node_id_from_cert,
    node_uri,
    validate_node_id,
    validate_trust_domain,
)
from edgewise.security.pki.keys import (
    CHALLENGE_CONTEXT,
    MIN_NONCE_BYTES,
    ChallengeError,
    KeyLike,
    generate_key,
    load_key,
    make_csr,
    public_key_fingerprint,
    save_key,
    sign_challenge,
    verify_challenge,
)

# the name `as_cert` had while this package was one module; tests/integration/
# test_agent_fakecloud.py still reads a certificate with it
_as_cert = as_cert

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_LIFETIME",
    "CHALLENGE_CONTEXT",
    "CLOCK_SKEW",
    "DEFAULT_TRUST_DOMAIN",
    "MAX_CSR_BYTES",
    "MIN_NONCE_BYTES",
    "NODE_CERT_LIFETIME",
    "RENEW_FRACTION",
    "SERVER_CERT_LIFETIME",
    "CertificateAuthority",
    "ChallengeError",
    "CsrError",
    "IdentityError",
    "InvalidNodeId",
    "IssuedCert",
    "KeyLike",
    "as_cert",
    "generate_key",
    "load_key",
    "make_csr",
    "needs_renewal",
    "node_id_from_cert",
    "node_uri",
    "public_key_fingerprint",
    "save_key",
    "sign_challenge",
    "validate_node_id",
    "validate_trust_domain",
    "verify_challenge",
    "write_atomic",
]
