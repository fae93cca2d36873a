"""The HTTP API as data: pydantic models of every request and answer, and one route table.

`OPERATOR_ROUTES` is what `operator_api.setup` registers routes *from* (each `Route` names its
handler), and `path_items` renders the same table as OpenAPI 3.1 path items, so the document at
``/openapi.json`` cannot drift from the code: a route that is not in the table is not served,
and ``tests/unit/test_operator_openapi.py`` checks that every route the application serves is
documented. `DEVICE_ROUTES` and `SERVICE_ROUTES` describe the endpoints `device_api` and `app`
register (docs/decisions/0004-device-protocol.md); the same test compares them with the router.

Schemas come from ``model_json_schema`` with nested models inlined (no ``$ref``), because the
application serves path items only (``app[OPENAPI]``), without a components section.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgewise.security.tokens import validate_labels

Access = Literal["viewer", "operator", "admin", "device", "enrolment-token", "proof", "public"]

_ACCESS_TEXT = {
    "viewer": "operator token (`Authorization: Bearer ewo_...`), any role",
    "operator": "operator token with role operator or admin",
    "admin": "operator token with role admin",
    "device": "client certificate (mutual TLS); the node id comes from the verified certificate",
    "enrolment-token": "enrolment token in the body; no client certificate needed",
    "proof": "proof of possession of the node's registered key (expired certificate allowed "
             "within the grace period)",
    "public": "none",
}

MAX_LIMIT = 100_000  # records per data query
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
    model_config = ConfigDict(extra="forbid")


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
    ttl_s: float | None = Field(default=None, gt=0, description="Lifetime; none: no expiry.")


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
    status: str = Field(description="enrolled, online, offline or revoked")
    key_fingerprint: str
    cert_serial: str = Field(description="Hex serial of the current certificate.")
    cert_expiry: datetime
    created: datetime
    last_seen: datetime | None
    revoked: bool


class NodeList(Model):
    nodes: list[Node]
    next: str | None = Field(description="Pass as ?after= for the next page; null at the end.")


class Reported(Model):
    applied_version: int | None
    status: str
    counters: dict[str, int]
    setpoints: dict[str, Any]
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


class LabelPatch(Model):
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @field_validator("set")
    @classmethod
    def _set(cls, v: dict[str, str]) -> dict[str, str]:
        return validate_labels(v)


class RevokeRequest(Model):
    reason: str = Field(default="", max_length=500)


# -- desired state ----------------------------------------------------------------------------


class Desired(Model):
    version: int
    pipelines: dict[str, str] = Field(description="Pipeline name -> YAML text.")
    config: dict[str, Any]
    labels: dict[str, str]
    expires_at: float | None = Field(description="Unix seconds; not applied after it.")


class ConfigSetRequest(Model):
    node: str | None = Field(default=None, description="One node; or give selector.")
    selector: str | None = Field(default=None, description="Every node matching site=a,line=1.")
    pipelines: dict[str, str] | None = Field(
        default=None, description="Replaces the node's pipelines (name -> YAML); null: keep."
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
    expires_in_s: float | None = Field(default=None, gt=0,
                                       description="Nodes that have not applied it by then never "
                                                   "will.")

    @model_validator(mode="after")
    def _target(self) -> ConfigSetRequest:
        if (self.node is None) == (self.selector is None):
            raise ValueError("give exactly one of node and selector")
        if self.selector is not None:
            parse_selector(self.selector)
        if self.pipelines is None and self.config is None and self.setpoints is None:
            raise ValueError("nothing to set: give pipelines, config or setpoints")
        if self.config and "setpoints" in self.config:
            raise ValueError("config.setpoints is managed by the setpoints field")
        return self


class NodeVersion(Model):
    node: str
    version: int
    notified: bool = Field(description="True if the node's live session was poked.")


class ConfigSetResponse(Model):
    nodes: list[NodeVersion]


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
    from_seq: int = Field(default=0, ge=0, description="Start at this sequence number.")
    limit: int = Field(default=1000, ge=1, le=MAX_LIMIT)


class Record(Model):
    seq: int
    data: dict[str, Any]


class DataQueryResponse(Model):
    node: str
    stream: str
    records: list[Record]
    next_seq: int | None = Field(description="Pass as from_seq for more; null at the end.")


# -- audit ------------------------------------------------------------------------------------


class AuditQuery(Model):
    target: str | None = None
    actor: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    before_id: int | None = None


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
    version: int | None = None


class DesiredResponse(Model):
    version: int
    desired: Desired | None


class Health(Model):
    status: str
    version: str
    sessions: int


# -- the route table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str  # operationId; for operator routes also the handler's name in operator_api
    summary: str
    access: Access
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    mutating: bool = False
    not_found: bool = False  # answers 404 for an unknown node or token
    content_type: str = "application/json"


OPERATOR_ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/tokens/enrolment", "create_enrolment_token",
          "Make an enrolment token (plaintext shown once)", "operator", "tokens",
          body=EnrolmentTokenRequest, response=EnrolmentTokenResponse, status=201,
          mutating=True),
    Route("POST", "/v1/tokens/operator", "create_operator_token",
          "Make an operator token (plaintext shown once)", "admin", "tokens",
          body=OperatorTokenRequest, response=OperatorTokenResponse, status=201, mutating=True),
    Route("GET", "/v1/tokens/operator", "list_operator_tokens", "List operator tokens",
          "admin", "tokens", response=OperatorTokenList),
    Route("POST", "/v1/tokens/operator/revoke", "revoke_operator_token",
          "Revoke an operator token", "admin", "tokens", body=OperatorTokenRevokeRequest,
          response=OperatorTokenRevokeResponse, mutating=True, not_found=True),
    Route("GET", "/v1/nodes", "list_nodes", "List nodes, optionally by label selector",
          "viewer", "nodes", query=NodeListQuery, response=NodeList),
    Route("GET", "/v1/nodes/{node_id}", "get_node",
          "One node: identity, labels, desired and reported versions, streams", "viewer",
          "nodes", response=NodeDetail, not_found=True),
    Route("PATCH", "/v1/nodes/{node_id}/labels", "patch_labels",
          "Set and remove labels of a node", "operator", "nodes", body=LabelPatch,
          response=Node, mutating=True, not_found=True),
    Route("POST", "/v1/nodes/{node_id}/revoke", "revoke_node",
          "Revoke a node: its certificate and key, and close its session", "admin", "nodes",
          body=RevokeRequest, response=Node, mutating=True, not_found=True),
    Route("PUT", "/v1/config", "set_config",
          "Assign pipelines, config and setpoints to a node or a label selector", "operator",
          "config", body=ConfigSetRequest, response=ConfigSetResponse, mutating=True,
          not_found=True),
    Route("GET", "/v1/config", "get_config", "A node's newest desired state and its report",
          "viewer", "config", query=ConfigQuery, response=ConfigGetResponse, not_found=True),
    Route("GET", "/v1/data/stats", "data_stats",
          "Per node and stream: records stored, contiguous mark, gaps", "viewer", "data",
          query=StatsQuery, response=StatsResponse, not_found=True),
    Route("GET", "/v1/data/query", "data_query", "Stored records of one stream, in seq order",
          "viewer", "data", query=DataQuery, response=DataQueryResponse, not_found=True),
    Route("GET", "/v1/audit", "list_audit", "The audit log, newest first", "viewer", "audit",
          query=AuditQuery, response=AuditList),
)

DEVICE_ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/device/enrol", "device_enrol", "Enrol a node: CSR + token -> certificate",
          "enrolment-token", "device", body=EnrolRequest, response=EnrolResponse, status=201,
          mutating=True),
    Route("POST", "/v1/device/renew", "device_renew", "Renew the certificate (same key)",
          "device", "device", body=RenewRequest, response=CertificateResponse, mutating=True),
    Route("POST", "/v1/device/reauth/challenge", "device_reauth_challenge",
          "A nonce for re-authentication", "public", "device", body=ChallengeRequest,
          response=ChallengeResponse),
    Route("POST", "/v1/device/reauth", "device_reauth",
          "Re-authenticate with an expired certificate within the grace period", "proof",
          "device", body=ReauthRequest, response=CertificateResponse, mutating=True),
    Route("GET", "/v1/device/desired", "device_desired", "This node's desired state",
          "device", "device", query=DesiredQuery, response=DesiredResponse, not_found=True),
    Route("GET", "/v1/device/session", "device_session",
          "WebSocket upgrade: the node's session (binary msgpack frames, see decision 0004)",
          "device", "device", status=101),
)

SERVICE_ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "healthz", "Liveness", "public", "service", response=Health),
    Route("GET", "/metrics", "metrics", "Prometheus metrics (text format)", "public", "service",
          content_type="text/plain"),
    Route("GET", "/openapi.json", "openapi", "This document", "public", "service"),
)

ALL_ROUTES = OPERATOR_ROUTES + DEVICE_ROUTES + SERVICE_ROUTES


# -- rendering --------------------------------------------------------------------------------


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = _inline(defs[ref.removeprefix("#/$defs/")], defs)
            rest = {k: _inline(v, defs) for k, v in node.items() if k != "$ref"}
            return {**target, **rest}
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def schema(model: type[BaseModel], mode: Literal["validation", "serialization"]) -> dict:
    """JSON Schema (2020-12, as OpenAPI 3.1 takes it) of a model, nested models inlined."""
    raw = model.model_json_schema(mode=mode)
    return _inline(raw, raw.get("$defs", {}))


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"\{(\w+)\}", route.path)
    ]
    if route.query is not None:
        s = schema(route.query, "validation")
        required = set(s.get("required", []))
        for name, prop in s.get("properties", {}).items():
            p: dict[str, Any] = {"name": name, "in": "query", "required": name in required,
                                 "schema": {k: v for k, v in prop.items() if k != "description"}}
            if "description" in prop:
                p["description"] = prop["description"]
            params.append(p)
    return params


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema(ErrorResponse, "serialization")}}}


def operation(route: Route) -> dict[str, Any]:
    """The OpenAPI operation object of one route."""
    op: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary,
        "description": f"Authentication: {_ACCESS_TEXT[route.access]}.",
        "tags": [route.tag],
    }
    params = _parameters(route)
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": schema(route.body, "validation")}}}
    ok: dict[str, Any] = {"description": "Switching protocols" if route.status == 101 else "OK"}
    if route.response is not None:
        ok["content"] = {route.content_type: {"schema": schema(route.response, "serialization")}}
    elif route.content_type != "application/json" or route.name == "openapi":
        ok["content"] = {route.content_type: {"schema": {"type": "string"}
                                              if route.content_type.startswith("text/")
                                              else {"type": "object"}}}
    responses: dict[str, Any] = {str(route.status): ok}
    if route.body is not None or route.query is not None or "{" in route.path:
        responses["400"] = _error("Invalid request (the message names the field)")
    if route.access in ("viewer", "operator", "admin"):
        responses["401"] = _error("No, malformed, unknown, revoked or expired operator token")
        if route.access != "viewer" or route.mutating:
            responses["403"] = _error("The token's role may not do this (says which is needed)")
    elif route.access in ("device", "proof", "enrolment-token"):
        responses["401"] = _error("Not authenticated")
        responses["403"] = _error("Revoked, or not this node's resource")
    if route.not_found:
        responses["404"] = _error("No such node (or token)")
    if route.access != "public":
        responses["503"] = _error("The store is unavailable")
    op["responses"] = responses
    return op


def path_items(routes: Iterable[Route]) -> dict[str, dict[str, Any]]:
    """``{path: {method: operation}}`` for the routes."""
    out: dict[str, dict[str, Any]] = {}
    for r in routes:
        out.setdefault(r.path, {})[r.method.lower()] = operation(r)
    return out


SECURITY_SCHEMES = {
    "operatorToken": {"type": "http", "scheme": "bearer",
                      "description": "Operator token ewo_...; roles admin, operator, viewer."},
}


def document(paths: dict[str, dict[str, Any]], version: str) -> dict[str, Any]:
    """A whole OpenAPI 3.1 document around ``paths`` (for tests and offline use)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Edgewise control plane", "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {"securitySchemes": SECURITY_SCHEMES},
    }
