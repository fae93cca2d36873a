"""The operator API's plumbing: one authenticated, parsed request (`Call`) per route.

`endpoint(route, handler)` is the aiohttp handler of one `openapi.Route`: it reads the bearer
token (looked up by its sha256, never compared as plaintext), checks the role the route needs,
parses the query and body into the route's models (the body read whole, up to 8 MiB, as strict
JSON: `request_body`), runs the handler with a `Call`, checks that
it returned the route's response model, and answers errors through `http_errors.error_answer`
(401s with ``WWW-Authenticate: Bearer``); a `RecursionError` out of a handler (input nested
deeper than a parser can go, e.g. pipeline YAML) is a 400, not a 500. A mutating call refused
with 403 is audited as ``denied``. The helpers below it are shared by the handlers
(`operator_api`, `operator_data`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from edgewise.cloud import openapi as oa
from edgewise.cloud.http_errors import error_answer
from edgewise.cloud.request_body import OPERATOR_BODY, read_json
from edgewise.cloud.state import STORE
from edgewise.cloud.store import NodeInfo, Store, StreamInfo
from edgewise.errors import BadRequest, ConfigError, EdgewiseError, NotFound, StorageError
from edgewise.security.tokens import (
    OPERATOR_PREFIX,
    Forbidden,
    OperatorToken,
    TokenInvalid,
    check_format,
)
from edgewise.sync.twin_state import DesiredState

MAX_BODY = OPERATOR_BODY  # bytes of one request (pipelines are YAML text); 413 above

NOW: web.AppKey[Callable[[], datetime]] = web.AppKey("operator_now")
"""Replaces the clock of token expiry, audit times and desired-state expiry (tests)."""


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


CHALLENGE = 'Bearer realm="edgewise"'  # WWW-Authenticate of a 401


def validation_message(exc: ValidationError, what: str) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what}: " + "; ".join(parts)


def bearer(request: web.Request) -> str:
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


async def authenticate(request: web.Request) -> OperatorToken:
    token_hash = check_format(bearer(request), OPERATOR_PREFIX)
    token = await request.app[STORE].get_operator_token(token_hash)
    if token is None:
        raise TokenInvalid("unknown or revoked operator token")
    return token


def authorize(token: OperatorToken, route: oa.Route, now: datetime) -> None:
    token.authorize(now, mutating=route.mutating or route.access != "viewer",
                    admin=route.access == "admin")


async def parse_body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    data = await read_json(request, MAX_BODY, empty={})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc, "request body")) from None


def parse_query(request: web.Request, model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate({k: request.query[k] for k in request.query})
    except ValidationError as exc:
        raise BadRequest(validation_message(exc, "query")) from None


def endpoint(route: oa.Route, handler: Handler) -> Callable[[web.Request], Awaitable[Any]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        app = request.app
        clock = app.get(NOW)
        now = clock() if clock is not None else datetime.now(UTC)
        token: OperatorToken | None = None
        try:
            token = await authenticate(request)
            authorize(token, route, now)
            call = Call(request, app, app[STORE], token, actor_of(token), now)
            if route.query is not None:
                call.query = parse_query(request, route.query)
            if route.body is not None:
                call.body = await parse_body(request, route.body)
            try:
                result = await handler(call)
            except RecursionError:  # e.g. pipeline YAML nested deeper than the parser can go
                raise BadRequest("invalid request: something in it is nested too deeply to "
                                 "read (pipeline YAML included)") from None
        except EdgewiseError as exc:  # SpecError included: "name:line: field: message"
            answer = error_answer(exc, challenge=CHALLENGE)
            if answer is None:
                raise
            if isinstance(exc, Forbidden) and token is not None and route.mutating:
                await audit_denied(app, token, route, request, str(exc), now)
            return answer
        if not isinstance(result, route.response):  # the table is the contract
            raise TypeError(f"{route.name} returned {type(result).__name__}, "
                            f"not {route.response.__name__}")
        return web.Response(body=result.model_dump_json().encode(), status=route.status,
                            content_type="application/json")

    serve.__name__ = route.name
    return serve


async def audit_denied(app: web.Application, token: OperatorToken, route: oa.Route,
                        request: web.Request, reason: str, now: datetime) -> None:
    try:
        await app[STORE].audit(actor_of(token), "denied", request.path,
                                      {"method": route.method, "reason": reason}, now=now)
    except StorageError:
        pass  # the 403 stands either way


def node_model(n: NodeInfo) -> oa.Node:
    return oa.Node.model_validate(n.to_json())


def stream_model(s: StreamInfo) -> oa.StreamStat:
    return oa.StreamStat(
        node=s.node_id, stream=s.stream, records_stored=s.stored_records,
        contiguous_mark=s.contiguous,
        highest_contiguous_seq=s.contiguous - 1 if s.contiguous > 0 else None,
        lost_records=s.gap_records, last_received=s.last_received,
    )


async def node_or_404(store: Store, node_id: str) -> NodeInfo:
    node = await store.get_node(node_id)
    if node is None:
        raise NotFound(f"no node {node_id!r}; `edgewise node list` shows the enrolled nodes")
    return node


def selector(text: str) -> dict[str, str]:
    try:
        return oa.parse_selector(text)
    except (ValueError, ConfigError) as exc:
        raise BadRequest(f"selector {text!r}: {exc}") from None


def desired_model(state: DesiredState) -> oa.Desired:
    return oa.Desired.model_validate(state.to_wire())


async def reported_model(store: Store, node_id: str) -> oa.Reported | None:
    info = await store.get_reported_state(node_id)
    if info is None:
        return None
    st = info.state
    return oa.Reported(applied_version=st.applied_version, status=st.status,
                       counters=dict(st.counters), setpoints=st.setpoints.to_dict(),
                       pending_setpoints=list(info.pending),
                       updated=info.updated)
