"""Security: node identity (CA, keys, certificates), TLS settings, revocation, tokens.

Pure library code: it signs, verifies and decides; the control plane's store and APIs and the
agent do the I/O around it. See docs/security.md for the model.
"""

from __future__ import annotations

from edgewise.security.pki import (
    CertificateAuthority,
    ChallengeError,
    CsrError,
    IdentityError,
    InvalidNodeId,
    IssuedCert,
    generate_key,
    load_key,
    make_csr,
    needs_renewal,
    node_id_from_cert,
    node_uri,
    public_key_fingerprint,
    save_key,
    sign_challenge,
    verify_challenge,
    write_atomic,
)
from edgewise.security.tls import (
    CertificateRevoked,
    RevocationList,
    authenticate_peer,
    client_context,
    peer_certificate,
    peer_node_id,
    server_context,
)
from edgewise.security.tokens import (
    EnrolmentToken,
    Forbidden,
    NewToken,
    OperatorToken,
    Role,
    TokenError,
    TokenExpired,
    TokenInvalid,
    TokenUsedUp,
    hash_token,
    new_token,
    verify,
)

__all__ = [
    "CertificateAuthority",
    "CertificateRevoked",
    "ChallengeError",
    "CsrError",
    "EnrolmentToken",
    "Forbidden",
    "IdentityError",
    "InvalidNodeId",
    "IssuedCert",
    "NewToken",
    "OperatorToken",
    "RevocationList",
    "Role",
    "TokenError",
    "TokenExpired",
    "TokenInvalid",
    "TokenUsedUp",
    "authenticate_peer",
    "client_context",
    "generate_key",
    "hash_token",
    "load_key",
    "make_csr",
    "needs_renewal",
    "new_token",
    "node_id_from_cert",
    "node_uri",
    "peer_certificate",
    "peer_node_id",
    "public_key_fingerprint",
    "save_key",
    "server_context",
    "sign_challenge",
    "verify",
    "verify_challenge",
    "write_atomic",
]
