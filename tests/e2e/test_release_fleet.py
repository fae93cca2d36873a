"""A release for several nodes at once (issue 10): build → publish → assign by selector → every
node runs it, seen three ways: each node's own status (the release running, committed, and its
pipeline), what the control plane shows of each node (`node show`: the reported release), and
what each node's pipeline produces (a stream only the release's pipeline writes, stored in the
control plane for every node). Real `cloud serve`, operator CLI and `agent run` processes:
two nodes in the selector and one outside it (three in it with EDGEWISE_LONG_TESTS=1)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from edgewise.testbed.system import AgentProcess, System, run_cli
from release_kit import pipeline_yaml, write_release

pytestmark = pytest.mark.timeout(300)

NODES = 3 if os.environ.get("EDGEWISE_LONG_TESTS") == "1" else 2
VERSION = "3.0"


async def cli(*args: str) -> str:
    res = await run_cli(*args)
    assert res.returncode == 0, f"edgewise {' '.join(args)}: {res.stderr}{res.stdout}"
    return res.stdout


def status(agent: AgentProcess) -> dict[str, Any]:
    try:
        return json.loads((agent.data_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def runs(agent: AgentProcess, version: str, pipeline: str) -> bool:
    st = status(agent)
    rel, eng = st.get("release") or {}, st.get("engine") or {}
    return (rel.get("running") == version and rel.get("state") == "committed"
            and eng.get("pipeline") == pipeline and eng.get("state") == "running")


def stored(cloud_data: Path, node: str, stream: str) -> int:
    db = sqlite3.connect(f"file:{cloud_data / 'edgewise.db'}?mode=ro", uri=True)
    try:
        (n,) = db.execute("SELECT COALESCE(SUM(seq_count), 0) FROM chunks WHERE node_id=? AND "
                          "stream=?", (node, stream)).fetchone()
        return int(n)
    finally:
        db.close()


async def test_a_release_assigned_by_selector_runs_on_every_node(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(pipeline_yaml("base", high=100.0))
    # the release's pipeline: the same alarms (a flood would fail the health gate), on a
    # stream of its own
    release_pipe = pipeline_yaml("line-three", high=100.0).replace("stream: alarms",
                                                                  "stream: release-alarms")
    folder = write_release(tmp_path / "r3", {"pipelines/line.yaml": release_pipe,
                                             "models/m.bin": b"m" * 10_000})
    async with System(tmp_path / "sys") as system:
        cloud = await system.start_cloud()
        data = str(cloud.data_dir)
        await cli("cloud", "keys", "init", str(tmp_path / "root-keys"), "--data", data)
        await cli("release", "publish", str(folder), "--version", VERSION, "--data", data)
        *tokens, other_token = await asyncio.gather(
            *(cloud.token({"site": "r"}) for _ in range(NODES)), cloud.token({"site": "elsewhere"}))
        agents = [await system.add_agent(f"n{i}", base, token, proxy=False,
                                         extra_args=["--gate-window", "2", "--gate-start", "30"])
                  for i, token in enumerate(tokens)]
        other = await system.add_agent("other", base, other_token, proxy=False)
        deadline = time.monotonic() + 90
        while not all(status(a).get("node_id") for a in [*agents, other]):
            assert time.monotonic() < deadline, [a.log.read_text()[-1500:] for a in agents]
            await asyncio.sleep(0.2)

        await cli("config", "set", "--selector", "site=r", "--release", VERSION, "--data", data)
        deadline = time.monotonic() + 120
        while not all(runs(a, VERSION, "line-three") for a in agents):
            assert time.monotonic() < deadline, [(status(a).get("release"), a.log.read_text()[
                -1500:]) for a in agents]
            await asyncio.sleep(0.3)

        nodes = [status(a)["node_id"] for a in agents]
        deadline = time.monotonic() + 60
        while True:  # each node's pipeline output, stored in the control plane
            counts = [stored(cloud.data_dir, n, "release-alarms") for n in nodes]
            if all(c > 0 for c in counts):
                break
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.5)
        for node in nodes:  # what the control plane shows of the node: its reported release
            shown = json.loads(await cli("node", "show", node, "--json", "--data", data))
            assert VERSION in json.dumps(shown.get("reported") or shown), shown
        # the node outside the selector: no release, its own pipeline, nothing on that stream
        st = status(other)
        assert (st.get("release") or {}).get("running") in (None, ""), st.get("release")
        assert (st.get("engine") or {}).get("pipeline") == "base"
        assert stored(cloud.data_dir, st["node_id"], "release-alarms") == 0
        for a in [*agents, other]:
            assert await a.stop() == 0
