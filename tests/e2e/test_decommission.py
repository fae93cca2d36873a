"""Decommissioning a node, with the real processes: ``edgewise cloud serve`` and ``edgewise agent
run`` subprocesses, the operator's ``edgewise node decommission`` CLI, and HTTP with a copy of
the node's own key and certificate (what a node that kept its files would present).

* a node with a live session: the session is closed and requests with its (unexpired)
  certificate are refused within 1 s; with ``--wipe`` the agent deletes its files and exits
  with code 4, and refuses to start again with one line;
* a node that was stopped (offline) when it was decommissioned wipes itself when it returns;
* decommissioned without ``--wipe``: the agent stops with code 4 and keeps its files;
* the registry keeps the record (``node list/show``, audit log), the old key cannot enrol
  again (old used token or a new one), a new token on the same data directory can.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from edgewise.errors import EdgewiseError
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.sync import protocol
from edgewise.testbed.system import AgentProcess, ControlPlane, System, factory_pipeline, run_cli

pytestmark = pytest.mark.asyncio

TIMEOUT = aiohttp.ClientTimeout(total=10)
MARKER = "decommissioned.json"


def files(data_dir: Path) -> list[str]:
    """Every file and folder under ``data_dir``, relative, sorted."""
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))


async def live_sessions(cloud: ControlPlane, http: aiohttp.ClientSession) -> int:
    text = await (await http.get(f"{cloud.url}/metrics")).text()
    m = re.search(r"^edgewise_sessions (\S+)$", text, re.M)
    assert m, text[:500]
    return int(float(m.group(1)))


async def wait_connected(agent: AgentProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = agent.status()
            if st.link_state == "connected" and st.node_id:
                return
        except EdgewiseError:  # status.json not written yet
            pass
        assert time.monotonic() < deadline and agent.running, agent.child and \
            agent.child.log_tail()
        await asyncio.sleep(0.1)


async def start_agent(system: System, name: str, pipeline: Path, proxy: bool = False
                      ) -> tuple[AgentProcess, str]:
    assert system.cloud is not None
    token = await system.cloud.token({"site": name})
    agent = await system.add_agent(name, pipeline, token, proxy=proxy)
    await wait_connected(agent)
    return agent, token


def keep_identity(agent: AgentProcess, into: Path) -> Path:
    """A copy of the node's identity, as a node that hid its files would keep it."""
    shutil.copytree(agent.data_dir / "identity", into)
    return into


def old_identity_http(cloud: ControlPlane, kept: Path) -> aiohttp.ClientSession:
    ctx = client_context(cloud.ca, kept / "node.pem", kept / "node.key")
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=TIMEOUT)


async def decommission(cloud: ControlPlane, node_id: str, *flags: str) -> None:
    res = await run_cli("node", "decommission", node_id, *flags, "--yes", "--reason", "e2e",
                        "--config", str(cloud.cli_config))
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert f"{node_id}: decommissioned" in res.stdout, res.stdout


def restart_refusal(agent: AgentProcess) -> str:
    """The output of the agent's last run (its log after the last start line)."""
    text = agent.log.read_text(errors="replace")
    return text.rsplit("\n--- ", 1)[-1].split("\n", 1)[1]


async def test_live_node_decommissioned_with_wipe(tmp_path: Path) -> None:
    async with System(tmp_path) as system:
        cloud = await system.start_cloud()
        text, _ = factory_pipeline(20_000)
        (tmp_path / "p.yaml").write_text(text)
        agent, old_token = await start_agent(system, "a", tmp_path / "p.yaml")
        node_id = agent.node_id
        assert node_id is not None
        kept = keep_identity(agent, tmp_path / "kept")
        cert = x509.load_pem_x509_certificate((kept / "node.pem").read_bytes())
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client_context(cloud.ca)),
                timeout=TIMEOUT) as plain, old_identity_http(cloud, kept) as old:
            assert await live_sessions(cloud, plain) == 1
            r = await old.get(f"{cloud.url}/v1/device/desired")
            assert r.status == 200  # the copy works before

            # timed from the API call (the CLI's own start-up is not the control plane's)
            op = cloud.operator()
            started = time.monotonic()
            node = await asyncio.to_thread(op.decommission_node, node_id, wipe=True,
                                           reason="e2e")
            assert (node.status, node.wipe) == ("decommissioned", True)
            while await live_sessions(cloud, plain) != 0:
                assert time.monotonic() - started < 1.0, "the session is still open after 1 s"
                await asyncio.sleep(0.02)
            closed_s = time.monotonic() - started
            r = await old.get(f"{cloud.url}/v1/device/desired")
            refused_s = time.monotonic() - started
            # refused although the certificate has not expired, and told to wipe
            assert cert.not_valid_after_utc > datetime.now(UTC)
            assert r.status == 403, await r.text()
            assert r.headers[protocol.DECOMMISSIONED_HEADER] == "wipe"
            assert closed_s < 1.0 and refused_s < 1.0, (closed_s, refused_s)
            print(f"session closed after {closed_s:.3f} s, request refused after "
                  f"{refused_s:.3f} s", file=sys.stderr)

            # the agent heard it on its live session: wiped, exit code 4
            assert await agent.child.wait(30) == 4, agent.child.log_tail(30)
            assert files(agent.data_dir) == [MARKER]
            log = agent.log.read_text()
            assert f"DECOMMISSIONED: the control plane decommissioned node {node_id}" in log
            # releases/ is there if the agent keeps release slots
            assert re.search(r"; wiped identity, engine, twin, uplink, (releases, )?status\.json;",
                             log), log

            # a restart (a supervisor that ignores the exit code) refuses with one line
            agent.start()
            assert await agent.child.wait(30) == 4, agent.child.log_tail(30)
            out = restart_refusal(agent)
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, out
            assert f"node {node_id} was decommissioned" in errors[0]
            assert "needs a new enrolment token" in errors[0]
            res = await run_cli("agent", "status", "--data", str(agent.data_dir), "--json")
            assert res.returncode == 0, res.stderr
            assert f"node {node_id} was decommissioned" in json.loads(res.stdout)["problem"]
            assert files(agent.data_dir) == [MARKER]

            # the registry keeps the record; the audit log has the entry
            shown = op.get_node(node_id)
            assert (shown.status, shown.revoked, shown.wipe) == ("decommissioned", True, True)
            assert shown.decommissioned_by is not None
            assert shown.decommissioned_by.startswith("operator:")
            assert [n.status for n in op.list_nodes() if n.id == node_id] == ["decommissioned"]
            entries = [e for e in op.audit(limit=100).entries
                       if e.action == "node.decommission"]
            assert len(entries) == 1 and entries[0].target == f"node:{node_id}"
            assert entries[0].detail["wipe"] is True and entries[0].detail["reason"] == "e2e"
            cfg = ("--config", str(cloud.cli_config))
            res = await run_cli("node", "list", "--json", *cfg)
            assert res.returncode == 0, res.stderr
            listed = {n["id"]: n for n in json.loads(res.stdout)["nodes"]}
            assert (listed[node_id]["status"], listed[node_id]["wipe"]) == ("decommissioned",
                                                                            True)
            for args in (("node", "list"), ("node", "show", node_id)):
                res = await run_cli(*args, *cfg)
                assert res.returncode == 0 and "decommissioned" in res.stdout, res.stdout

            # enrolling again with the old key: refused with the old (used) token and with a
            # new one; the new token is not used up by the refusal
            old_key = pki.load_key(kept / "node.key")
            new_token = await cloud.token({"site": "a2"})
            for token in (old_token, new_token):
                r = await plain.post(f"{cloud.url}/v1/device/enrol", json={
                    "token": token, "csr": pki.make_csr(old_key).decode()})
                assert r.status == 403, (r.status, await r.text())
            # ...and its old session cannot be opened either
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await old.ws_connect(f"{cloud.url}{protocol.SESSION_PATH}")
            assert info.value.status == 403

        # a new token on the same data directory: a new node with a new key
        agent.start(new_token)
        await wait_connected(agent)
        assert agent.node_id not in (None, node_id)
        assert MARKER not in files(agent.data_dir)
        new_key = pki.load_key(agent.data_dir / "identity" / "node.key")
        assert pki.public_key_fingerprint(new_key) != pki.public_key_fingerprint(old_key)
        assert await agent.stop() == 0
        nodes = {n.id: n.status for n in cloud.operator().list_nodes()}
        assert nodes[node_id] == "decommissioned" and len(nodes) == 2


async def test_offline_node_wipes_when_it_returns_and_keep_keeps(tmp_path: Path) -> None:
    async with System(tmp_path) as system:
        cloud = await system.start_cloud()
        text, _ = factory_pipeline(20_000)
        (tmp_path / "p.yaml").write_text(text)
        (b, _), (c, _) = await asyncio.gather(start_agent(system, "b", tmp_path / "p.yaml"),
                                              start_agent(system, "c", tmp_path / "p.yaml"))
        b_id, c_id = b.node_id, c.node_id
        assert b_id and c_id

        # b is offline (stopped) when it is decommissioned; it wipes when it comes back
        assert await b.stop() == 0
        slot = b.data_dir / "releases" / "b"  # a release slot, as the updater keeps them
        (slot / "files").mkdir(parents=True, exist_ok=True)
        (slot / "files" / "p.yaml").write_text(text)
        (slot / "manifest.json").write_text("{}")
        before = files(b.data_dir)
        assert {"identity/node.key", "identity/node.pem", "engine/outbox.db",
                "twin", "releases/b/manifest.json"} <= set(before), before
        await decommission(cloud, b_id, "--wipe")
        assert files(b.data_dir) == before  # nothing happens to a node that is not there
        b.start()
        assert await b.child.wait(60) == 4, b.child.log_tail(30)
        assert files(b.data_dir) == [MARKER]
        assert re.search(r"DECOMMISSIONED: .* wiped identity, engine, twin, uplink, releases, "
                         r"status\.json;", b.log.read_text())

        # c, decommissioned without --wipe on its live session: stops, keeps its files
        await decommission(cloud, c_id)
        assert await c.child.wait(30) == 4, c.child.log_tail(30)
        kept = files(c.data_dir)
        assert MARKER in kept and "identity/node.key" in kept and "engine/outbox.db" in kept
        c.start()
        assert await c.child.wait(30) == 4
        line = [x for x in restart_refusal(c).splitlines() if x.startswith("error:")]
        assert len(line) == 1 and "its keys and data are kept (revoked)" in line[0], line
        assert files(c.data_dir) == kept

        op = cloud.operator()
        assert (op.get_node(b_id).status, op.get_node(b_id).wipe) == ("decommissioned", True)
        assert (op.get_node(c_id).status, op.get_node(c_id).wipe) == ("decommissioned", False)
