"""The console's rollout pages: the list with a form to start one, one rollout's waves, gates and
nodes, and its commands (pause, resume, abort, cancel).

Everything goes through the rollout API's own handlers (`cloud.rollouts.api`: `ROUTES`,
`HANDLERS`) with the signed-in token, as `pages.run_route` does for node actions: the same role
checks, validation and audit. A rollout that is not over refreshes its page every
`REFRESH_S` seconds (the driver advances it in the background).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import ValidationError

from edgewise.cloud.console import auth
from edgewise.cloud.console.auth import Viewer
from edgewise.cloud.console.pages import render, run_route, signed_in
from edgewise.cloud.operator_call import Call, validation_message
from edgewise.cloud.rollouts import api as rollouts_api
from edgewise.cloud.rollouts import models as m
from edgewise.cloud.state import STORE
from edgewise.errors import EdgewiseError

REFRESH_S = 3
OVER = ("completed", "aborted", "cancelled")
VERBS = ("pause", "resume", "abort", "cancel")


def _route(name: str) -> Any:
    return next(r for r in rollouts_api.ROUTES if r.name == name)


async def _read(request: web.Request, who: Viewer, name: str, query: Any) -> Any:
    call = Call(request, request.app, request.app[STORE], who.token, who.actor,
                auth.now(request), query=query)
    return await rollouts_api.HANDLERS[name](call)


async def _list_page(request: web.Request, who: Viewer, *, error: str | None = None,
                     form: dict[str, str] | None = None, status: int = 200) -> web.Response:
    listed: m.RolloutList = await _read(request, who, "list_rollouts",
                                        m.RolloutListQuery(limit=50))
    releases = [r.version for r in await request.app[STORE].list_releases(limit=50)]
    return render(request, "rollouts.html", who, status=status, rollouts=listed.rollouts,
                  releases=releases, error=error, form=form or {})


async def rollouts_page(request: web.Request) -> web.Response:
    return await _list_page(request, await signed_in(request))


async def rollout_page(request: web.Request) -> web.Response:
    who = await signed_in(request)
    return await _detail_page(request, who)


async def _detail_page(request: web.Request, who: Viewer, *, error: str | None = None,
                       status: int = 200) -> web.Response:
    try:
        detail: m.RolloutDetail = await _read(request, who, "show_rollout",
                                              m.RolloutQuery(nodes="all"))
    except EdgewiseError as exc:
        return render(request, "missing.html", who, status=404, what=str(exc))
    return render(request, "rollout.html", who, status=status, r=detail, error=error,
                  refresh=None if detail.state in OVER else REFRESH_S, verbs=VERBS)


async def create(request: web.Request) -> web.StreamResponse:
    who, form = await auth.acting_viewer(request)
    body = {
        "release": form.get("release", "").strip(), "selector": form.get("selector", "").strip(),
        "canary": form.get("canary", "1").strip() or "1",
        "waves": form.get("waves", "100%").strip() or "100%",
        "max_failures": form.get("max_failures", "0").strip() or "0",
        "gates": [g.strip() for g in form.get("gates", "").splitlines() if g.strip()],
    }
    for key, kind in (("bake_s", float), ("max_unavailable_per_site", int)):
        text = form.get(key, "").strip()
        if text:
            try:
                body[key] = kind(text)
            except ValueError:
                return await _list_page(request, who, status=400, form=form,
                                        error=f"{key}: {text!r} is not a number")
    try:
        parsed = m.RolloutCreate.model_validate(body)
    except ValidationError as exc:
        return await _list_page(request, who, status=400, form=form,
                                error=validation_message(exc, "rollout"))
    holder: dict[str, Any] = {}
    error = await run_route(request, who, _route("create_rollout"),
                            rollouts_api.HANDLERS["create_rollout"], parsed, holder)
    if error is not None:
        return await _list_page(request, who, status=400, form=form, error=error)
    raise web.HTTPSeeOther(f"/console/rollouts/{quote(holder['result'].id, safe='')}")


async def command(request: web.Request) -> web.StreamResponse:
    who, form = await auth.acting_viewer(request)
    verb = request.match_info["verb"]
    if verb not in VERBS:
        raise web.HTTPNotFound(text=f"no rollout command {verb!r}")
    name = f"{verb}_rollout"
    error = await run_route(request, who, _route(name), rollouts_api.HANDLERS[name],
                            m.RolloutCommand(reason=form.get("reason", "")[:1000]), {})
    if error is not None:
        return await _detail_page(request, who, error=error, status=400)
    raise web.HTTPSeeOther(f"/console/rollouts/{quote(request.match_info['rollout_id'], safe='')}")
