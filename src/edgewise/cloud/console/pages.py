"""The console's pages and actions (aiohttp handlers), rendered server-side with Jinja2.

Pages (any role): ``/console/fleet``, ``/console/nodes/{id}``, ``/console/alarms``,
``/console/rollouts``; sign-in at ``/console/login``. Actions are forms posted to
``/console/nodes/{id}/{action}`` (labels, revoke, decommission) and ``/console/rollouts/...``
(`rollouts`: create, pause, resume, abort, cancel): each is the operator API's own route handler
(`operator_api.HANDLERS`, `rollouts.api.HANDLERS`), run with the same role check, the same body
model and the same audit entry as a call of the API with that token, after the CSRF check of
`auth.acting_viewer`. Buttons are shown only to roles that may use them; the server checks the
role either way. An action's error (a 4xx of the API) is shown on the page it came from."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web
from pydantic import BaseModel, ValidationError

from edgewise.cloud import openapi as oa
from edgewise.cloud import operator_api
from edgewise.cloud.console import auth, data
from edgewise.cloud.console.auth import NotSignedIn, Viewer
from edgewise.cloud.fleet_metrics import FLEET_GAUGES
from edgewise.cloud.fleet_state import STATES, classify
from edgewise.cloud.operator_call import (
    Call,
    audit_denied,
    authorize,
    selector,
    validation_message,
)
from edgewise.cloud.state import SESSIONS, STORE
from edgewise.errors import EdgewiseError
from edgewise.security.tokens import Forbidden

TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
NODE_ACTIONS = {"labels": "patch_labels", "revoke": "revoke_node",
                "decommission": "decommission_node"}


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("edgewise.cloud.console", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["when"] = _when
    env.filters["age"] = _age
    env.filters["tojson_attr"] = lambda v: json.dumps(v, separators=(",", ":"))
    env.filters["urlquote"] = lambda v: quote(str(v), safe="")
    return env


def _when(t: datetime | float | None) -> str:
    if t is None:
        return "never"
    if isinstance(t, int | float):
        t = datetime.fromtimestamp(t, UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = abs(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def render(request: web.Request, name: str, who: Viewer | None, status: int = 200,
           **values: Any) -> web.Response:
    html = request.app[TEMPLATES].get_template(name).render(
        who=who, path=request.path, states=STATES, **values)
    return web.Response(text=html, status=status, content_type="text/html", headers={
        "Cache-Control": "no-store",
        "Content-Security-Policy": ("default-src 'self'; script-src 'self'; "
                                    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                    "frame-ancestors 'none'; form-action 'self'"),
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def to_login(request: web.Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther("/console/login?" + urlencode({"next": request.path_qs}))


async def signed_in(request: web.Request) -> Viewer:
    try:
        return await auth.viewer(request)
    except NotSignedIn:
        raise to_login(request) from None


# -- sign-in ----------------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    """Only a path of the console (no other site, no scheme-relative URL)."""
    if value and value.startswith("/console/") and not value.startswith("//"):
        return value
    return "/console/fleet"


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", None, error=None,
                  next=_safe_next(request.query.get("next")))


async def login(request: web.Request) -> web.StreamResponse:
    form = await auth.read_form(request)
    try:
        await auth.token_of(request, form.get("token", ""))
    except EdgewiseError as exc:
        return render(request, "login.html", None, status=401, error=str(exc),
                      next=_safe_next(form.get("next")))
    answer = web.HTTPSeeOther(_safe_next(form.get("next")))
    auth.sign_in(answer, form["token"])
    raise answer


async def logout(request: web.Request) -> web.StreamResponse:
    await auth.acting_viewer(request)
    answer = web.HTTPSeeOther("/console/login")
    auth.sign_out(answer)
    raise answer


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/console/fleet")


# -- pages ------------------------------------------------------------------------------------


async def fleet(request: web.Request) -> web.Response:
    who = await signed_in(request)
    text = request.query.get("selector", "").strip()
    state = request.query.get("state") or None
    error = None
    labels: dict[str, str] = {}
    if state is not None and state not in STATES:
        error, state = f"unknown state {state!r}; choose one of {', '.join(STATES)}", None
    if text:
        try:
            labels = selector(text)
        except EdgewiseError as exc:
            error = str(exc)
    gauges = request.app.get(FLEET_GAUGES)
    page = await data.fleet_page(request.app[STORE], labels, state,
                                 request.query.get("after") or None, auth.now(request),
                                 gauges.summary if gauges is not None else None)
    return render(request, "fleet.html", who, page=page, selector=text, state=state,
                  error=error, now=auth.now(request))


async def node(request: web.Request) -> web.Response:
    who = await signed_in(request)
    return await _node_page(request, who)


async def _node_page(request: web.Request, who: Viewer, *, error: str | None = None,
                     status: int = 200) -> web.Response:
    node_id = request.match_info["node_id"]
    store = request.app[STORE]
    info = await store.get_node(node_id)
    if info is None:
        return render(request, "missing.html", who, status=404,
                      what=f"no node {node_id!r}")
    now = auth.now(request)
    row = (await store.fleet_rows([info]))[0]
    st = classify(row, now)
    desired = row.desired.to_wire() if row.desired is not None else None
    reported = await store.get_reported_state(node_id)
    audit = await store.list_audit(target=f"node:{node_id}", limit=50)
    streams = await store.stream_stats(node_id)
    recent = await data.alarms(store, node_id=node_id, limit=20)
    return render(request, "node.html", who, status=status, node=info, state=st, row=row,
                  desired=desired, reported=reported, audit=audit, streams=streams,
                  alarms=recent, error=error, now=now,
                  online=request.app[SESSIONS].get(node_id) is not None)


async def alarms_page(request: web.Request) -> web.Response:
    who = await signed_in(request)
    node_id = request.query.get("node", "").strip() or None
    rows = await data.alarms(request.app[STORE], node_id=node_id)
    return render(request, "alarms.html", who, alarms=rows, node_filter=node_id or "")


# -- actions ----------------------------------------------------------------------------------


def _body(model: type[BaseModel] | None, form: dict[str, str]) -> BaseModel | None:
    """The route's body model from a console form (labels as ``k=v`` lines)."""
    if model is None:
        return None
    fields: dict[str, Any] = {}
    if model is oa.LabelPatch:
        sets = {}
        for line in form.get("set", "").replace(",", "\n").splitlines():
            if line.strip():
                key, eq, value = line.partition("=")
                if not eq:
                    raise ValueError(f"label {line.strip()!r}: write key=value")
                sets[key.strip()] = value.strip()
        fields = {"set": sets, "remove": [k.strip() for k in form.get("remove", "").split(",")
                                          if k.strip()]}
    else:
        fields = {k: v for k, v in form.items() if k in model.model_fields}
        if "wipe" in model.model_fields:
            fields["wipe"] = form.get("wipe") == "on"
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(validation_message(exc, "form")) from None


async def run_route(request: web.Request, who: Viewer, route: oa.Route, handler: Any,
                    body: BaseModel | None, result: dict[str, Any] | None = None) -> str | None:
    """Run an operator route's ``handler`` for ``who`` with ``body``, as the API would (role
    check, audit of a refusal); None when done (its answer in ``result["result"]``), else the
    error to show."""
    now = auth.now(request)
    try:
        authorize(who.token, route, now)
        call = Call(request, request.app, request.app[STORE], who.token, who.actor, now,
                    body=body)
        answer = await handler(call)
    except EdgewiseError as exc:
        if isinstance(exc, Forbidden):
            await audit_denied(request.app, who.token, route, request, str(exc), now)
        return str(exc)
    if result is not None:
        result["result"] = answer
    return None


async def node_action(request: web.Request) -> web.StreamResponse:
    who, form = await auth.acting_viewer(request)
    action = request.match_info["action"]
    if action not in NODE_ACTIONS:
        raise web.HTTPNotFound(text=f"no action {action!r}")
    if action in ("revoke", "decommission") and form.get("confirm") != "on":
        return await _node_page(request, who, status=400,
                                error=f"tick “I confirm” to {action} the node")
    name = NODE_ACTIONS[action]
    route = next(r for r in oa.ALL_ROUTES if r.name == name)
    try:
        body = _body(route.body, form)
    except ValueError as exc:
        error: str | None = str(exc)
    else:
        error = await run_route(request, who, route, operator_api.HANDLERS[name], body)
    if error is not None:
        return await _node_page(request, who, error=error, status=400)
    raise web.HTTPSeeOther(f"/console/nodes/{quote(request.match_info['node_id'], safe='')}")
