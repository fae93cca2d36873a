"""The control plane's side of TPM enrolment: a credential only the challenged TPM can open.

`make_challenge(ek_public, key_public)`: TPM2_MakeCredential done in software (tpm2-pytss's
``make_credential``): a random 32-byte secret, encrypted to the node's endorsement key and
bound to the *name* of the key (the hash of its public area, attributes included). The TPM
gives the secret back (TPM2_ActivateCredential) only when it holds that EK's private part and
has the named key loaded. A TPM loads a key with ``fixedTPM`` only when it made the key itself
(imported and external keys must have it clear), so a correct answer proves that key lives in
that TPM (the argument of TCG's credential protocol; Keylime and SPIRE rely on it).

`check_key_public`: the public area a node sends must be the key it claims and carry the
attributes that make it a TPM-bound key (ECDSA P-256, fixedTPM, fixedParent,
sensitiveDataOrigin; the attestation key also ``restricted``).

`check_ek_certificate`: when the operator configures the TPM manufacturers' CA certificates,
the node's EK certificate must be issued by one of them, valid now, and certify the very EK the
credential was made for.

Input from the node is bounded (`MAX_PUBLIC_BYTES`) before it is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edgewise.errors import PeerError

BINDING_CONTEXT = b"edgewise tpm binding v1\x00"
MAX_PUBLIC_BYTES = 1024  # a marshalled TPMT_PUBLIC (RSA 2048 EK: about 360 bytes)
MAX_CERT_BYTES = 8192


class AttestationRefused(PeerError):
    """The node's TPM evidence does not hold. The message never carries expected values."""

    status = 401


class AttestationRequired(PeerError):
    """This control plane accepts only nodes that enrol with a TPM."""

    status = 403


@dataclass(frozen=True)
class Challenge:
    """What the control plane sends (``blob``, ``secret``) and keeps (``expected``)."""

    blob: bytes  # marshalled TPM2B_ID_OBJECT
    secret: bytes  # marshalled TPM2B_ENCRYPTED_SECRET
    expected: bytes

    def answered_by(self, answer: bytes) -> bool:
        return hmac.compare_digest(self.expected, bytes(answer))


def _public(data: bytes, what: str) -> Any:
    from tpm2_pytss.types import TPMT_PUBLIC

    if not isinstance(data, bytes | bytearray) or not 0 < len(data) <= MAX_PUBLIC_BYTES:
        raise AttestationRefused(f"{what}: expected a TPM public area of at most "
                                 f"{MAX_PUBLIC_BYTES} bytes")
    try:
        public, used = TPMT_PUBLIC.unmarshal(bytes(data))
    except Exception:  # the unmarshaller raises several kinds on garbage
        raise AttestationRefused(f"{what}: not a TPM public area") from None
    if used != len(data):
        raise AttestationRefused(f"{what}: trailing bytes after the public area")
    return public


def binding_message(csr_pem: bytes) -> bytes:
    """What the TPM node key signs to bind the node's TLS key (its CSR) to the TPM: Python's
    TLS cannot use a key inside the TPM, so the TLS key is a file key the TPM vouches for."""
    return BINDING_CONTEXT + csr_pem


def check_binding(node_key_public: bytes, binding: object, csr_pem: bytes) -> None:
    """The TPM node key (its public area) signed `binding_message` of ``csr_pem``:
    ``binding`` is that DER ECDSA signature (or base64 of it). `AttestationRefused`."""
    import base64

    if isinstance(binding, str):
        try:
            binding = base64.b64decode(binding, validate=True)
        except ValueError:
            raise AttestationRefused("binding: not base64") from None
    if not isinstance(binding, bytes) or not 0 < len(binding) <= 256:
        raise AttestationRefused("binding: the TPM node key's signature over the CSR is "
                                 "required for this node")
    key = check_key_public(node_key_public, attestation=False)
    try:
        key.verify(binding, binding_message(csr_pem), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationRefused("binding: the CSR is not signed by the TPM node key") from None


def key_name(public_area: bytes) -> bytes:
    """The TPM name of a public area (nameAlg || hash)."""
    return bytes(_public(public_area, "key").get_name())


def make_challenge(ek_public: bytes, key_public: bytes) -> Challenge:
    """A credential for the key ``key_public`` (marshalled TPMT_PUBLIC) in the TPM whose EK
    is ``ek_public``."""
    from tpm2_pytss.utils import make_credential

    ek = _public(ek_public, "endorsement key")
    name = _public(key_public, "key").get_name()
    expected = secrets.token_bytes(32)
    try:
        blob, secret = make_credential(ek, expected, name)
    except ValueError:
        raise AttestationRefused("endorsement key: unsupported key type") from None
    return Challenge(bytes(blob.marshal()), bytes(secret.marshal()), expected)


def public_key_of(public_area: bytes, what: str = "key") -> Any:
    """The `cryptography` public key of a TPM public area."""
    public = _public(public_area, what)
    try:
        return serialization.load_der_public_key(public.to_der())
    except Exception:
        raise AttestationRefused(f"{what}: unsupported key") from None


def check_key_public(public_area: bytes, *, attestation: bool) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a TPM-bound node key (``attestation`` False) or AK (True);
    `AttestationRefused` when the attributes do not make it one."""
    from tpm2_pytss.constants import TPMA_OBJECT

    what = "attestation key" if attestation else "node key"
    public = _public(public_area, what)
    attrs = public.objectAttributes
    needed = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
              | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.SIGN_ENCRYPT)
    if attestation:
        needed |= TPMA_OBJECT.RESTRICTED
    if attrs & needed != needed:
        raise AttestationRefused(f"{what}: not a key the TPM made and keeps "
                                 "(fixedTPM, fixedParent, sensitiveDataOrigin, sign"
                                 f"{', restricted' if attestation else ''} required)")
    if not attestation and attrs & TPMA_OBJECT.RESTRICTED:
        raise AttestationRefused(f"{what}: a restricted key cannot sign a CSR")
    key = public_key_of(public_area, what)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise AttestationRefused(f"{what}: expected ECDSA P-256")
    return key


def ek_fingerprint(ek_public: bytes) -> str:
    """sha256 hex of the EK's DER SubjectPublicKeyInfo (one TPM, one value)."""
    key = public_key_of(ek_public, "endorsement key")
    spki = key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def check_ek_certificate(
    cert_der: bytes, ek_public: bytes, manufacturers: Sequence[x509.Certificate],
    now: datetime | None = None,
) -> None:
    """The EK certificate is issued by one of ``manufacturers``, valid ``now``, and
    certifies ``ek_public``. Raises `AttestationRefused`."""
    if not isinstance(cert_der, bytes | bytearray) or not 0 < len(cert_der) <= MAX_CERT_BYTES:
        raise AttestationRefused("EK certificate: missing or too large")
    try:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
    except ValueError:
        raise AttestationRefused("EK certificate: not readable DER") from None
    when = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise AttestationRefused("EK certificate: not valid now")
    ek = public_key_of(ek_public, "endorsement key")
    if not isinstance(ek, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) or \
            cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo) != \
            ek.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo):
        raise AttestationRefused("EK certificate: certifies another key")
    for ca in manufacturers:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise AttestationRefused("EK certificate: not issued by a configured manufacturer CA")
