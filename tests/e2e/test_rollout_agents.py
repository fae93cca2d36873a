"""Rollouts with real processes (issue 12): ``edgewise cloud serve``, ``edgewise agent run``
nodes in sites of two, the operator's CLI (``release publish``, ``rollout create|status|
abort``).

Default suite (2 agents, one site): a release that passes install and the node's own health
gate but raises the alarm rate 2.5 times pauses at the canary (fleet gate
``alarm_rate<=1.2x``), and abort rolls the canary back to what it had (no release: its own
pipeline.

Long suite (EDGEWISE_LONG_TESTS=1): the same with 6 agents in sites of two, then a good
release goes canary + 2 waves to every node, each node updated once, never two nodes of a site
in flight (from the audit log); and 20 agents, canary + 3 waves with the control plane killed
(-9) in the middle of a wave and started again: it resumes, no node updated twice, none
skipped.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import LONG_ONLY
from edgewise.testbed.system import AgentProcess, ChildProcess, System, run_cli
from release_kit import pipeline_yaml, write_release

pytestmark = pytest.mark.timeout(600)

RATE_HZ = 20.0  # 20 sensors: 400 readings/s per node
GOOD_SPIKES = 0.02  # alarms: spikes above 100 (base values stay below 90)
BAD_SPIKES = 0.05  # 2.5x: within the node's own gate (3x + 1/s), beyond the fleet gate 1.2x


def pipeline(name: str, spikes: float, stream: str = "alarms") -> str:
    return pipeline_yaml(name, high=100.0, rate_hz=RATE_HZ).replace(
        '{prefix: "line1/temp", count: 20}',
        f'{{prefix: "line1/temp", count: 20, spike_prob: {spikes}}}').replace(
        "stream: alarms", f"stream: {stream}")


async def cli(*args: str, json_out: bool = True) -> Any:
    res = await run_cli(*args, *(["--json"] if json_out else []), timeout=120)
    assert res.returncode == 0, f"edgewise {' '.join(args)}: {res.stderr}{res.stdout}"
    return json.loads(res.stdout) if json_out else res.stdout


def status(agent: AgentProcess) -> dict[str, Any]:
    try:
        return json.loads((agent.data_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def running(agent: AgentProcess) -> str | None:
    rel = status(agent).get("release") or {}
    return rel.get("running") if rel.get("state") == "committed" else None


async def wait(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s: {LAST}"
        await asyncio.sleep(every)


LAST: dict[str, Any] = {}  # the last rollout status seen (for a failure's message)


async def rollout_state(data: str, rid: str, *states: str) -> dict[str, Any] | None:
    res = await run_cli("rollout", "status", rid, "--nodes", "all", "--data", data, "--json")
    if res.returncode != 0:
        LAST["error"] = res.stderr[-500:]
        return None  # the control plane may be restarting
    doc = json.loads(res.stdout)
    LAST["doc"] = doc
    return doc if doc["state"] in states else None


async def audit(data: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    before: int | None = None
    while True:
        args = ["audit", "list", "--limit", "1000", "--data", data]
        if before is not None:
            args += ["--before-id", str(before)]
        page = await cli(*args)
        out += page["entries"]
        before = page.get("next_before_id")
        if before is None:
            return out


def max_in_flight_per_site(entries: list[dict[str, Any]]) -> int:
    flying: dict[str, set[str]] = {}
    most = 0
    for e in sorted((e for e in entries if e["action"] == "rollout.node"),
                    key=lambda e: e["id"]):
        s = flying.setdefault(str(e["detail"].get("site")), set())
        if e["detail"]["state"] == "assigned":
            s.add(e["target"])
        elif e["detail"]["state"] in ("healthy", "failed", "rolled_back"):
            s.discard(e["target"])
        most = max(most, len(s))
    return most


def release_assignments(entries: list[dict[str, Any]], version: str) -> dict[str, int]:
    """Desired versions per node that assign ``version`` (``desired.set`` in the audit)."""
    out: dict[str, int] = {}
    for e in entries:
        if e["action"] == "desired.set" and e["detail"].get("release") == version:
            out[e["target"]] = out.get(e["target"], 0) + 1
    return out


async def fleet(system: System, tmp: Path, n: int) -> tuple[str, list[AgentProcess]]:
    cloud = await system.start_cloud()
    data = str(cloud.data_dir)
    await cli("cloud", "keys", "init", str(tmp / "root-keys"), "--data", data, json_out=False)
    for version, spikes in (("2.0", GOOD_SPIKES), ("bad", BAD_SPIKES)):
        name = f"line-{version.replace('.', '-')}"  # a pipeline name has no dots
        folder = write_release(tmp / f"r{version}",
                               {"pipelines/line.yaml": pipeline(name, spikes)})
        await cli("release", "publish", str(folder), "--version", version, "--data", data,
                  json_out=False)
    base = tmp / "base.yaml"
    base.write_text(pipeline("base", GOOD_SPIKES))
    agents = []
    for site in range(n // 2):  # sites of two nodes (an HA pair each)
        token = await cloud.token({"fleet": "e2e", "site": f"s{site}"}, uses=2)
        for i in (2 * site, 2 * site + 1):
            agents.append(await system.add_agent(
                f"a{i:02d}", base, token, proxy=False,
                extra_args=["--gate-window", "3", "--gate-start", "60"]))

    async def enrolled() -> bool:
        return all(status(a).get("node_id") for a in agents)

    await wait("agents enrolled", enrolled, 300)
    return data, agents


def no_release(agent: AgentProcess) -> bool:
    """Runs its own pipeline again (with no release assigned the slots stay as they are,
    docs/updates.md, *Which pipeline runs*)."""
    eng = status(agent).get("engine") or {}
    return eng.get("pipeline") == "base" and eng.get("state") == "running"


async def test_a_bad_release_pauses_at_the_canary_and_abort_rolls_it_back(
        tmp_path: Path) -> None:
    async with System(tmp_path / "sys") as system:
        data, agents = await fleet(system, tmp_path, 2)
        await bad_release_then_abort(data, agents)
        for a in agents:
            assert await a.stop() == 0


async def bad_release_then_abort(data: str, agents: list[AgentProcess]) -> None:
    created = await cli("rollout", "create", "--release", "bad", "--selector", "fleet=e2e",
                        "--canary", "1", "--waves", "50%,100%", "--bake", "5s",
                        "--max-unavailable-per-site", "1", "--gate", "alarm_rate<=1.2x",
                        "--data", data)
    rid = created["id"]
    paused = await wait("paused at the canary",
                        lambda: rollout_state(data, rid, "paused", "completed"), 240)
    assert (paused["state"], paused["paused_by"], paused["wave"]) == ("paused", "gate", 0)
    assert "alarm_rate<=1.2x" in paused["reason"]
    canary = [n for n in paused["nodes"] if n["state"] == "healthy"]
    assert len(canary) == 1
    assert {n["state"] for n in paused["nodes"]} == {"healthy", "pending"}
    assert sum(running(a) == "bad" for a in agents) == 1  # the node's own gate let it pass
    await cli("rollout", "abort", rid, "--reason", "alarms", "--data", data)
    aborted = await wait("aborted", lambda: rollout_state(data, rid, "aborted"), 120)
    assert [n["state"] for n in aborted["nodes"] if n["wave"] == 0] == ["rolled_back"]

    async def none_runs_a_release() -> bool:
        return all(no_release(a) for a in agents)

    await wait("the canary back to no release", none_runs_a_release, 180)
    entries = await audit(data)
    assert len(release_assignments(entries, "bad")) == 1  # only the canary ever


@LONG_ONLY
async def test_six_agents_a_bad_release_is_aborted_then_a_good_one_completes(
        tmp_path: Path) -> None:
    async with System(tmp_path / "sys") as system:
        data, agents = await fleet(system, tmp_path, 6)
        await bad_release_then_abort(data, agents)
        created = await cli("rollout", "create", "--release", "2.0", "--selector", "fleet=e2e",
                            "--canary", "1", "--waves", "50%,100%",
                            "--max-unavailable-per-site", "1", "--gate", "alarm_rate<=1.2x",
                            "--data", data)
        rid2 = created["id"]
        done = await wait("completed", lambda: rollout_state(data, rid2, "completed",
                                                             "paused"), 400)
        assert done["state"] == "completed", done["reason"]
        assert done["states"] == {"healthy": 6}
        assert all(running(a) == "2.0" for a in agents)
        entries = await audit(data)
        assert max_in_flight_per_site(entries) == 1
        assigned = release_assignments(entries, "2.0")
        assert sorted(assigned.values()) == [1] * 6  # every node once
        for a in agents:
            assert await a.stop() == 0


@LONG_ONLY
async def test_twenty_agents_canary_and_three_waves_survive_a_kill_9_of_the_control_plane(
        tmp_path: Path) -> None:
    async with System(tmp_path / "sys") as system:
        data, agents = await fleet(system, tmp_path, 20)
        created = await cli("rollout", "create", "--release", "2.0", "--selector", "fleet=e2e",
                            "--canary", "1", "--waves", "20%,50%,100%", "--bake", "2s",
                            "--max-unavailable-per-site", "1", "--gate", "alarm_rate<=1.2x",
                            "--data", data)
        rid = created["id"]

        async def mid_wave() -> bool:
            doc = await rollout_state(data, rid, "running")
            return bool(doc and doc["wave"] == 2 and any(
                n["state"] in ("assigning", "assigned") for n in doc["nodes"]))

        await wait("in the middle of wave 2", mid_wave, 300, every=0.2)
        cloud = system.cloud
        assert cloud is not None
        cloud.child.signal(signal.SIGKILL)
        await cloud.child.wait(30)
        cloud.child = ChildProcess("cloud", cloud.child.argv, cloud.child.log)
        await cloud.start()
        done = await wait("completed after the restart",
                          lambda: rollout_state(data, rid, "completed", "paused"), 400)
        assert done["state"] == "completed", done["reason"]
        assert done["states"] == {"healthy": 20}
        assert all(running(a) == "2.0" for a in agents)
        entries = await audit(data)
        assert max_in_flight_per_site(entries) == 1
        assigned = release_assignments(entries, "2.0")
        assert len(assigned) == 20 and set(assigned.values()) == {1}  # none twice, none skipped
