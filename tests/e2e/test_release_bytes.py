"""What a release costs on the node's link, measured at the link (issue 10): a node behind a
`LinkProxy` (the bytes it forwards from the control plane to the node) is given a release with a
large model file, then a release that changes only its pipeline file. The second moves at most
twice that file plus the TUF metadata and the manifest (and a small allowance for TLS handshakes,
HTTP headers and the session's own acknowledgements while it runs): the model, which the other
slot already holds, is not downloaded again.

The benchmark with a 20 MB release over a 2 Mbit/s link is benchmarks/release_transfer.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from edgewise.testbed.system import AgentProcess, System, run_cli
from release_kit import pipeline_yaml, write_release

pytestmark = pytest.mark.timeout(300)

MODEL = 3 * 1024 * 1024  # bytes of the model file both releases share
ALLOWANCE = 16 * 1024  # the download connection's TLS handshake (one, kept alive), HTTP
# headers, the desired-state fetch and the session's acks while the release applies


async def cli(*args: str) -> str:
    res = await run_cli(*args)
    assert res.returncode == 0, f"edgewise {' '.join(args)}: {res.stderr}{res.stdout}"
    return res.stdout


def status(agent: AgentProcess) -> dict[str, Any]:
    try:
        return json.loads((agent.data_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


async def until_running(agent: AgentProcess, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = status(agent)
        rel = st.get("release") or {}
        if rel.get("running") == version and rel.get("state") == "committed":
            return
        assert time.monotonic() < deadline, (version, rel, agent.log.read_text()[-3000:])
        await asyncio.sleep(0.2)


def metadata_bytes(cloud_data: Path) -> int:
    """The newest TUF metadata of every role the node fetches on an update, as stored."""
    import sqlite3

    db = sqlite3.connect(f"file:{cloud_data / 'edgewise.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT role, MAX(version) FROM tuf_metadata GROUP BY role").fetchall()
        total = 0
        for role, version in rows:
            if role == "root":
                continue  # unchanged: not fetched again
            (body,) = db.execute("SELECT data FROM tuf_metadata WHERE role=? AND version=?",
                                 (role, version)).fetchone()
            total += len(body)
        return total
    finally:
        db.close()


async def node_with_release(system: System, tmp_path: Path,
                            release: Path) -> tuple[Any, str, AgentProcess, str]:
    """A control plane with TUF keys and ``release`` published as 1.0, and one node (behind
    a link proxy, a 2 s gate) running a base pipeline: (cloud, its data dir, agent, node id)."""
    base = tmp_path / "base.yaml"
    base.write_text(pipeline_yaml("base"))
    cloud = await system.start_cloud()
    data = str(cloud.data_dir)
    await cli("cloud", "keys", "init", str(tmp_path / "root-keys"), "--data", data)
    await cli("release", "publish", str(release), "--version", "1.0", "--data", data)
    agent = await system.add_agent("a", base, await cloud.token({"site": "b"}),
                                   extra_args=["--gate-window", "2", "--gate-start", "30"])
    deadline = time.monotonic() + 60
    while not status(agent).get("node_id"):
        assert time.monotonic() < deadline, agent.log.read_text()[-3000:]
        await asyncio.sleep(0.2)
    return cloud, data, agent, status(agent)["node_id"]


async def test_a_release_that_changes_one_pipeline_moves_that_file_not_the_model(
        tmp_path: Path) -> None:
    model = os.urandom(MODEL)
    v1 = write_release(tmp_path / "r1", {"pipelines/line.yaml": pipeline_yaml("line-one"),
                                         "models/model.bin": model})
    changed = pipeline_yaml("line-two", high=97.0)
    v2 = write_release(tmp_path / "r2", {"pipelines/line.yaml": changed,
                                         "models/model.bin": model})
    async with System(tmp_path / "sys") as system:
        cloud, data, agent, node = await node_with_release(system, tmp_path, v1)
        assert agent.link is not None

        before = agent.link.stats.bytes_down
        await cli("config", "set", "--node", node, "--release", "1.0", "--data", data)
        await until_running(agent, "1.0")
        first = agent.link.stats.bytes_down - before
        assert first >= MODEL  # the model came over this link, once

        await cli("release", "publish", str(v2), "--version", "1.1", "--data", data)
        before = agent.link.stats.bytes_down
        await cli("config", "set", "--node", node, "--release", "1.1", "--data", data)
        await until_running(agent, "1.1")
        second = agent.link.stats.bytes_down - before
        meta = metadata_bytes(cloud.data_dir)
        manifest = (v2 / "manifest.json").stat().st_size if (v2 / "manifest.json").exists() \
            else 4096
        bound = 2 * len(changed) + meta + manifest + ALLOWANCE
        print(f"release 1.0: {first} B down; 1.1 (one {len(changed)} B pipeline changed): "
              f"{second} B down, bound {bound} B (metadata {meta} B)")
        assert second <= bound, (second, bound, len(changed), meta)
        assert await agent.stop() == 0


async def test_a_link_cut_during_the_download_leaves_the_old_release_and_the_update_resumes(
        tmp_path: Path) -> None:
    """The link dies halfway through the model: nothing switches (the old pipeline runs on,
    no slot half written is used), and once the link is back the release is fetched again and
    committed, every file whole (the slot is hash-checked before the switch)."""
    model = os.urandom(MODEL)
    v1 = write_release(tmp_path / "r1", {"pipelines/line.yaml": pipeline_yaml("line-one"),
                                         "models/model.bin": model})
    async with System(tmp_path / "sys") as system:
        _cloud, data, agent, node = await node_with_release(system, tmp_path, v1)
        assert agent.link is not None
        agent.link.rate = 512 * 1024  # 3 MiB take about 6 s
        before = agent.link.stats.bytes_down
        await cli("config", "set", "--node", node, "--release", "1.0", "--data", data)
        deadline = time.monotonic() + 60
        while agent.link.stats.bytes_down - before < MODEL // 2:
            assert time.monotonic() < deadline, agent.log.read_text()[-3000:]
            await asyncio.sleep(0.05)
        agent.link.cut("reset")
        await asyncio.sleep(3.0)
        st = status(agent)
        assert (st.get("release") or {}).get("running") in (None, ""), st.get("release")
        assert (st.get("engine") or {}).get("pipeline") == "base"
        assert (st.get("engine") or {}).get("state") == "running"
        agent.link.restore()
        await until_running(agent, "1.0")
        slot = agent.data_dir / "releases"
        found = [p for p in slot.glob("*/files/models/model.bin")]
        assert found and any(p.read_bytes() == model for p in found), found
        assert await agent.stop() == 0
