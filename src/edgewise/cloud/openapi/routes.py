"""The HTTP API's route table and its rendering as OpenAPI 3.1 path items.

Schemas come from ``model_json_schema`` with nested models inlined (no ``$ref``), so path items
stand on their own (``app[OPENAPI]``). The document (`document`, served at ``/openapi.json``)
declares two security schemes, and each operation names the one it takes (`SECURITY`):
``operatorToken`` (HTTP bearer) for the operator API, ``deviceCertificate`` (mutual TLS) for
the device endpoints that take a node's certificate; the others say ``security: []``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from edgewise.cloud.openapi.fleet_models import (
    ConfigApplyRequest,
    ConfigApplyResponse,
    ConfigDiff,
    DiffQuery,
    DriftList,
    DriftQuery,
    FleetNode,
    FleetNodeList,
    FleetNodesQuery,
    LayerList,
    LayerQuery,
    LayerWrite,
    LayerWriteResponse,
    QuarantineRequest,
)
from edgewise.cloud.openapi.models import (
    AuditList,
    AuditQuery,
    CertificateResponse,
    ChallengeRequest,
    ChallengeResponse,
    ConfigGetResponse,
    ConfigQuery,
    ConfigSetRequest,
    ConfigSetResponse,
    DataQuery,
    DataQueryResponse,
    DecommissionRequest,
    DesiredQuery,
    DesiredResponse,
    EnrolmentTokenRequest,
    EnrolmentTokenResponse,
    EnrolRequest,
    EnrolResponse,
    ErrorResponse,
    Health,
    LabelPatch,
    Node,
    NodeDetail,
    NodeList,
    NodeListQuery,
    OperatorTokenList,
    OperatorTokenRequest,
    OperatorTokenResponse,
    OperatorTokenRevokeRequest,
    OperatorTokenRevokeResponse,
    Readiness,
    ReauthRequest,
    RenewRequest,
    RevokeRequest,
    StatsQuery,
    StatsResponse,
)

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
    answers: tuple[tuple[int, str], ...] = ()  # further statuses this route answers, described
    patterns: tuple[tuple[str, str], ...] = ()  # path parameter -> the regex its values match


QUARANTINED = ((409, "The node is quarantined: only a release, a revocation or a decommission "
                     "reach it (docs/security.md)"),)

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
          response=Node, mutating=True, not_found=True, answers=QUARANTINED),
    Route("POST", "/v1/nodes/{node_id}/revoke", "revoke_node",
          "Revoke a node: its certificate and key, and close its session", "admin", "nodes",
          body=RevokeRequest, response=Node, mutating=True, not_found=True),
    Route("POST", "/v1/nodes/{node_id}/decommission", "decommission_node",
          "Decommission a node: revoke it, close its session, keep its record; with wipe the "
          "node deletes its keys and data when it hears it", "admin", "nodes",
          body=DecommissionRequest, response=Node, mutating=True, not_found=True),
    Route("PUT", "/v1/config", "set_config",
          "Assign pipelines, config and setpoints to a node or a label selector", "operator",
          "config", body=ConfigSetRequest, response=ConfigSetResponse, mutating=True,
          not_found=True, answers=QUARANTINED),
    Route("GET", "/v1/config", "get_config", "A node's newest desired state and its report",
          "viewer", "config", query=ConfigQuery, response=ConfigGetResponse, not_found=True),
    Route("GET", "/v1/data/stats", "data_stats",
          "Per node and stream: records stored, contiguous mark, gaps", "viewer", "data",
          query=StatsQuery, response=StatsResponse, not_found=True),
    Route("GET", "/v1/data/query", "data_query", "Stored records of one stream, in seq order",
          "viewer", "data", query=DataQuery, response=DataQueryResponse, not_found=True),
    Route("GET", "/v1/audit", "list_audit", "The audit log, newest first", "viewer", "audit",
          query=AuditQuery, response=AuditList),
    # fleet operations (operator_fleet): config layers, diff, apply, drift, states, quarantine
    Route("GET", "/v1/config/layers", "list_layers",
          "The config layers (fleet, groups, and a node's own), in the order they apply",
          "viewer", "config", query=LayerQuery, response=LayerList, not_found=True),
    Route("PUT", "/v1/config/layers", "write_layer",
          "Set or remove keys of one config layer, or delete it (409 when if_version is not "
          "the layer's version)", "operator", "config", body=LayerWrite,
          response=LayerWriteResponse, mutating=True, not_found=True,
          answers=((409, "The layer is not at if_version: another write came first"),)),
    Route("GET", "/v1/config/diff", "diff_config",
          "A node's effective config from the layers and what applying it would change",
          "viewer", "config", query=DiffQuery, response=ConfigDiff, not_found=True),
    Route("POST", "/v1/config/apply", "apply_config",
          "Store the layers' effective config as the next desired version of the nodes whose "
          "desired config differs", "operator", "config", body=ConfigApplyRequest,
          response=ConfigApplyResponse, mutating=True, not_found=True, answers=QUARANTINED),
    Route("GET", "/v1/config/drift", "config_drift",
          "Nodes whose reported state differs from their desired state, and why", "viewer",
          "config", query=DriftQuery, response=DriftList),
    Route("GET", "/v1/fleet/nodes", "fleet_nodes",
          "Nodes with their health state (online, degraded, offline, quarantined) and why",
          "viewer", "nodes", query=FleetNodesQuery, response=FleetNodeList),
    Route("POST", "/v1/nodes/{node_id}/quarantine", "quarantine_node",
          "Quarantine a node with a reason, or lift it (reason null)", "operator", "nodes",
          body=QuarantineRequest, response=FleetNode, mutating=True, not_found=True),
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
    Route("GET", "/readyz", "readyz", "Readiness: the store answers and its schema is migrated",
          "public", "service", response=Readiness,
          answers=((503, "Not ready: `why` says what (store unreachable, schema not migrated)"),)),
    Route("GET", "/metrics", "metrics", "Prometheus metrics (text format)", "public", "service",
          content_type="text/plain"),
    Route("GET", "/openapi.json", "openapi", "This document", "public", "service"),
)

# the release routes (`cloud.releases.api` registers them): bodies are not JSON models (a
# manifest's canonical bytes, a file's bytes), so they take no `body` here
RELEASE_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/releases", "list_releases", "List releases, newest first", "viewer",
          "releases"),
    Route("POST", "/v1/releases", "publish_release",
          "Publish a release: its manifest (canonical JSON bytes); 409 lists the files not "
          "uploaded yet", "operator", "releases", status=201, mutating=True,
          answers=((200, "The same manifest was published already"),
                   (400, "Not a manifest in canonical form (names the field), or no TUF keys"),
                   (409, "Files not uploaded yet (`missing` lists their sha256), or the "
                         "version is published with other content"),
                   (413, "The manifest is over 4 MiB"))),
    Route("GET", "/v1/releases/{version}", "show_release", "One release and its manifest",
          "viewer", "releases", not_found=True),
    Route("PUT", "/v1/releases/blobs/{sha256}", "upload_release_blob",
          "Upload one release file under its sha256 (streamed; Content-Length required)",
          "operator", "releases", status=201, mutating=True,
          answers=((200, "The file is held already"),)),
    Route("GET", "/v1/device/tuf/{name}", "device_tuf_metadata",
          "Signed TUF metadata: N.root.json, timestamp.json, N.snapshot.json, N.targets.json",
          "device", "device", not_found=True,
          patterns=(("name", r"^([1-9][0-9]{0,18}\.(root|snapshot|targets)|timestamp)\.json$"),)),
    Route("GET", "/v1/device/tuf/targets/releases/{version}/manifest.json",
          "device_release_manifest", "A release's manifest (a TUF target)", "device", "device",
          not_found=True, patterns=(("version", r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$"),)),
    Route("GET", "/v1/device/tuf/targets/blobs/{sha256}", "device_release_blob",
          "A release file by its sha256 (a TUF target)", "device", "device", not_found=True,
          content_type="application/octet-stream", patterns=(("sha256", r"^[0-9a-f]{64}$"),)),
)

ALL_ROUTES = OPERATOR_ROUTES + DEVICE_ROUTES + RELEASE_ROUTES + SERVICE_ROUTES


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
    patterns = dict(route.patterns)
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", **({"pattern": patterns[name]} if name in patterns
                                         else {})}}
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
        "security": SECURITY[route.access],
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
    if route.access == "device":
        responses["429"] = _error("Over the node's request rate; retry after Retry-After s")
    if route.name == "device_enrol":
        responses["200"] = {**ok, "description": "The same enrolment again (the same key and "
                            "token, before the token expires): the same node, a fresh "
                            "certificate"}
        responses["409"] = _error("The CSR's key is already enrolled as a node")
    if route.body is not None:
        responses["413"] = _error("The body is over the endpoint's limit (64 KiB for the "
                                  "device API, 8 MiB for the operator API)")
    if route.not_found:
        responses["404"] = _error("No such node (or token)")
    if route.access != "public":
        responses["503"] = _error("The store is unavailable")
    for status, description in route.answers:
        responses[str(status)] = (_error(description) if status >= 400
                                  else {"description": description})
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
    "deviceCertificate": {"type": "mutualTLS",
                          "description": "The node's client certificate, issued by this control "
                                         "plane's CA; the node id comes from it."},
}

# which scheme each kind of route takes; [] = none (enrolment and re-authentication carry their
# proof in the body)
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "viewer": [{"operatorToken": []}],
    "operator": [{"operatorToken": []}],
    "admin": [{"operatorToken": []}],
    "device": [{"deviceCertificate": []}],
    "enrolment-token": [],
    "proof": [],
    "public": [],
}


def document(paths: dict[str, dict[str, Any]], version: str) -> dict[str, Any]:
    """A whole OpenAPI 3.1 document around ``paths`` (for tests and offline use)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Edgewise control plane", "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {"securitySchemes": SECURITY_SCHEMES},
    }
