"""The operator console over real TLS on 127.0.0.1 (the control plane's own app and SQLite
store, `test_operator_api.cloud`): sign-in and its cookie, the fleet page's states, filters and
paging, roles deciding the buttons and the server refusing what a role may not do, CSRF, the
confirmation of destructive actions, alarms, the live stream and the chart bundle."""

from __future__ import annotations

import asyncio
import contextlib
import html as html_lib
import json
import re
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import test_operator_api
from test_operator_api import Cloud

from edgewise.cloud.console import data as console_data
from edgewise.cloud.fleet_metrics import FLEET_GAUGES
from edgewise.cloud.store import ChunkWrite, MarkWrite
from edgewise.sync import codec

# the operator API tests' control plane (its own app over TLS, SQLite), as fixtures here
backend, db, cloud = test_operator_api.backend, test_operator_api.db, test_operator_api.cloud

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


@contextlib.asynccontextmanager
async def signed_in(c: Cloud, role: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the console signed in with the ``role`` token (the cookie jar of httpx)."""
    ctx = ssl.create_default_context(cadata=c.ca.cert_pem.decode())
    async with httpx.AsyncClient(base_url=str(c.http.base_url), verify=ctx,
                                 timeout=10) as client:
        r = await client.post("/console/login", data={"token": c.tokens[role],
                                                      "next": "/console/fleet"})
        assert r.status_code == 303 and r.headers["location"] == "/console/fleet", r.text
        yield client


def csrf(html: str) -> str:
    m = CSRF.search(html)
    assert m, html[:2000]
    return m.group(1)


async def test_sign_in_cookie_and_redirects(cloud: Cloud) -> None:
    r = await cloud.http.get("/console/fleet?selector=site%3Da")
    assert r.status_code == 303
    where = urlsplit(r.headers["location"])
    assert where.path == "/console/login"
    assert parse_qs(where.query) == {"next": ["/console/fleet?selector=site%3Da"]}
    r = await cloud.http.post("/console/login", data={"token": "ewo_" + "x" * 43})
    assert r.status_code == 401 and "unknown or revoked operator token" in r.text
    assert "set-cookie" not in r.headers
    # only a console path is a place to go after signing in (no open redirect)
    r = await cloud.http.post("/console/login", data={"token": cloud.tokens["viewer"],
                                                      "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/console/fleet"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("edgewise_console=ewo_")
    for attr in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/console", "Max-Age=43200"):
        assert attr in cookie, cookie
    # a revoked token signs the browser out at its next page
    async with signed_in(cloud, "viewer") as client:
        assert (await client.get("/console/fleet")).status_code == 200
        r = await cloud.call("POST", "/v1/tokens/operator/revoke", "admin",
                             json={"token": cloud.tokens["viewer"]})
        assert r.status_code == 200, r.text
        r = await client.get("/console/fleet")
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")


async def test_fleet_page_states_filters_and_paging(cloud: Cloud) -> None:
    for i in range(230):
        await cloud.node({"site": f"s{i % 3}"}, f"n{i:03d}")
    await cloud.store.set_node_status("n005", "online")
    await cloud.store.set_quarantine("n007", "tampered agent", actor="test")
    gauges = cloud.running.app[FLEET_GAUGES]
    async with signed_in(cloud, "viewer") as client:
        # before the fleet gauges' pass has seen these nodes: no counts, and a state filter
        # reads the nodes themselves
        gauges.summary = None
        r = await client.get("/console/fleet", params={"state": "quarantined"})
        assert "Counting the fleet" in r.text
        assert re.findall(r'<tr data-node="([^"]+)">', r.text) == ["n007"]
        await gauges.refresh()
        r = await client.get("/console/fleet")
        assert r.status_code == 200
        html = r.text
        assert "230 nodes" in html
        assert re.search(r'data-count="online">1 online<', html)
        assert re.search(r'data-count="quarantined">1 quarantined<', html)
        assert re.search(r'data-count="offline">228 offline<', html)
        ids = re.findall(r'<tr data-node="([^"]+)">', html)
        assert ids == [f"n{i:03d}" for i in range(100)]
        nxt = re.search(r'href="(/console/fleet\?[^"]*after=n099)"', html)
        assert nxt, "a link to the next page"
        r = await client.get(nxt.group(1).replace("&amp;", "&"))
        assert re.findall(r'<tr data-node="([^"]+)">', r.text) == \
            [f"n{i:03d}" for i in range(100, 200)]
        r = await client.get("/console/fleet", params={"after": "n199"})
        assert re.findall(r'<tr data-node="([^"]+)">', r.text) == \
            [f"n{i:03d}" for i in range(200, 230)]
        assert "after=" not in r.text  # the last page
        r = await client.get("/console/fleet", params={"selector": "site=s1"})
        assert re.findall(r'<tr data-node="([^"]+)">', r.text)[:3] == ["n001", "n004", "n007"]
        assert "77 nodes" in r.text
        r = await client.get("/console/fleet", params={"state": "quarantined"})
        assert re.findall(r'<tr data-node="([^"]+)">', r.text) == ["n007"]
        assert "tampered agent" in r.text
        r = await client.get("/console/fleet", params={"selector": "site=s0", "state": "online"})
        assert re.findall(r'<tr data-node="([^"]+)">', r.text) == []  # n005 is site s2
        r = await client.get("/console/fleet", params={"selector": "=oops"})
        assert r.status_code == 200 and 'class="error"' in r.text
        r = await client.get("/console/fleet", params={"state": "sleeping"})
        assert "unknown state 'sleeping'" in html_lib.unescape(r.text)


async def test_roles_decide_the_buttons_and_the_server_checks_them(cloud: Cloud) -> None:
    await cloud.node({"site": "a"}, "n1")
    forms = {}
    for role in ("viewer", "operator", "admin"):
        async with signed_in(cloud, role) as client:
            html = (await client.get("/console/nodes/n1")).text
            forms[role] = sorted(set(re.findall(r'action="/console/nodes/n1/(\w+)"', html)))
            token = csrf(html)
            if role == "viewer":  # a viewer with a valid form still cannot change anything
                r = await client.post("/console/nodes/n1/labels",
                                      data={"csrf": token, "set": "rack=7"})
                assert r.status_code == 400 and "read-only" in r.text
            if role == "operator":
                r = await client.post("/console/nodes/n1/revoke",
                                      data={"csrf": token, "confirm": "on"})
                assert r.status_code == 400 and "needs role admin" in r.text
                r = await client.post("/console/nodes/n1/labels",
                                      data={"csrf": token, "set": "rack=7, line=b",
                                            "remove": "site"})
                assert r.status_code == 303
    assert forms == {"viewer": [], "operator": ["labels"],
                     "admin": ["decommission", "labels", "revoke"]}
    node = await cloud.store.get_node("n1")
    assert node is not None and node.labels == {"rack": "7", "line": "b"}
    audit = await cloud.store.list_audit(target="node:n1")
    assert [(e.action, e.actor.split("#")[0]) for e in audit][:1] == \
        [("node.label", "operator:operator-1")]
    denied = await cloud.store.list_audit(actor=None)
    assert sum(e.action == "denied" for e in denied) == 2  # the viewer's and the operator's


async def test_forged_posts_are_refused(cloud: Cloud) -> None:
    await cloud.node({"site": "a"}, "n1")
    async with signed_in(cloud, "admin") as client:
        token = csrf((await client.get("/console/nodes/n1")).text)
        for form in ({"set": "rack=9"}, {"set": "rack=9", "csrf": "0" * 64},
                     {"set": "rack=9", "csrf": token[:-1] + ("0" if token[-1] != "0" else "1")}):
            r = await client.post("/console/nodes/n1/labels", data=form)
            assert r.status_code == 403 and "CSRF" in r.json()["error"]
        # no cookie: refused whatever the form says
        r = await cloud.http.post("/console/nodes/n1/labels", data={"csrf": token, "set": "a=b"})
        assert r.status_code == 403
        # a destructive action needs the confirmation ticked
        r = await client.post("/console/nodes/n1/revoke", data={"csrf": token, "reason": "x"})
        assert r.status_code == 400 and "I confirm" in r.text
        node = await cloud.store.get_node("n1")
        assert node is not None and node.labels == {"site": "a"} and not node.revoked
        r = await client.post("/console/nodes/n1/revoke",
                              data={"csrf": token, "reason": "stolen", "confirm": "on"})
        assert r.status_code == 303
        node = await cloud.store.get_node("n1")
        assert node is not None and node.revoked
        # an oversized form is refused before it is read
        r = await client.post("/console/nodes/n1/labels",
                              data={"csrf": token, "set": "a=" + "b" * 10_000})
        assert r.status_code == 413


def alarm_cols(first: int, n: int) -> dict[str, np.ndarray]:
    seq = np.arange(first, first + n)
    return {"sensor": np.array([f"s{i}" for i in seq], dtype=object),
            "ts": 1_764_547_200.0 + seq, "value": 100.0 + seq, "kind": np.array(
                ["high"] * n, dtype=object)}


async def test_alarms_page_and_live_stream(cloud: Cloud) -> None:
    await cloud.node({"site": "a"}, "n1")
    await cloud.node({"site": "a"}, "n2")
    now = datetime.now(UTC)
    await cloud.store.commit_ingest(
        [ChunkWrite("n1", "alarms", 0, 3, 3, False, codec.encode(alarm_cols(0, 3)),
                    now - timedelta(seconds=30)),
         ChunkWrite("n2", "alarms", 0, 2, 2, False, codec.encode(alarm_cols(10, 2)), now),
         ChunkWrite("n1", "raw", 0, 500, 500, False, codec.encode(alarm_cols(0, 500)), now)],
        [], [MarkWrite("n1", "alarms", 3, now), MarkWrite("n2", "alarms", 2, now),
             MarkWrite("n1", "raw", 500, now)])
    async with signed_in(cloud, "viewer") as client:
        html = (await client.get("/console/alarms")).text
        rows = re.findall(r'<td class="num">(\d+)</td>', html)
        sensors = re.findall(r'&#34;sensor&#34;:&#34;(s\d+)&#34;', html)
        assert sensors == ["s11", "s10", "s2", "s1", "s0"] and rows == ["1", "0", "2", "1", "0"]
        html = (await client.get("/console/alarms", params={"node": "n1"})).text
        assert re.findall(r'&#34;sensor&#34;:&#34;(s\d+)&#34;', html) == ["s2", "s1", "s0"]
        # the live stream: one update with the charts of the last hour
        async with client.stream("GET", "/console/nodes/n1/live") as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if line == "" and len(lines) > 1:
                    break
        assert lines[0] == "event: update"
        snap = json.loads(lines[1].removeprefix("data: "))
        assert snap["node"] == "n1" and snap["state"] == "offline"
        assert {s: sum(v["v"]) * console_data.BUCKET_S for s, v in snap["charts"].items()} == \
            {"alarms": 3.0, "raw": 500.0}
        r = await cloud.http.get("/console/nodes/n1/live")  # no cookie
        assert r.status_code == 401 and "not signed in" in r.json()["error"]
        r = await client.get("/console/static/plotly.min.js")
        assert r.status_code == 200 and len(r.content) > 1_000_000
        r = await client.get("/console/nodes/nosuch")
        assert r.status_code == 404 and "no node 'nosuch'" in html_lib.unescape(r.text)


async def test_rollout_pages_start_pause_resume_and_watch_it_complete(cloud: Cloud) -> None:
    from test_rollouts import pairs_of, publish

    from edgewise.testbed.rollout_fleet import StoreFleet, add_nodes

    nodes = pairs_of(6)
    await add_nodes(cloud.store, nodes)
    await publish(cloud.store, "2.0")
    fleet = StoreFleet(cloud.store, [n for n, _ in nodes])
    async with signed_in(cloud, "viewer") as client:
        html = (await client.get("/console/rollouts")).text
        assert "No rollout yet." in html and 'action="/console/rollouts"' not in html
        # a viewer's valid form (the sign-out form's CSRF token) is still refused by role
        r = await client.post("/console/rollouts", data={"csrf": csrf(html), "release": "2.0",
                                                         "selector": "fleet=sim"})
        assert r.status_code == 400 and "read-only" in r.text
    async with signed_in(cloud, "operator") as client:
        html = (await client.get("/console/rollouts")).text
        token = csrf(html)
        assert '<option value="2.0">' in html
        form = {"csrf": token, "release": "2.0", "selector": "fleet=sim", "canary": "1",
                "waves": "50%,100%", "bake_s": "0", "max_failures": "0",
                "max_unavailable_per_site": "1", "gates": "dropped==0"}
        r = await client.post("/console/rollouts", data=dict(form, waves="50%"))
        assert r.status_code == 400 and "the last wave is 100%" in html_lib.unescape(r.text)
        r = await client.post("/console/rollouts", data=dict(form, csrf="0" * 64))
        assert r.status_code == 403
        r = await client.post("/console/rollouts", data=form)
        assert r.status_code == 303, r.text
        page = r.headers["location"]
        rid = page.rsplit("/", 1)[1]
        html = (await client.get(page)).text
        assert 'http-equiv="refresh"' in html and 'data-state="running"' in html
        assert "<code>dropped==0</code>" in html
        r = await client.post(f"{page}/pause", data={"csrf": token, "reason": "lunch"})
        assert r.status_code == 303
        html = (await client.get(page)).text
        assert 'data-state="paused"' in html and f'action="{page}/resume"' in html
        r = await client.post(f"{page}/pause", data={"csrf": token})
        assert r.status_code == 400  # not running: the API's refusal, shown on the page
        r = await client.post(f"{page}/resume", data={"csrf": token})
        assert r.status_code == 303
        state = ""
        for _ in range(60):  # the app's own driver advances it; the nodes answer each tick
            await fleet.tick()
            html = (await client.get(page)).text
            state = re.search(r'id="rollout-state" data-state="(\w+)"', html).group(1)
            if state == "completed":
                break
            await asyncio.sleep(0.5)
        assert state == "completed", html_lib.unescape(html)[-3000:]
        assert 'http-equiv="refresh"' not in html
        assert sum(n.running == "2.0" for n in fleet.nodes.values()) == 6
        listed = (await client.get("/console/rollouts")).text
        assert f'data-rollout="{rid}"' in listed
    actions = [e.action for e in await cloud.store.list_audit(limit=1000)
               if e.target == f"rollout:{rid}"]
    assert {"rollout.create", "rollout.pause", "rollout.resume"} <= set(actions), actions
