"""The operator API (`/v1/tokens`, `/v1/nodes`, `/v1/config`, `/v1/data`, `/v1/audit`).

Entry points (the app factory calls the first):

    setup(app: web.Application) -> None
    add_operator_routes(app: web.Application, *, now: Callable[[], datetime] | None = None)

It uses the app's shared state (`edgewise.cloud.app`): ``app[STORE]``, ``app[SESSIONS]``
(``notify_desired`` after storing a desired version), `app.revoke_node` (store, revocation list
and live session in one call) and ``app[OPENAPI]`` (it adds the OpenAPI path
items of every route in `openapi.ALL_ROUTES`, the device endpoints' richer descriptions included).

Routes are registered from `openapi.OPERATOR_ROUTES`; each names its handler here, takes the
request model the table names and returns the response model it names, so ``/openapi.json``
describes exactly what is served.

**Authentication and roles.** ``Authorization: Bearer ewo_...``: the token is looked up by its
sha256 (`security.tokens`), never compared as plaintext. Viewers may only read; operators may
also change nodes and config and make enrolment tokens; only admins manage operator tokens and
revoke nodes. No/invalid/revoked/expired token → 401 (with ``WWW-Authenticate: Bearer``); a
role that may not do this → 403, whose message names the role needed.

**Audit.** Every mutating call that succeeds leaves at least one audit entry with the actor
(``operator:<token name>#<first 8 hex of its hash>``), the action, the target and details;
the store writes some of them in the same transaction as the change (labels, revocation,
operator tokens, each desired version). A mutating call refused with 403 is audited as
``denied``.

**Errors.** JSON ``{"error": "..."}``: 400 invalid input (pipeline YAML problems as
``name:line: field: message``), 401/403 as above, 404 unknown node, 503 store unavailable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select

from edgewise.cloud import app as appmod
from edgewise.cloud import openapi as oa
from edgewise.cloud.forward import record_dicts
from edgewise.cloud.store import NodeInfo, Store, StoredChunk, StreamInfo
from edgewise.cloud.store.models import ChunkRow
from edgewise.errors import ConfigError, PeerError, StorageError
from edgewise.pipeline.spec import parse_pipeline
from edgewise.security.tokens import (
    OPERATOR_PREFIX,
    EnrolmentToken,
    Forbidden,
    OperatorToken,
    TokenInvalid,
    check_format,
)
from edgewise.sync import codec
from edgewise.sync.hlc import Clock
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState

MAX_BODY = 8 * 1024 * 1024  # bytes of one request (pipelines are YAML text)
SINCE_MARGIN = timedelta(hours=1)  # clock skew allowed between a record's ts and its arrival
CHUNKS_PER_READ = 64  # at most, per store read; the first reads take fewer
CONFIG_CONCURRENCY = 8  # nodes written at once on PostgreSQL (SQLite has one writer: 1)
SETPOINT_CLOCK_NODE = "cloud"

CLOCK = web.AppKey("operator_clock", Clock)
NOW = web.AppKey("operator_now", object)


class NotFound(PeerError):
    status = 404


class BadRequest(PeerError):
    status = 400


@dataclass
class Call:
    """One authenticated operator request, parsed."""

    request: web.Request
    app: web.Application
    store: Store
    token: OperatorToken
    actor: str
    now: datetime
    body: Any = None
    query: Any = None

    @property
    def node_id(self) -> str:
        return self.request.match_info["node_id"]


Handler = Callable[[Call], Awaitable[BaseModel]]


# -- plumbing ---------------------------------------------------------------------------------


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(
        body=json.dumps({"error": message}).encode(), status=status,
        content_type="application/json", headers=headers or None,
    )


def _validation_message(exc: ValidationError, what: str) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what}: " + "; ".join(parts)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if not header:
        raise TokenInvalid(
            "no operator token: send 'Authorization: Bearer ewo_...' (the CLI reads it from "
            "cli.json, written by `edgewise cloud serve`)"
        )
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise TokenInvalid("the Authorization header must be 'Bearer <operator token>'")
    return value.strip()


def actor_of(token: OperatorToken) -> str:
    return f"operator:{token.name}#{token.hash[:8]}"


async def _authenticate(request: web.Request) -> OperatorToken:
    token_hash = check_format(_bearer(request), OPERATOR_PREFIX)
    token = await request.app[appmod.STORE].get_operator_token(token_hash)
    if token is None:
        raise TokenInvalid("unknown or revoked operator token")
    return token


def _authorize(token: OperatorToken, route: oa.Route, now: datetime) -> None:
    token.authorize(now, mutating=route.mutating or route.access != "viewer",
                    admin=route.access == "admin")


async def _parse_body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise BadRequest("request body is not JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc, "request body")) from None


def _parse_query(request: web.Request, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate({k: request.query[k] for k in request.query})
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc, "query")) from None


def _endpoint(route: oa.Route, handler: Handler) -> Callable[[web.Request], Awaitable[Any]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        app = request.app
        clock = app.get(NOW)
        now = clock() if callable(clock) else datetime.now(UTC)
        token: OperatorToken | None = None
        try:
            token = await _authenticate(request)
            _authorize(token, route, now)
            call = Call(request, app, app[appmod.STORE], token, actor_of(token), now)
            if route.query is not None:
                call.query = _parse_query(request, route.query)
            if route.body is not None:
                call.body = await _parse_body(request, route.body)
            result = await handler(call)
        except PeerError as exc:
            status = int(getattr(exc, "status", 400))
            if isinstance(exc, Forbidden) and token is not None and route.mutating:
                await _audit_denied(app, token, route, request, str(exc), now)
            if status == 401:
                return _error(401, str(exc), **{"WWW-Authenticate": 'Bearer realm="edgewise"'})
            return _error(status, str(exc))
        except ConfigError as exc:  # SpecError included: "name:line: field: message"
            return _error(400, str(exc))
        except StorageError as exc:
            return _error(503, f"the control plane cannot reach its store: {exc}")
        if not isinstance(result, route.response):  # the table is the contract
            raise TypeError(f"{route.name} returned {type(result).__name__}, "
                            f"not {route.response.__name__}")
        return web.Response(body=result.model_dump_json().encode(), status=route.status,
                            content_type="application/json")

    endpoint.__name__ = route.name
    return endpoint


async def _audit_denied(app: web.Application, token: OperatorToken, route: oa.Route,
                        request: web.Request, reason: str, now: datetime) -> None:
    try:
        await app[appmod.STORE].audit(actor_of(token), "denied", request.path,
                                      {"method": route.method, "reason": reason}, now=now)
    except StorageError:
        pass  # the 403 stands either way


def _node_model(n: NodeInfo) -> oa.Node:
    return oa.Node.model_validate(n.to_json())


def _stream_model(s: StreamInfo) -> oa.StreamStat:
    return oa.StreamStat(
        node=s.node_id, stream=s.stream, records_stored=s.stored_records,
        contiguous_mark=s.contiguous,
        highest_contiguous_seq=s.contiguous - 1 if s.contiguous > 0 else None,
        lost_records=s.gap_records, last_received=s.last_received,
    )


async def _node_or_404(store: Store, node_id: str) -> NodeInfo:
    node = await store.get_node(node_id)
    if node is None:
        raise NotFound(f"no node {node_id!r}; `edgewise node list` shows the enrolled nodes")
    return node


def _selector(text: str) -> dict[str, str]:
    try:
        return oa.parse_selector(text)
    except (ValueError, ConfigError) as exc:
        raise BadRequest(f"selector {text!r}: {exc}") from None


def _desired_model(state: DesiredState) -> oa.Desired:
    return oa.Desired.model_validate(state.to_wire())


async def _reported_model(store: Store, node_id: str) -> oa.Reported | None:
    info = await store.get_reported_state(node_id)
    if info is None:
        return None
    st = info.state
    return oa.Reported(applied_version=st.applied_version, status=st.status,
                       counters=dict(st.counters), setpoints=st.setpoints.to_dict(),
                       updated=info.updated)


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
    labels = _selector(q.selector) if q.selector else None
    nodes = await call.store.list_nodes(labels, limit=q.limit, after=q.after)
    nxt = nodes[-1].id if len(nodes) == q.limit else None
    return oa.NodeList(nodes=[_node_model(n) for n in nodes], next=nxt)


async def get_node(call: Call) -> oa.NodeDetail:
    node = await _node_or_404(call.store, call.node_id)
    streams = await call.store.stream_stats(node.id)
    return oa.NodeDetail(
        **_node_model(node).model_dump(),
        desired_version=await call.store.desired_version(node.id),
        reported=await _reported_model(call.store, node.id),
        streams=[_stream_model(s) for s in streams],
    )


async def patch_labels(call: Call) -> oa.Node:
    body: oa.LabelPatch = call.body
    both = sorted(set(body.set) & set(body.remove))
    if both:
        raise BadRequest(f"label(s) {', '.join(both)} both set and removed")
    node = await _node_or_404(call.store, call.node_id)
    labels = {k: v for k, v in node.labels.items() if k not in body.remove}
    labels.update(body.set)
    try:
        updated = await call.store.set_node_labels(node.id, labels, actor=call.actor,
                                                   now=call.now)
    except KeyError:
        raise NotFound(f"no node {node.id!r}") from None
    return _node_model(updated)


async def revoke_node(call: Call) -> oa.Node:
    body: oa.RevokeRequest = call.body
    try:
        node = await appmod.revoke_node(call.app, call.node_id, reason=body.reason,
                                        actor=call.actor)
    except KeyError:
        raise NotFound(f"no node {call.node_id!r}") from None
    return _node_model(node)


# -- desired state ----------------------------------------------------------------------------


def _validate_pipelines(pipelines: dict[str, str]) -> None:
    for name, text in pipelines.items():
        if not name.strip():
            raise BadRequest("pipeline names must not be empty")
        parse_pipeline(text, name)  # SpecError -> 400 "name:line: field: message"


async def _targets(call: Call, body: oa.ConfigSetRequest) -> list[NodeInfo]:
    if body.node is not None:
        node = await _node_or_404(call.store, body.node)
        if node.revoked:
            raise BadRequest(f"node {node.id} is revoked; it gets no desired state")
        return [node]
    assert body.selector is not None
    labels = _selector(body.selector)
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


def _setpoint_writes(call: Call, values: dict[str, Any]) -> LwwMap:
    clock = call.app[CLOCK]
    writes = LwwMap()
    for key, value in values.items():
        hlc = clock.now()
        if value is None:
            writes.delete(key, hlc, call.actor)
        else:
            writes.set(key, value, hlc, call.actor)
    return writes


async def set_config(call: Call) -> oa.ConfigSetResponse:
    body: oa.ConfigSetRequest = call.body
    if body.pipelines is not None:
        _validate_pipelines(body.pipelines)
    nodes = await _targets(call, body)
    expires = call.now + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    writes = _setpoint_writes(call, body.setpoints) if body.setpoints else None
    sessions = call.app[appmod.SESSIONS]
    gate = asyncio.Semaphore(CONFIG_CONCURRENCY if call.store.dialect == "postgresql" else 1)

    async def one(node: NodeInfo) -> oa.NodeVersion:
        async with gate:
            prev = await call.store.get_desired_state(node.id)
            pipelines = dict(prev.pipelines) if prev is not None else {}
            config = dict(prev.config) if prev is not None else {}
            if body.pipelines is not None:
                pipelines = dict(body.pipelines)
            for key, value in (body.config or {}).items():
                if value is None:
                    config.pop(key, None)
                else:
                    config[key] = value
            if writes is not None:
                try:
                    current = LwwMap.from_wire(config.get("setpoints", {}))
                except PeerError:
                    current = LwwMap()
                merged, _lost = current.merge(writes)
                config["setpoints"] = merged.to_wire()
                await call.store.merge_setpoints(node.id, writes, actor=call.actor,
                                                 now=call.now)
            try:
                state = await call.store.put_desired_state(
                    node.id, pipelines=pipelines, config=config, labels=node.labels,
                    expires_at=expires, actor=call.actor, now=call.now)
            except KeyError:
                raise NotFound(f"no node {node.id!r}") from None
            notified = await sessions.notify_desired(node.id, state.version)
            return oa.NodeVersion(node=node.id, version=state.version, notified=notified)

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(n)) for n in nodes]
    except BaseExceptionGroup as group:  # the first error says what went wrong
        raise group.exceptions[0] from None
    done = [t.result() for t in tasks]
    target = f"node:{body.node}" if body.node is not None else f"selector:{body.selector}"
    await call.store.audit(call.actor, "config.set", target, {
        "nodes": len(done),
        "versions": {d.node: d.version for d in done[:100]},
        "pipelines": sorted(body.pipelines) if body.pipelines is not None else None,
        "config": sorted(body.config or {}),
        "setpoints": sorted(body.setpoints or {}),
        "expires_at": expires.isoformat() if expires else None,
    }, now=call.now)
    return oa.ConfigSetResponse(nodes=done)


async def get_config(call: Call) -> oa.ConfigGetResponse:
    q: oa.ConfigQuery = call.query
    node = await _node_or_404(call.store, q.node)
    state = await call.store.get_desired_state(node.id)
    return oa.ConfigGetResponse(
        node=node.id, desired=_desired_model(state) if state is not None else None,
        reported=await _reported_model(call.store, node.id),
    )


# -- data -------------------------------------------------------------------------------------


def missing_ranges(mark: int, settled: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Holes between the contiguous mark and the settled ranges ``(first, count)`` above it."""
    holes: list[tuple[int, int]] = []
    cursor = mark
    for first, count in sorted(settled):
        if first > cursor:
            holes.append((cursor, first - cursor))
        cursor = max(cursor, first + count)
    return holes


async def data_stats(call: Call) -> oa.StatsResponse:
    q: oa.StatsQuery = call.query
    if q.node is None:
        return oa.StatsResponse(streams=[_stream_model(s) for s in await call.store.stream_stats()])
    node = await _node_or_404(call.store, q.node)
    gaps_by_stream: dict[str, list[oa.SeqRangeModel]] = {}
    for g in await call.store.list_gaps(node.id):
        gaps_by_stream.setdefault(g.stream, []).append(
            oa.SeqRangeModel(first=g.seq_first, count=g.seq_count, reason=g.reason))
    out = []
    for s in await call.store.stream_stats(node.id):
        above = await call.store.settled_above(node.id, s.stream, s.contiguous)
        holes = missing_ranges(s.contiguous, [(r.first, r.count) for r in above])
        model = _stream_model(s)
        model.gaps = gaps_by_stream.get(s.stream, [])
        model.missing = [oa.SeqRangeModel(first=f, count=c) for f, c in holes]
        out.append(model)
    return oa.StatsResponse(streams=out)


async def _chunk_start(store: Store, node_id: str, stream: str, seq: int) -> int:
    """The first seq of the stored chunk that holds ``seq`` (or ``seq``): one index probe."""
    if seq == 0:
        return 0
    async with store._tx(write=False) as conn:
        first = (await conn.execute(
            select(func.max(ChunkRow.seq_first)).where(
                ChunkRow.node_id == node_id, ChunkRow.stream == stream,
                ChunkRow.seq_first <= seq))).scalar()
    return int(first) if first is not None else seq


def _records_of(node_id: str, q: oa.DataQuery, chunk: StoredChunk, room: int
                ) -> list[oa.Record]:
    """The first ``room`` records of a stored chunk at or after ``q.from_seq`` with ts >=
    ``q.since``."""
    try:
        cols = codec.decode(chunk.payload)
    except PeerError as exc:
        raise StorageError(f"stored chunk {node_id}/{chunk.stream}/{chunk.seq_first} does not "
                           f"decode: {exc}") from None
    n = len(next(iter(cols.values()))) if cols else 0
    seqs = chunk.seq_first + np.arange(n, dtype=np.int64)
    keep = seqs >= q.from_seq
    if q.since is not None:
        ts = cols.get("ts")
        if ts is None or ts.dtype.kind not in "iuf":
            keep &= False
        else:
            keep &= ts >= q.since
    rows = np.flatnonzero(keep)[:room]
    picked = {k: v[rows] for k, v in cols.items()}
    return [oa.Record(seq=int(seqs[i]), data=d)
            for i, d in zip(rows.tolist(), record_dicts(picked), strict=True)]


async def data_query(call: Call) -> oa.DataQueryResponse:
    q: oa.DataQuery = call.query
    node = await _node_or_404(call.store, q.node)
    received_since = None
    if q.since is not None:
        try:
            received_since = datetime.fromtimestamp(q.since, UTC) - SINCE_MARGIN
        except (OverflowError, OSError, ValueError):
            raise BadRequest(f"since={q.since} is not a usable Unix time") from None
    # collect one record more than asked: its seq is where the next page starts
    want = q.limit + 1
    records: list[oa.Record] = []
    cursor = await _chunk_start(call.store, node.id, q.stream, q.from_seq)
    batch = 2  # chunks per read: grows, so a small page reads few payloads
    while len(records) < want:
        chunks = await call.store.read_chunks(node.id, q.stream, from_seq=cursor,
                                              since=received_since, limit=batch)
        for chunk in chunks:
            records.extend(_records_of(node.id, q, chunk, want - len(records)))
            if len(records) >= want:
                break
        if len(chunks) < batch:
            break
        cursor = chunks[-1].seq_first + 1
        batch = min(batch * 2, CHUNKS_PER_READ)
    next_seq = None
    if len(records) > q.limit:
        next_seq = records[q.limit].seq
        del records[q.limit :]
    return oa.DataQueryResponse(node=node.id, stream=q.stream, records=records,
                                next_seq=next_seq)


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
    "set_config": set_config,
    "get_config": get_config,
    "data_stats": data_stats,
    "data_query": data_query,
    "list_audit": list_audit,
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
    if now is not None:
        app[NOW] = now
    for route in oa.OPERATOR_ROUTES:
        app.router.add_route(route.method, route.path, _endpoint(route, HANDLERS[route.name]))
    app[appmod.OPENAPI].update(oa.path_items(oa.ALL_ROUTES))


def setup(app: web.Application) -> None:
    """What `app.create_app` calls."""
    add_operator_routes(app)
