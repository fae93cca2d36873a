"""The operator console in a real browser: headless Chromium (Debian's, /usr/bin/chromium)
driven by Playwright against `edgewise cloud serve` and two `edgewise agent run` processes
(the factory line) behind link proxies.

A viewer signs in with a token made by `edgewise token create --role viewer`, sees both nodes
online on the fleet page, watches a node's live chart update, sees the node go offline when its
link is reset and come back when it is restored; the viewer's pages have no action form and a
POST the page did not make (no CSRF token) is refused with 403 although the browser sends the
session cookie. An admin then changes the node's labels through the page's form and rolls a
release out to both nodes from the rollouts page (a canary, then the rest), watching it
complete.

Screenshots of each page go to ``artifacts/console/`` (CI keeps that folder; docs/console.md
shows them). Needs Playwright and Chromium: skipped without them unless
EDGEWISE_REQUIRE_SERVICES=1 (then it fails; `.ci/run` installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgewise.testbed.system import AgentProcess, System, factory_pipeline, link_state, run_cli
from release_kit import pipeline_yaml, write_release

CHROMIUM = os.environ.get("EDGEWISE_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"
REQUIRE = os.environ.get("EDGEWISE_REQUIRE_SERVICES") == "1"


def browser_or_skip() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        if REQUIRE:
            raise
        pytest.skip("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        if REQUIRE:
            pytest.fail(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return async_playwright


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def token(cloud_data: Path, name: str, role: str) -> str:
    res = await run_cli("token", "create", name, "--role", role, "--data", str(cloud_data),
                        "--json")
    assert res.returncode == 0, res.stderr
    return str(json.loads(res.stdout)["token"])


async def sign_in(page: Any, url: str, tok: str) -> None:
    await page.goto(f"{url}/console/login")
    await page.get_by_label("Operator token").fill(tok)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url("**/console/fleet")


async def test_console_in_a_browser(tmp_path: Path) -> None:
    async_playwright = browser_or_skip()
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with System(tmp_path) as system:
        cloud = await system.start_cloud()
        data = str(cloud.data_dir)
        # a release to roll out from the console (keys before the nodes enrol: the enrolment
        # answer carries the TUF root)
        for args in (("cloud", "keys", "init", str(tmp_path / "root-keys")),
                     ("release", "publish", str(write_release(tmp_path / "r2", {
                         "pipelines/line.yaml": pipeline_yaml("line-2-0")})),
                      "--version", "2.0")):
            res = await run_cli(*args, "--data", data)
            assert res.returncode == 0, res.stderr
        text, _seed = factory_pipeline(None)  # unlimited: they produce while the test runs
        pipeline = tmp_path / "factory-line.yaml"
        pipeline.write_text(text)
        agents: list[AgentProcess] = []
        for name in ("edge-1", "edge-2"):
            enrol = await cloud.token({"site": "plant-1", "node": name})
            agents.append(await system.add_agent(
                name, pipeline, enrol, extra_args=["--gate-window", "2", "--gate-start", "60"]))
        await until(lambda: all(link_state(a.status()) == "connected" for a in agents), 90,
                    "both agents connected")
        ids = [a.node_id for a in agents]
        assert all(ids)
        viewer_token = await token(cloud.data_dir, "browser-viewer", "viewer")
        admin_token = await token(cloud.data_dir, "browser-admin", "admin")

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                ctx = await browser.new_context(ignore_https_errors=True,
                                                viewport={"width": 1280, "height": 800})
                page = await ctx.new_page()
                await sign_in(page, cloud.url, viewer_token)
                cookies = await ctx.cookies()
                (cookie,) = [c for c in cookies if c["name"] == "edgewise_console"]
                assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
                assert await page.evaluate("document.cookie") == ""  # no script reads it

                # the fleet: both nodes online
                async def fleet_online() -> bool:
                    await page.goto(f"{cloud.url}/console/fleet")
                    badges = await page.locator("tr[data-node] .badge").all_inner_texts()
                    return badges == ["online", "online"]

                await until(fleet_online, 60, "both nodes online on the fleet page")
                rows = await page.locator("tr[data-node]").evaluate_all(
                    "rows => rows.map(r => r.dataset.node)")
                assert sorted(rows) == sorted(ids)
                await page.screenshot(path=str(SHOTS / "fleet.png"), full_page=True)

                # a node: the live chart updates
                node = agents[0]
                await page.goto(f"{cloud.url}/console/nodes/{node.node_id}")
                charts = page.locator("#charts")
                await until(lambda: charts.get_attribute("data-updates"), 30, "a live update")
                first = int(await charts.get_attribute("data-updates") or 0)

                async def updated_with_points() -> bool:
                    n = int(await charts.get_attribute("data-updates") or 0)
                    pts = int(await charts.get_attribute("data-points") or 0)
                    return n >= first + 2 and pts > 0

                await until(updated_with_points, 30, "the chart to update with points")
                assert await page.locator("#charts .main-svg").count() >= 1  # Plotly drew it
                assert await page.locator("#state").inner_text() == "online"
                await page.screenshot(path=str(SHOTS / "node.png"), full_page=True)

                # the viewer has no action form, and a forged POST is refused
                assert await page.locator("form[action*='/labels']").count() == 0
                forged = await page.request.post(
                    f"{cloud.url}/console/nodes/{node.node_id}/labels",
                    form={"set": "rack=9"})
                assert forged.status == 403 and "CSRF" in (await forged.json())["error"]

                # the link reset: offline, then back online, seen on the page (SSE)
                assert node.link is not None
                node.link.cut("reset")

                async def state_is(want: str) -> bool:
                    return await page.locator("#state").inner_text() == want

                await until(lambda: state_is("offline"), 60, "the node offline on its page")
                await page.screenshot(path=str(SHOTS / "node-offline.png"), full_page=True)
                node.link.restore()
                await until(lambda: state_is("online"), 90, "the node back online")

                await page.goto(f"{cloud.url}/console/alarms")
                assert await page.locator("table.alarms tbody tr").count() >= 1
                await page.screenshot(path=str(SHOTS / "alarms.png"), full_page=True)
                await ctx.close()

                # an admin changes the node's labels through the form
                ctx = await browser.new_context(ignore_https_errors=True,
                                                viewport={"width": 1280, "height": 800})
                page = await ctx.new_page()
                await sign_in(page, cloud.url, admin_token)
                await page.goto(f"{cloud.url}/console/nodes/{node.node_id}")
                await page.get_by_label("Set labels (key=value, comma-separated)").fill(
                    "rack=7")
                await page.get_by_role("button", name="Change labels").click()
                await page.wait_for_url(f"**/console/nodes/{node.node_id}")
                assert "rack=7" in await page.locator("dl.facts").inner_text()
                await page.screenshot(path=str(SHOTS / "node-admin.png"), full_page=True)

                # ... and rolls release 2.0 out to both nodes: a canary, then the rest
                await page.goto(f"{cloud.url}/console/rollouts")
                await page.get_by_label("Release").fill("2.0")
                await page.get_by_label("Nodes (label selector)").fill("site=plant-1")
                await page.get_by_label("Waves (cumulative)").fill("100%")
                await page.get_by_role("button", name="Start rollout").click()
                await page.wait_for_url("**/console/rollouts/ro-*")
                seen: set[str] = set()

                async def rollout_completed() -> bool:
                    await page.reload()  # the page refreshes itself too, every 3 s
                    state = await page.locator("#rollout-state").get_attribute("data-state")
                    seen.add(state or "")
                    assert state not in ("paused", "aborted", "cancelled"), \
                        await page.locator("main").inner_text()
                    return state == "completed"

                await until(rollout_completed, 240, "the rollout to complete")
                assert "running" in seen
                await page.screenshot(path=str(SHOTS / "rollout.png"), full_page=True)
                await ctx.close()
            finally:
                await browser.close()
        shown = await asyncio.to_thread(cloud.operator().get_node, node.node_id)
        assert shown.labels == {"site": "plant-1", "node": "edge-1", "rack": "7"}
        def releases() -> list[tuple[Any, Any]]:
            rels = [json.loads((a.data_dir / "status.json").read_text()).get("release") or {}
                    for a in agents]
            return [(r.get("running"), r.get("state")) for r in rels]

        # both nodes run the release, committed. The agent writes status.json once a second,
        # and the control plane may have taken the commit's report, judged the node healthy
        # and completed the rollout within that second (seen here on an idle machine)
        with contextlib.suppress(AssertionError):
            await until(lambda: releases() == [("2.0", "committed")] * 2, 5,
                        "the status files to show the commit")
        assert releases() == [("2.0", "committed")] * 2
