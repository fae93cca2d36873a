"""Releases end to end, with the real processes: ``edgewise cloud serve``, the operator's CLI
(``cloud keys init|rotate``, ``release build|publish|list|show``, ``config set --release``), an
``edgewise agent run`` that enrols (and keeps the TUF root of its enrolment answer), and the
node's `ReleaseFetcher` with that node's identity (its key and certificate, over mutual TLS).

What is checked, exactly: the manifest the CLI builds is the one the control plane serves and the
node verifies; every file the node downloads is byte for byte the file of the release folder; a
second release that changes one pipeline uploads one file; the assigned release reaches the
node's twin; a key rotation while the control plane runs is followed by the node (root version
2 in its trusted metadata) and given to nodes enrolling after it. (Attacks on the metadata are
tests/integration/test_tuf_attacks.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from edgewise.edge.release_fetcher import ReleaseFetcher
from edgewise.errors import EdgewiseError, UpdateRefused
from edgewise.security.tls import client_context
from edgewise.sync import twin_state
from edgewise.sync.release import Manifest, build_manifest
from edgewise.testbed.system import AgentProcess, System, factory_pipeline, run_cli

pytestmark = pytest.mark.asyncio

VERSION = "2026.12.1"


async def cli(*args: str) -> dict:
    res = await run_cli(*args, "--json")
    assert res.returncode == 0, f"edgewise {' '.join(args)}: {res.stderr}"
    return json.loads(res.stdout)


def release_folder(root: Path, pipeline: Path) -> Path:
    (root / "pipelines").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "config").mkdir()
    shutil.copyfile(pipeline, root / "pipelines" / "line.yaml")
    (root / "pipelines" / "spare.yaml").write_text(pipeline.read_text().replace(
        "name: ", "name: spare-", 1))
    (root / "models" / "weights.bin").write_bytes(os.urandom(300_000))
    (root / "models" / "copy.bin").write_bytes((root / "models" / "weights.bin").read_bytes())
    (root / "config" / "site.toml").write_text('line = "1"\n')
    (root / "setpoints.yaml").write_text("temp_max: 95.5\nmode: auto\n")
    return root


async def wait_connected(agent: AgentProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = agent.status()
            if st.link_state == "connected" and st.node_id:
                return
        except EdgewiseError:
            pass
        assert time.monotonic() < deadline and agent.running, agent.child and \
            agent.child.log_tail()
        await asyncio.sleep(0.1)


async def test_release_build_publish_assign_fetch_and_rotate(tmp_path: Path) -> None:
    async with System(tmp_path / "sys") as system:
        cloud = await system.start_cloud()
        data = str(cloud.data_dir)
        root_dir = tmp_path / "offline-root"

        made = await cli("cloud", "keys", "init", str(root_dir), "--data", data)
        assert made["root_version"] == 1 and len(made["root_keys"]) == 1
        assert sorted(p.name for p in (cloud.data_dir / "tuf" / "keys").iterdir()) == [
            "snapshot.key", "targets.key", "timestamp.key"]
        assert (cloud.data_dir / "tuf" / "keys" / "targets.key").stat().st_mode & 0o077 == 0
        again = await run_cli("cloud", "keys", "init", str(tmp_path / "other"), "--data", data)
        assert again.returncode == 2 and "keys rotate" in again.stderr

        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(factory_pipeline(None)[0])
        source = release_folder(tmp_path / "release", pipeline)
        out = tmp_path / "out"
        built = await cli("release", "build", str(source), "--version", VERSION, "-o", str(out))
        expected = build_manifest(source, VERSION)
        assert built == {"version": VERSION, "digest": expected.digest(), "files": 5,
                         "bytes": expected.total_bytes(), "setpoints": 2, "out": str(out)}
        assert (out / "manifest.json").read_bytes() == expected.to_bytes()
        assert len(list((out / "blobs").iterdir())) == 4  # the two equal models are one blob

        bad = tmp_path / "bad"
        (bad / "pipelines").mkdir(parents=True)
        (bad / "pipelines" / "notes.txt").write_text("x")
        res = await run_cli("release", "build", str(bad), "--version", "1")
        assert res.returncode == 2
        assert f"{bad}/pipelines/notes.txt: pipelines/ holds <name>.yaml files only" in res.stderr
        res = await run_cli("release", "publish", str(source), "--data", data)
        assert res.returncode == 2 and "has no manifest.json" in res.stderr

        published = await cli("release", "publish", str(out), "--data", data)
        assert published["new"] is True and published["uploaded"] == 4
        assert published["release"]["files"] == 5
        assert published["release"]["digest"] == expected.digest()
        republished = await cli("release", "publish", str(out), "--data", data)
        assert republished["new"] is False and republished["uploaded"] == 0

        listed = await cli("release", "list", "--data", data)
        assert [(r["version"], r["files"], r["bytes"]) for r in listed["releases"]] == [
            (VERSION, 5, expected.total_bytes())]
        shown = await cli("release", "show", VERSION, "--data", data)
        assert json.dumps(shown["manifest"], sort_keys=True, separators=(",", ":")
                          ).encode() == expected.to_bytes()
        missing = await run_cli("release", "show", "9.9.9", "--data", data)
        assert missing.returncode == 2 and "no release '9.9.9'" in missing.stderr

        # a node enrols and keeps the TUF root of the enrolment answer
        token = await cloud.token({"site": "a"})
        agent = await system.add_agent("a", pipeline, token, proxy=False)
        await wait_connected(agent)
        identity = agent.data_dir / "identity"
        trusted = (identity / "tuf-root.json").read_bytes()
        assert trusted == (root_dir / "1.root.json").read_bytes()

        node = agent.node_id
        assert node is not None
        unknown = await run_cli("config", "set", "--node", node, "--release", "0.0.1",
                                "--data", data)
        assert unknown.returncode == 2 and "no release '0.0.1' is published" in unknown.stderr
        assigned = await cli("config", "set", "--node", node, "--release", VERSION,
                             "--data", data)
        version = assigned["nodes"][0]["version"]
        deadline = time.monotonic() + 30
        while True:  # the node's twin holds the assignment
            state = twin_state.load_desired(agent.data_dir / "twin" / "desired.msgpack")
            if state is not None and state.version == version:
                break
            assert time.monotonic() < deadline, agent.child and agent.child.log_tail()
            await asyncio.sleep(0.2)
        assert state.release == VERSION
        got = await cli("config", "get", "--node", node, "--data", data)
        assert got["desired"]["release"] == VERSION

        # the node's fetcher: its own identity, the root from enrolment
        ctx = client_context(identity / "ca.pem", identity / "node.pem", identity / "node.key")
        meta = tmp_path / "node-tuf"
        fetcher = ReleaseFetcher(meta, cloud.url, ctx, trusted)
        await asyncio.to_thread(fetcher.refresh)
        manifest = await asyncio.to_thread(fetcher.manifest, VERSION)
        assert manifest == expected and manifest.to_bytes() == expected.to_bytes()
        assert manifest.setpoints == {"temp_max": 95.5, "mode": "auto"}
        files = tmp_path / "node-files"
        files.mkdir()
        for f in manifest.files:
            await asyncio.to_thread(fetcher.fetch_blob, f.sha256, files / f.sha256)
            assert (files / f.sha256).read_bytes() == (source / f.path).read_bytes()
        assert sorted(p.name for p in files.iterdir()) == sorted(manifest.blobs())
        with pytest.raises(UpdateRefused, match="not among the signed targets"):
            await asyncio.to_thread(fetcher.manifest, "0.0.1")
        assert not list(files.glob(".*"))  # no temp file left

        # release 2 changes one pipeline: one file to upload, one blob new to the node
        (source / "pipelines" / "spare.yaml").write_text(
            (source / "pipelines" / "spare.yaml").read_text() + "# changed\n")
        second = await cli("release", "publish", str(source), "--version", "2026.12.2",
                           "--data", data)
        assert second["new"] is True and second["uploaded"] == 1

        # a key rotation while the control plane runs: the node follows it
        old_keys = {r: (cloud.data_dir / "tuf" / "keys" / f"{r}.key").read_bytes()
                    for r in ("targets", "snapshot", "timestamp")}
        rotated = await cli("cloud", "keys", "rotate", str(root_dir), "--data", data)
        assert rotated["root_version"] == 2
        assert all((cloud.data_dir / "tuf" / "keys" / f"{r}.key").read_bytes() != k
                   for r, k in old_keys.items())
        fetcher = ReleaseFetcher(meta, cloud.url, ctx, trusted)  # root v1 from enrolment
        await asyncio.to_thread(fetcher.refresh)
        assert (meta / "root_history" / "2.root.json").read_bytes() == (
            root_dir / "2.root.json").read_bytes()
        m2 = await asyncio.to_thread(fetcher.manifest, "2026.12.2")
        new = set(m2.blobs()) - set(manifest.blobs())
        assert len(new) == 1
        (sha,) = new
        await asyncio.to_thread(fetcher.fetch_blob, sha, files / sha)
        assert (files / sha).read_bytes() == (source / "pipelines" / "spare.yaml").read_bytes()

        # a node enrolling now gets root version 2
        token_b = await cloud.token({"site": "b"})
        agent_b = await system.add_agent("b", pipeline, token_b, proxy=False)
        await wait_connected(agent_b)
        assert (agent_b.data_dir / "identity" / "tuf-root.json").read_bytes() == (
            root_dir / "2.root.json").read_bytes()
        assert Manifest.from_bytes(manifest.to_bytes()) == manifest
