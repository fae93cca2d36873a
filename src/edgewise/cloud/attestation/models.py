"""The attestation routes' bodies and answers, for the OpenAPI document (`api.ROUTES`).

The handlers read the JSON themselves (`api._body`) and check each field; these models
describe the same fields (base64 for binary ones).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edgewise.cloud.openapi.models import Model


class TpmEnrolRequest(Model):
    token: str
    csr: str = Field(description="PEM CSR of the node's TLS key (P-256).")
    ek_public: str = Field(description="base64 TPMT_PUBLIC of the endorsement key.")
    ek_certificate: str | None = Field(None, description="base64 DER EK certificate.")
    node_key_public: str = Field(description="base64 TPMT_PUBLIC of the TPM node key.")
    ak_public: str = Field(description="base64 TPMT_PUBLIC of the attestation key.")
    binding: str = Field(description="base64 DER ECDSA signature of the TPM node key over "
                                     "'edgewise tpm binding v1\\0' + csr.")


class Credential(Model):
    blob: str = Field(description="base64 TPM2B_ID_OBJECT")
    secret: str = Field(description="base64 TPM2B_ENCRYPTED_SECRET")


class TpmChallenge(Model):
    challenge: str
    credentials: list[Credential] = Field(description="For the node key, then the AK.")


class TpmFinishRequest(Model):
    token: str
    challenge: str
    answers: list[str] = Field(description="base64 secrets the TPM recovered, in order.")


class AttestChallenge(Model):
    nonce: str = Field(description="base64, 32 bytes, single use, valid 60 s.")
    pcrs: list[int]


class Evidence(Model):
    nonce: str
    quote: str = Field(description="base64 TPMS_ATTEST")
    signature: str = Field(description="base64 TPMT_SIGNATURE")
    events: list[dict[str, Any]] = Field(description="The event log: {pcr, kind, digest}.")
    pcr_values: dict[str, str] | None = Field(None, description=(
        "sha256 hex value of each quoted PCR by number (the firmware PCRs are judged by "
        "these; the quote's PCR digest proves them)."))


class Verdict(Model):
    node_id: str
    attestation: str = Field(description="tpm or none")
    quarantined: bool
    reason: str | None
    measurements: dict[str, str]
