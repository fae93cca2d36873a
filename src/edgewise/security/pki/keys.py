"""Node keys, CSRs and proof of possession.

A node makes its own P-256 key (`generate_key`, stored 0600 with the one atomic write,
`edgewise.common.files.write_atomic`), which never leaves it, and sends a CSR (`make_csr`). The
same key is recognised everywhere by `public_key_fingerprint` (private key, public key, CSR and
certificates give the same value). A node whose certificate expired during an outage proves it
still holds its registered key by signing the control plane's nonce (`sign_challenge` /
`verify_challenge`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from edgewise.common.files import write_atomic
from edgewise.errors import ConfigError, PeerError, StorageError
from edgewise.security.pki.certs import IdentityError

log = logging.getLogger(__name__)

MIN_NONCE_BYTES = 16
# Prepended to every proof-of-possession nonce, so a node key never signs data chosen freely by
# the other side (a challenge signature cannot be reused as a signature over anything else).
CHALLENGE_CONTEXT = b"edgewise proof-of-possession v1\x00"


class ChallengeError(PeerError):
    """A proof-of-possession signature does not verify."""

    status = 401  # HTTP status for the API layer


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
        raise ChallengeError(f"expected an ECDSA public key, got {describe_key(pub)}")
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


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for ``key``. Its subject is a placeholder: the CA names the node itself."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgewise-node")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def describe_key(key: object) -> str:
    """A key's kind for an error message: "ECDSA secp256r1", "RSAPublicKey", ..."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.lstrip("_")
