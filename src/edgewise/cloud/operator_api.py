"""The operator API (`/v1/tokens`, `/v1/nodes`, `/v1/config`, `/v1/data`, `/v1/audit`).

Entry points (the app factory calls the first):

    setup(app: web.Application) -> None
    add_operator_routes(app: web.Application, *, now: Callable[[], datetime] | None = None)

It uses the app's shared state (`edgewise.cloud.state`): ``app[STORE]``, ``app[POKES]``
(the fan-out of pokes after storing desired versions, `desired.assign`), `state.revoke_node`
(store, revocation list and live session in one call) and ``app[OPENAPI]`` (it adds the OpenAPI path
items of every route in `openapi.ALL_ROUTES`, the device endpoints' richer descriptions included).

Routes are registered from `openapi.OPERATOR_ROUTES`; each names its handler (`HANDLERS`: the
token, node, config and audit handlers here, the data handlers in `operator_data`, the fleet
operations in `operator_fleet`), takes the
request model the table names and returns the response model it names, so ``/openapi.json``
describes exactly what is served. `operator_call.endpoint` does what every route shares
(authentication, roles, parsing, errors); ``config set`` hands its change to `desired`.
The pipelines it carries are validated in worker threads, at most `MAX_PIPELINE_CHECKS` at
once: parsing up to 8 MiB of YAML takes seconds, which must not stop the event loop.

**Authentication and roles.** ``Authorization: Bearer ewo_...``: the token is looked up by its
sha256 (`security.tokens`), never compared as plaintext. Viewers may only read; operators may
also change nodes and config and make enrolment tokens; only admins manage operator tokens and
revoke or decommission nodes. No/invalid/revoked/expired token → 401 (with
``WWW-Authenticate: Bearer``); a role that may not do this → 403, whose message names the role
needed.

**Audit.** Every mutating call that succeeds leaves at least one audit entry with the actor
(``operator:<token name>#<first 8 hex of its hash>``), the action, the target and details;
the store writes some of them in the same transaction as the change (labels, revocation,
operator tokens, each desired version). A mutating call refused with 403 is audited as
``denied``.

**Errors.** JSON ``{"error": "..."}`` (`http_errors`, shared with the device API): 400
invalid input (pipeline YAML problems as ``name:line: field: message``), 401/403 as above, 404
unknown node, 503 store unavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from aiohttp import web

from edgewise.cloud import desired, operator_fleet, quarantine, state
from edgewise.cloud import openapi as oa
from edgewise.cloud.config import CONFIG
from edgewise.cloud.operator_call import (
    NOW,
    Call,
    Handler,
    desired_model,
    endpoint,
    node_model,
    node_or_404,
    reported_model,
    selector,
    stream_model,
)
from edgewise.cloud.operator_data import data_query, data_stats
from edgewise.cloud.state import OPENAPI, POKES
from edgewise.cloud.store import NodeInfo
from edgewise.errors import BadRequest, NotFound
from edgewise.pipeline.spec import parse_pipeline
from edgewise.security.tokens import (
    OPERATOR_PREFIX,
    EnrolmentToken,
    OperatorToken,
    TokenInvalid,
    check_format,
)
from edgewise.sync.hlc import Clock
from edgewise.sync.release import check_version

SETPOINT_CLOCK_NODE = "cloud"

CLOCK = web.AppKey("operator_clock", Clock)
PIPELINE_CHECKS = web.AppKey("operator_pipeline_checks", asyncio.Semaphore)
"""Pipeline validations running at once (worker threads): YAML of up to 8 MiB takes seconds
of pure Python to parse, which must not stop the event loop (sessions, every other request)."""
MAX_PIPELINE_CHECKS = 2


# -- tokens -----------------------------------------------------------------------------------


async def create_enrolment_token(call: Call) -> oa.EnrolmentTokenResponse:
    body: oa.EnrolmentTokenRequest = call.body
    plaintext, record = EnrolmentToken.issue(body.labels, timedelta(seconds=body.ttl_s),
                                             body.uses, now=call.now)
    await call.store.add_enrolment_token(record, now=call.now)
    await call.store.audit(call.actor, "token.enrolment.create",
                           f"enrolment-token:{record.hash[:12]}",
                           {"labels": dict(record.labels), "uses": body.uses,
                            "expires_at": record.expires_at.isoformat()}, now=call.now)
    return oa.EnrolmentTokenResponse(token=plaintext.get_secret_value(),
                                     labels=dict(record.labels), uses=record.uses_left,
                                     expires_at=record.expires_at)


async def create_operator_token(call: Call) -> oa.OperatorTokenResponse:
    body: oa.OperatorTokenRequest = call.body
    ttl = timedelta(seconds=body.ttl_s) if body.ttl_s is not None else None
    plaintext, record = OperatorToken.issue(body.name, body.role, ttl, now=call.now)
    await call.store.add_operator_token(record, actor=call.actor, now=call.now)
    return oa.OperatorTokenResponse(token=plaintext.get_secret_value(), name=record.name,
                                    role=record.role.value, expires_at=record.expires_at)


async def list_operator_tokens(call: Call) -> oa.OperatorTokenList:
    rows = await call.store.list_operator_tokens()
    return oa.OperatorTokenList(tokens=[oa.OperatorTokenInfo.model_validate(vars(r))
                                        for r in rows])


async def revoke_operator_token(call: Call) -> oa.OperatorTokenRevokeResponse:
    body: oa.OperatorTokenRevokeRequest = call.body
    try:
        token_hash = check_format(body.token, OPERATOR_PREFIX)
    except TokenInvalid as exc:  # a malformed token in the body is bad input, not a 401
        raise BadRequest(str(exc)) from None
    if not await call.store.revoke_operator_token(token_hash, actor=call.actor, now=call.now):
        raise NotFound("no such operator token")
    return oa.OperatorTokenRevokeResponse(revoked=True)


# -- nodes ------------------------------------------------------------------------------------


async def list_nodes(call: Call) -> oa.NodeList:
    q: oa.NodeListQuery = call.query
    labels = selector(q.selector) if q.selector else None
    nodes = await call.store.list_nodes(labels, limit=q.limit, after=q.after)
    nxt = nodes[-1].id if len(nodes) == q.limit else None
    ids = [n.id for n in nodes]
    att, held = await call.store.attestations(ids), await call.store.quarantines(ids)
    return oa.NodeList(nodes=[node_model(n).model_copy(update={
        "attestation": att.get(n.id), "quarantine": held.get(n.id)}) for n in nodes],
        next=nxt)


async def get_node(call: Call) -> oa.NodeDetail:
    node = await node_or_404(call.store, call.node_id)
    streams = await call.store.stream_stats(node.id)
    (row,) = await call.store.fleet_rows([node], light=True)
    (st,) = await operator_fleet.fleet_nodes_of([row], call)
    return oa.NodeDetail(
        **st.model_dump(include=set(oa.Node.model_fields)),
        desired_version=await call.store.desired_version(node.id),
        reported=await reported_model(call.store, node.id),
        streams=[stream_model(s) for s in streams],
        state=st.state, reasons=st.reasons, health=st.health, health_at=st.health_at,
    )


async def patch_labels(call: Call) -> oa.Node:
    body: oa.LabelPatch = call.body
    both = sorted(set(body.set) & set(body.remove))
    if both:
        raise BadRequest(f"label(s) {', '.join(both)} both set and removed")
    await quarantine.refuse_if_quarantined(call.store, call.node_id, "a label change")
    try:  # read and written in one transaction: concurrent patches all keep their changes
        updated = await call.store.patch_node_labels(call.node_id, body.set, body.remove,
                                                     actor=call.actor, now=call.now)
    except KeyError:
        raise NotFound(f"no node {call.node_id!r}") from None
    return node_model(updated)


async def revoke_node(call: Call) -> oa.Node:
    body: oa.RevokeRequest = call.body
    try:
        node = await state.revoke_node(call.app, call.node_id, reason=body.reason,
                                       actor=call.actor)
    except KeyError:
        raise NotFound(f"no node {call.node_id!r}") from None
    return node_model(node)


async def decommission_node(call: Call) -> oa.Node:
    body: oa.DecommissionRequest = call.body
    try:
        node = await state.decommission_node(call.app, call.node_id, wipe=body.wipe,
                                             reason=body.reason, actor=call.actor)
    except KeyError:
        raise NotFound(f"no node {call.node_id!r}") from None
    return node_model(node)


# -- desired state ----------------------------------------------------------------------------


def _validate_pipelines(pipelines: dict[str, str]) -> None:
    for name, text in pipelines.items():
        if not name.strip():
            raise BadRequest("pipeline names must not be empty")
        # SpecError -> 400 "name:line: field: message". No user code is imported here: plugin
        # references are checked by their form, the node checks the rest (docs/plugins.md)
        parse_pipeline(text, name, load_code=False)


async def _targets(call: Call, body: oa.ConfigSetRequest) -> list[NodeInfo]:
    if body.node is not None:
        node = await node_or_404(call.store, body.node)
        if node.revoked:
            raise BadRequest(f"node {node.id} is revoked; it gets no desired state")
        return [node]
    assert body.selector is not None
    labels = selector(body.selector)
    out: list[NodeInfo] = []
    after: str | None = None
    while True:  # keyset pages; the label match runs in SQL
        page = await call.store.list_nodes(labels, limit=1000, after=after)
        out.extend(n for n in page if not n.revoked)
        if len(page) < 1000:
            break
        after = page[-1].id
    if not out:
        raise NotFound(f"no node (that is not revoked) matches selector {body.selector!r}")
    return out


async def set_config(call: Call) -> oa.ConfigSetResponse:
    body: oa.ConfigSetRequest = call.body
    if body.pipelines is not None:
        async with call.app[PIPELINE_CHECKS]:
            await asyncio.to_thread(_validate_pipelines, body.pipelines)
    if body.release:
        try:
            check_version(body.release)
        except ValueError as exc:
            raise BadRequest(f"release: {exc}") from None
        if await call.store.get_release(body.release) is None:
            raise BadRequest(f"release: no release {body.release!r} is published; `edgewise "
                             "release list` shows them")
    nodes = await _targets(call, body)
    expires = call.now + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    change = desired.DesiredChange(
        pipelines=body.pipelines, config=body.config or {},
        setpoints=(desired.setpoint_writes(call.app[CLOCK], body.setpoints, call.actor)
                   if body.setpoints else None),
        expires_at=expires, release=body.release)
    nodes, held = await quarantine.split(call.store, nodes, change)
    if body.node is not None and held:
        raise quarantine.refusal(body.node, held[body.node],
                                 "a pipeline, config or setpoint change")
    if not nodes:
        raise quarantine.NodeQuarantined(
            f"every node selector {body.selector!r} matches is quarantined; only a new "
            "release reaches them")
    limits = call.app[CONFIG].server
    done = await desired.assign(call.store, call.app[POKES], nodes, change,
                                actor=call.actor, now=call.now,
                                fetch_rate=limits.push_fetch_rate,
                                max_jitter=limits.push_max_jitter)
    target = f"node:{body.node}" if body.node is not None else f"selector:{body.selector}"
    await call.store.audit(call.actor, "config.set", target, {
        "nodes": len(done),
        "versions": {d.node: d.version for d in done[:100]},
        "pipelines": sorted(body.pipelines) if body.pipelines is not None else None,
        "config": sorted(body.config or {}),
        "setpoints": sorted(body.setpoints or {}),
        "release": body.release,
        "expires_at": expires.isoformat() if expires else None,
        "held": sorted(held)[:100],
    }, now=call.now)
    return oa.ConfigSetResponse(nodes=[
        oa.NodeVersion(node=d.node, version=d.version, notified=d.notified) for d in done],
        held=[oa.HeldNode(node=n, reason=r) for n, r in sorted(held.items())])


async def get_config(call: Call) -> oa.ConfigGetResponse:
    q: oa.ConfigQuery = call.query
    node = await node_or_404(call.store, q.node)
    state = await call.store.get_desired_state(node.id)
    return oa.ConfigGetResponse(
        node=node.id, desired=desired_model(state) if state is not None else None,
        reported=await reported_model(call.store, node.id),
    )


# -- audit ------------------------------------------------------------------------------------


async def list_audit(call: Call) -> oa.AuditList:
    q: oa.AuditQuery = call.query
    entries = await call.store.list_audit(target=q.target, actor=q.actor, limit=q.limit,
                                          before_id=q.before_id)
    return oa.AuditList(
        entries=[oa.AuditEntry.model_validate(e.to_json()) for e in entries],
        next_before_id=entries[-1].id if len(entries) == q.limit else None,
    )


# -- registration -----------------------------------------------------------------------------

HANDLERS: dict[str, Handler] = {
    "create_enrolment_token": create_enrolment_token,
    "create_operator_token": create_operator_token,
    "list_operator_tokens": list_operator_tokens,
    "revoke_operator_token": revoke_operator_token,
    "list_nodes": list_nodes,
    "get_node": get_node,
    "patch_labels": patch_labels,
    "revoke_node": revoke_node,
    "decommission_node": decommission_node,
    "set_config": set_config,
    "get_config": get_config,
    "data_stats": data_stats,
    "data_query": data_query,
    "list_audit": list_audit,
    **operator_fleet.HANDLERS,  # config layers, diff, apply, drift, states, quarantine
}


def add_operator_routes(app: web.Application, *,
                        now: Callable[[], datetime] | None = None) -> None:
    """Register every route of `openapi.OPERATOR_ROUTES` and publish the OpenAPI path items.

    ``now`` (tests) replaces the clock used for token expiry, audit times and desired-state
    expiry.
    """
    missing = {r.name for r in oa.OPERATOR_ROUTES} ^ set(HANDLERS)
    if missing:
        raise RuntimeError(f"operator routes and handlers disagree: {sorted(missing)}")
    app[CLOCK] = Clock(SETPOINT_CLOCK_NODE)
    app[PIPELINE_CHECKS] = asyncio.Semaphore(MAX_PIPELINE_CHECKS)
    if now is not None:
        app[NOW] = now
    for route in oa.OPERATOR_ROUTES:
        app.router.add_route(route.method, route.path, endpoint(route, HANDLERS[route.name]))
    app[OPENAPI].update(oa.path_items(oa.ALL_ROUTES))


def setup(app: web.Application) -> None:
    """What `app.create_app` calls."""
    add_operator_routes(app)
