"""The HTTP API's pydantic models: every request, query and answer, and label selectors.

One model per body, query and response of each route in `routes` (operator API, device API,
service endpoints); the operator client (`client`) sends and parses the same models.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgewise.security.tokens import validate_labels

MAX_LIMIT = 100_000  # records per data query
MAX_INT = 2**63 - 1  # sequence numbers and ids are 64-bit signed in the store
# a lifetime or expiry in seconds (now + it must stay a datetime, which ends in the year 9999)
MAX_SECONDS = 100 * 366 * 86400  # 100 years
_SELECTOR_PART = re.compile(r"^\s*([^=\s]+)\s*=\s*([^=\s]*)\s*$")


def parse_selector(text: str) -> dict[str, str]:
    """``site=plant1,line=1`` → ``{"site": "plant1", "line": "1"}`` (label equality, AND).

    Raises ValueError naming the bad part (the API answers 400 with it).
    """
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        m = _SELECTOR_PART.match(part)
        if m is None:
            raise ValueError(f"selector part {part.strip()!r} is not key=value")
        key, value = m.group(1), m.group(2)
        if key in out and out[key] != value:
            raise ValueError(f"selector asks for {key}={out[key]} and {key}={value}")
        out[key] = value
    if not out:
        raise ValueError("empty selector; write key=value[,key=value...]")
    return validate_labels(out)


class Model(BaseModel):
    # NaN and Infinity are not JSON numbers: a float field refuses them (400 naming it)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- common -----------------------------------------------------------------------------------


class ErrorResponse(Model):
    error: str = Field(description="What went wrong and what to do about it.")


# -- tokens -----------------------------------------------------------------------------------


class EnrolmentTokenRequest(Model):
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="Labels a node enrolled with this token gets.")
    ttl_s: float = Field(default=3600.0, gt=0, le=366 * 86400, description="Lifetime, seconds.")
    uses: int = Field(default=1, ge=1, le=1_000_000, description="Nodes that may enrol with it.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return validate_labels(v)


class EnrolmentTokenResponse(Model):
    token: str = Field(description="The plaintext token: shown once, stored only hashed.")
    labels: dict[str, str]
    uses: int
    expires_at: datetime


class OperatorTokenRequest(Model):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@-]+$",
                      description="Who holds it; shown in the audit log.")
    role: Literal["admin", "operator", "viewer"]
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS,
                                description="Lifetime (at most 100 years); none: no expiry.")


class OperatorTokenResponse(Model):
    token: str = Field(description="The plaintext token: shown once, stored only hashed.")
    name: str
    role: str
    expires_at: datetime | None


class OperatorTokenInfo(Model):
    hash_prefix: str = Field(description="First 12 hex digits of the token's sha256.")
    name: str
    role: str
    created: datetime
    expires_at: datetime | None
    revoked: bool


class OperatorTokenList(Model):
    tokens: list[OperatorTokenInfo]


class OperatorTokenRevokeRequest(Model):
    token: str = Field(min_length=1, max_length=128, description="The plaintext token.")


class OperatorTokenRevokeResponse(Model):
    revoked: bool


# -- nodes ------------------------------------------------------------------------------------


class NodeListQuery(Model):
    selector: str | None = Field(default=None, description="Label equality: site=plant1,line=1")
    limit: int = Field(default=1000, ge=1, le=1000)
    after: str | None = Field(default=None, description="Page after this node id.")

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        if v is not None:
            parse_selector(v)
        return v


class Node(Model):
    id: str
    labels: dict[str, str]
    status: str = Field(description="enrolled, online, offline, revoked or decommissioned")
    key_fingerprint: str
    cert_serial: str = Field(description="Hex serial of the current certificate.")
    cert_expiry: datetime
    created: datetime
    last_seen: datetime | None
    revoked: bool
    decommissioned_at: datetime | None = Field(
        default=None, description="When the node was decommissioned (it is revoked too).")
    decommissioned_by: str | None = Field(default=None, description="The operator who did.")
    wipe: bool = Field(default=False, description=(
        "Decommissioned with --wipe: the node deletes its keys and data when it hears it."))
    attestation: str | None = Field(default=None, description=(
        "tpm: enrolled with a TPM (attests); none: a file key only (docs/security.md)."))
    quarantine: str | None = Field(default=None, description=(
        "Why it is quarantined (its data kept apart, only a release reaches it); null: "
        "it is not."))


class NodeList(Model):
    nodes: list[Node]
    next: str | None = Field(description="Pass as ?after= for the next page; null at the end.")


class Reported(Model):
    applied_version: int | None
    status: str
    counters: dict[str, int]
    setpoints: dict[str, Any] = Field(description=(
        "The node's setpoints merged with the cloud's writes (last writer wins)."))
    pending_setpoints: list[str] = Field(default_factory=list, description=(
        "Keys whose value in setpoints the node has not reported having yet (a cloud write "
        "not pulled yet, or held because the node's clock is behind)."))
    updated: datetime


class SeqRangeModel(Model):
    first: int
    count: int
    reason: str | None = None


class StreamStat(Model):
    node: str
    stream: str
    records_stored: int = Field(description="Records stored (each exactly once).")
    contiguous_mark: int = Field(description="Every sequence number below it is settled.")
    highest_contiguous_seq: int | None = Field(
        description="contiguous_mark - 1: the highest seq with nothing missing at or below it."
    )
    lost_records: int = Field(description="Sequence numbers the node reported dropped (gaps).")
    last_received: datetime | None
    gaps: list[SeqRangeModel] | None = Field(
        default=None, description="Ranges the node reported lost, with the reason (?node= only)."
    )
    missing: list[SeqRangeModel] | None = Field(
        default=None,
        description="Ranges above the mark not received yet (?node= only), e.g. during resends.",
    )


class NodeDetail(Node):
    desired_version: int
    reported: Reported | None
    streams: list[StreamStat]
    state: str | None = Field(default=None, description=(
        "Health state: online, degraded, offline or quarantined (docs/operations.md)."))
    reasons: list[str] = Field(default_factory=list, description="Why it is in that state.")
    health: dict[str, Any] | None = Field(default=None, description=(
        "The newest health from the node's heartbeat (sync.health), with clock_offset_s."))
    health_at: datetime | None = None


class LabelPatch(Model):
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @field_validator("set")
    @classmethod
    def _set(cls, v: dict[str, str]) -> dict[str, str]:
        return validate_labels(v)


class RevokeRequest(Model):
    reason: str = Field(default="", max_length=500)


class DecommissionRequest(Model):
    wipe: bool = Field(default=False, description=(
        "The node deletes its keys, identity, outbox, twin and release slots when it hears "
        "it (on its live session now, or on its next request), and exits."))
    reason: str = Field(default="", max_length=500)


# -- desired state ----------------------------------------------------------------------------


class Desired(Model):
    version: int
    pipelines: dict[str, str] | None = Field(
        description="Pipeline name -> YAML text; {}: run none; null: none named (the node runs "
                    "its own --pipeline).")
    config: dict[str, Any]
    labels: dict[str, str]
    expires_at: float | None = Field(description="Unix seconds; not applied after it.")
    release: str | None = Field(default=None, description="The release version the node "
                                "should run (`edgewise release list`); absent: none assigned.")


class ConfigSetRequest(Model):
    node: str | None = Field(default=None, description="One node; or give selector.")
    selector: str | None = Field(default=None, description="Every node matching site=a,line=1.")
    pipelines: dict[str, str] | None = Field(
        default=None,
        description="Replaces the node's pipelines (name -> YAML; {}: run none); null: keep.",
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="Merged into the node's config key by key; a null value removes a key.",
    )
    setpoints: dict[str, Any] | None = Field(
        default=None,
        description="Setpoint writes, stamped with the cloud's hybrid logical clock "
                    "(last writer wins against writes made on site).",
    )
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS,
                                       description="Nodes that have not applied it by then never "
                                                   "will (at most 100 years).")
    release: str | None = Field(default=None, description="Assign this published release "
                                "(a version); \"\" assigns none; null: keep the assigned one.")

    @model_validator(mode="after")
    def _target(self) -> ConfigSetRequest:
        if (self.node is None) == (self.selector is None):
            raise ValueError("give exactly one of node and selector")
        if self.selector is not None:
            parse_selector(self.selector)
        if (self.pipelines is None and self.config is None and self.setpoints is None
                and self.release is None):
            raise ValueError("nothing to set: give pipelines, config, setpoints or release")
        if self.config and "setpoints" in self.config:
            raise ValueError("config.setpoints is managed by the setpoints field")
        return self


class NodeVersion(Model):
    node: str
    version: int
    notified: bool = Field(description="True if the node's live session was poked.")


class HeldNode(Model):
    node: str
    reason: str = Field(description="Why the node is quarantined.")


class ConfigSetResponse(Model):
    nodes: list[NodeVersion]
    held: list[HeldNode] = Field(default_factory=list, description=(
        "Quarantined nodes the selector matched: nothing but a release goes to them."))


class ConfigQuery(Model):
    node: str


class ConfigGetResponse(Model):
    node: str
    desired: Desired | None
    reported: Reported | None


# -- data -------------------------------------------------------------------------------------


class StatsQuery(Model):
    node: str | None = None


class StatsResponse(Model):
    streams: list[StreamStat]


class DataQuery(Model):
    node: str
    stream: str
    since: float | None = Field(default=None, description="Records with ts >= this (Unix s).")
    from_seq: int = Field(default=0, ge=0, le=MAX_INT,
                          description="Start at this sequence number.")
    limit: int = Field(default=1000, ge=1, le=MAX_LIMIT)
    include_quarantined: bool = Field(default=False, description=(
        "Also records the node sent while it was quarantined (left out by default)."))


class Record(Model):
    seq: int
    data: dict[str, Any]


class DataQueryResponse(Model):
    node: str
    stream: str
    records: list[Record]
    next_seq: int | None = Field(description="Pass as from_seq for more; null at the end.")
    quarantined: list[SeqRangeModel] = Field(default_factory=list, description=(
        "The chunks (seq ranges) of this page that the node sent while it was quarantined "
        "(only with include_quarantined)."))


# -- audit ------------------------------------------------------------------------------------


class AuditQuery(Model):
    target: str | None = None
    actor: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    before_id: int | None = Field(default=None, ge=0, le=MAX_INT)


class AuditEntry(Model):
    id: int
    ts: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class AuditList(Model):
    entries: list[AuditEntry]
    next_before_id: int | None


# -- device API (docs/decisions/0004) ---------------------------------------------------------


class EnrolRequest(Model):
    token: str
    csr: str = Field(description="PEM certificate signing request (P-256 key).")


class EnrolResponse(Model):
    node_id: str
    certificate: str
    ca: str
    trust_domain: str
    expires_at: datetime
    tuf_root: str | None = Field(
        default=None,
        description="The newest signed TUF root (JSON text) the node trusts for releases; "
                    "null until the control plane's keys are made (`edgewise cloud keys init`).",
    )


class RenewRequest(Model):
    csr: str


class CertificateResponse(Model):
    certificate: str
    expires_at: datetime


class ChallengeRequest(Model):
    node_id: str


class ChallengeResponse(Model):
    nonce: str = Field(description="base64, 32 bytes, single use, valid 60 s.")


class ReauthRequest(Model):
    node_id: str
    nonce: str
    signature: str
    certificate: str = Field(description="The node's expired certificate (PEM).")
    csr: str


class DesiredQuery(Model):
    version: int | None = Field(default=None, ge=0, le=MAX_INT)


class DesiredResponse(Model):
    version: int
    desired: Desired | None


class Health(Model):
    status: str
    version: str
    sessions: int  # live sessions of the process that answered
    process: int = 0  # which of `cloud serve --processes N` answered (0 to N-1)


class Readiness(Model):
    status: str  # ready | not ready
    why: str | None = None  # what is not ready
    schema_revision: str | None = None  # the store's alembic_version
