"""The operator console: the fleet, its data and its rollouts in a browser (docs/console.md).

Served by the control plane itself, under ``/console`` on its one TLS port, behind the operator
tokens and roles (`auth`: a token signed in into a Secure, HttpOnly, SameSite=Strict cookie; a
CSRF token on every form). Pages are rendered on the server with Jinja2 (`pages`, `templates/`)
from what the store holds (`data`); a node page's charts update over Server-Sent Events
(`live`); rollouts are watched and driven from `rollouts`; a small script of our own
(`static/console.js`) draws them with Plotly's JavaScript bundle, served from the installed
``plotly`` package (nothing of it is in this repository).

`setup(app)` adds the routes; `app.create_app` calls it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiohttp import web

from edgewise.cloud.console import auth, live, pages, rollouts

STATIC = Path(__file__).parent / "static"
OWN_FILES = {"console.css": "text/css", "console.js": "text/javascript"}
PLOTLY = "plotly.min.js"


def plotly_bundle() -> Path | None:
    """Plotly's JavaScript bundle in the installed ``plotly`` package (not imported), if any."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / PLOTLY
    return path if path.is_file() else None


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name in OWN_FILES:
        return web.FileResponse(STATIC / name, headers={
            "Content-Type": OWN_FILES[name], "Cache-Control": "no-cache"})
    if name == PLOTLY:
        bundle = plotly_bundle()
        if bundle is not None:
            return web.FileResponse(bundle, headers={
                "Content-Type": "text/javascript", "Cache-Control": "max-age=86400"})
    raise web.HTTPNotFound(text=f"no console file {name!r}")


def setup(app: web.Application) -> None:
    auth.setup(app)
    app[pages.TEMPLATES] = pages.environment()
    app[live.LIVE_COUNT] = [0]
    r = app.router
    g = auth.guarded
    r.add_get("/console", g(pages.index))
    r.add_get("/console/", g(pages.index))
    r.add_get("/console/login", g(pages.login_form))
    r.add_post("/console/login", g(pages.login))
    r.add_post("/console/logout", g(pages.logout))
    r.add_get("/console/fleet", g(pages.fleet))
    r.add_get("/console/alarms", g(pages.alarms_page))
    r.add_get(r"/console/nodes/{node_id:[^/]{1,64}}", g(pages.node))
    r.add_get(r"/console/nodes/{node_id:[^/]{1,64}}/live", g(live.live))
    r.add_post(r"/console/nodes/{node_id:[^/]{1,64}}/{action:[a-z]{1,20}}",
               g(pages.node_action))
    r.add_get("/console/rollouts", g(rollouts.rollouts_page))
    r.add_post("/console/rollouts", g(rollouts.create))
    r.add_get(r"/console/rollouts/{rollout_id:ro-[0-9a-f]{8}}", g(rollouts.rollout_page))
    r.add_post(r"/console/rollouts/{rollout_id:ro-[0-9a-f]{8}}/{verb:[a-z]{1,10}}",
               g(rollouts.command))
    r.add_get(r"/console/static/{name:[a-z.]{1,40}}", g(static))
