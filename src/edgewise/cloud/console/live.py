"""Live updates of a node page: Server-Sent Events (``GET /console/nodes/{id}/live``).

Every `INTERVAL` seconds the stream sends one ``update`` event, JSON: the node's state and its
reasons, whether it has a session on this control plane, and its charts (records per second of
each stream, `data.activity`, the whole last hour: a page that missed events is whole again
with the next one). The page's script (``static/console.js``) redraws the charts and the state
badge from it.

Bounded: at most `MAX_STREAMS` live streams per control plane process (429 beyond; the page
still works, without updates), each ends after `MAX_LIFETIME` (the browser's EventSource
reconnects by itself), and a client that stops reading is dropped when a write does not finish
within `WRITE_TIMEOUT`. The sign-in is checked again on every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from aiohttp import web

from edgewise.cloud.console import auth, data
from edgewise.cloud.console.auth import NotSignedIn
from edgewise.cloud.fleet_state import classify
from edgewise.cloud.http_errors import TooManyRequests
from edgewise.cloud.state import SESSIONS, STORE
from edgewise.security.tokens import TokenInvalid

INTERVAL = 2.0  # seconds between updates
MAX_STREAMS = 64  # live streams per process
MAX_LIFETIME = 600.0  # seconds one stream lasts; EventSource reconnects
WRITE_TIMEOUT = 10.0  # seconds a write may take

LIVE_COUNT = web.AppKey("console_live_streams", list)


async def snapshot(request: web.Request, node_id: str) -> dict[str, object] | None:
    store = request.app[STORE]
    info = await store.get_node(node_id)
    if info is None:
        return None
    now = auth.now(request)
    row = (await store.fleet_rows([info]))[0]
    st = classify(row, now)
    charts = await data.activity(store, node_id, now)
    return {"node": node_id, "state": st.state, "reason": st.reason,
            "session": request.app[SESSIONS].get(node_id) is not None,
            "at": now.timestamp(),
            "charts": {s: {"t": [p[0] for p in pts], "v": [p[1] for p in pts]}
                       for s, pts in charts.items()}}


async def live(request: web.Request) -> web.StreamResponse:
    try:
        await auth.viewer(request)
    except NotSignedIn:
        raise TokenInvalid("not signed in to the console") from None
    node_id = request.match_info["node_id"]
    live_count = request.app[LIVE_COUNT]
    if live_count[0] >= MAX_STREAMS:
        raise TooManyRequests(f"{MAX_STREAMS} live pages are open on this control plane; "
                              "the page works without updates, reload it later", 30.0)
    live_count[0] += 1
    try:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})
        await response.prepare(request)
        ends = time.monotonic() + MAX_LIFETIME
        while time.monotonic() < ends:
            try:
                await auth.viewer(request)
            except NotSignedIn:
                break
            snap = await snapshot(request, node_id)
            if snap is None:
                break
            payload = f"event: update\ndata: {json.dumps(snap, separators=(',', ':'))}\n\n"
            try:
                await asyncio.wait_for(response.write(payload.encode()), WRITE_TIMEOUT)
            except (TimeoutError, ConnectionError):
                break
            await asyncio.sleep(INTERVAL)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
    finally:
        live_count[0] -= 1
