"""TPM enrolment on the control plane: a certificate only for the TPM it challenged.

A node with a TPM sends, with its enrolment token and CSR (the TPM node key's, or its TLS
file key's with the TPM node key's signature over it, the ``binding``): its EK public area
(and the EK certificate, when the TPM has one), the public areas of its node key and AK.
`TpmEnrolments.begin` checks them (`check_key_public`: TPM-made, fixed, P-256; the CSR is
signed by and names the TPM node key; the EK certificate chains to a configured manufacturer
CA when any is configured) and makes two credentials to the EK, one bound to each key's name.
`finish` takes the two secrets the node's TPM recovered: only the TPM holding that EK with both
keys loaded can recover them (`edgewise.security.tpm.credential`). Then the CSR may be signed,
and the node is registered with its EK fingerprint and AK (`TpmNode`), which every later quote
must be signed by.

Pending challenges are single use, expire (`ttl`), and are bounded (`limit`).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgewise.errors import StorageError
from edgewise.security.tpm.credential import (
    MAX_PUBLIC_BYTES,
    AttestationRefused,
    Challenge,
    check_binding,
    check_ek_certificate,
    check_key_public,
    ek_fingerprint,
    make_challenge,
)

MAX_PENDING = 10_000
MAX_CSR_BYTES = 4096


@dataclass(frozen=True)
class TpmNode:
    """What the control plane registers for a TPM node."""

    ek_fingerprint: str
    ak_public: bytes  # marshalled TPMT_PUBLIC
    node_key_public: bytes


@dataclass(frozen=True)
class EnrolmentChallenge:
    id: str
    credentials: tuple[tuple[bytes, bytes], ...]  # (blob, secret) for the node key, the AK


@dataclass
class _Pending:
    node: TpmNode
    csr_pem: bytes
    challenges: tuple[Challenge, Challenge]
    expires: float


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


class TpmEnrolments:
    def __init__(self, manufacturers: Sequence[x509.Certificate] = (), ttl: float = 60.0,
                 limit: int = MAX_PENDING, clock: Callable[[], float] = time.monotonic) -> None:
        self.manufacturers = list(manufacturers)
        self.ttl, self.limit, self.clock = ttl, limit, clock
        self._pending: OrderedDict[str, _Pending] = OrderedDict()

    def _prune(self, now: float) -> None:
        while self._pending:
            key, entry = next(iter(self._pending.items()))
            if entry.expires > now:
                break
            del self._pending[key]

    def begin(self, csr_pem: bytes, ek_public: bytes, node_key_public: bytes,
              ak_public: bytes, ek_certificate: bytes | None = None,
              binding: bytes | None = None) -> EnrolmentChallenge:
        """Check the node's TPM evidence and challenge its TPM. `AttestationRefused`.

        The CSR is the TPM node key's own, or, with ``binding`` (the TPM node key's signature
        over `binding_message` of the CSR), the node's TLS file key's."""
        if not isinstance(csr_pem, bytes) or not 0 < len(csr_pem) <= MAX_CSR_BYTES:
            raise AttestationRefused("CSR: missing or too large")
        for part in (ek_public, node_key_public, ak_public):
            if not isinstance(part, bytes) or not 0 < len(part) <= MAX_PUBLIC_BYTES:
                raise AttestationRefused("TPM public area: missing or too large")
        node_key = check_key_public(node_key_public, attestation=False)
        check_key_public(ak_public, attestation=True)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise AttestationRefused("CSR: not readable") from None
        if not csr.is_signature_valid:
            raise AttestationRefused("CSR: its signature does not verify")
        if binding is not None:
            check_binding(node_key_public, binding, csr_pem)
        elif _spki(csr.public_key()) != _spki(node_key):
            raise AttestationRefused("CSR: not signed by the TPM node key")
        if self.manufacturers:
            if ek_certificate is None:
                raise AttestationRefused("EK certificate: required by this control plane")
            check_ek_certificate(ek_certificate, ek_public, self.manufacturers)
        node = TpmNode(ek_fingerprint(ek_public), ak_public, node_key_public)
        challenges = (make_challenge(ek_public, node_key_public),
                      make_challenge(ek_public, ak_public))
        now = self.clock()
        self._prune(now)
        if len(self._pending) >= self.limit:
            raise StorageError("too many pending TPM enrolments; retry later")
        cid = secrets.token_urlsafe(24)
        self._pending[cid] = _Pending(node, csr_pem, challenges, now + self.ttl)
        return EnrolmentChallenge(cid, tuple((c.blob, c.secret) for c in challenges))

    def finish(self, challenge_id: str, answers: Sequence[bytes]) -> tuple[TpmNode, bytes]:
        """The TPM's answers to `begin`'s challenge: the node and its CSR (to sign), or
        `AttestationRefused`. A challenge is used up by any answer, right or wrong."""
        entry = self._pending.pop(challenge_id, None)
        if entry is None or entry.expires <= self.clock():
            raise AttestationRefused("TPM challenge: unknown, used or expired; start again")
        if len(answers) != 2 or not all(
                c.answered_by(a) for c, a in zip(entry.challenges, answers, strict=True)):
            raise AttestationRefused("TPM challenge: wrong answer (not the challenged TPM)")
        return entry.node, entry.csr_pem
