"""Identity over real TLS: renewal at 2/3 of the lifetime, re-authentication after an expiry
within the grace period, re-enrolment past it, revocation (live and at the upgrade), and the
CLI's exit code and graceful stop (see test_agent_fakecloud.py for the control plane)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from test_agent_fakecloud import FakeCloud, wait_for
from test_agent_session import make_agent

from edgewise.edge.identity import Revoked
from edgewise.errors import ConfigError
from edgewise.security import pki

pytestmark = pytest.mark.timeout(60)


async def enrolled(data: Path, cloud: FakeCloud) -> None:
    """Enrol a node in ``data`` and stop it once its session is up."""
    agent = make_agent(data, cloud, token=cloud.token())
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: "node-1" in cloud.sessions, 10, "the first session")
    finally:
        agent.stop()
        await asyncio.wait_for(task, 10)


def replace_cert(data: Path, cloud: FakeCloud, issued_at: datetime, lifetime: timedelta) -> int:
    """Give the node a certificate for its own key issued at ``issued_at``; its serial."""
    key = pki.load_key(data / "identity" / "node.key")
    issued = cloud.ca.sign_node_csr(pki.make_csr(key), "node-1", lifetime, now=issued_at)
    pki.write_atomic(data / "identity" / "node.pem", issued.pem)
    return issued.serial


def node_cert(data: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((data / "identity" / "node.pem").read_bytes())


async def test_certificate_past_two_thirds_is_renewed_with_the_same_key(tmp_path: Path) -> None:
    data = tmp_path / "node"
    async with FakeCloud(tmp_path) as cloud:
        await enrolled(data, cloud)
        old = replace_cert(data, cloud, datetime.now(UTC) - timedelta(hours=17),
                           timedelta(hours=24))
        agent = make_agent(data, cloud)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: cloud.counts["renew"] == 1, 10, "a renewal")
            await wait_for(lambda: "node-1" in cloud.sessions, 10, "a session")
            await asyncio.sleep(0.3)  # and no second renewal
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        assert cloud.counts["renew"] == 1
        cert = node_cert(data)
        assert cert.serial_number != old
        assert pki.public_key_fingerprint(cert) == cloud.nodes["node-1"].fingerprint
        assert not pki.needs_renewal(cert, datetime.now(UTC))
        assert agent.identity.renewals == 1


async def test_expired_certificate_reauthenticates_within_grace(tmp_path: Path) -> None:
    data = tmp_path / "node"
    async with FakeCloud(tmp_path, grace=timedelta(days=7)) as cloud:
        await enrolled(data, cloud)
        replace_cert(data, cloud, datetime.now(UTC) - timedelta(days=2), timedelta(hours=1))
        agent = make_agent(data, cloud)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: "node-1" in cloud.sessions, 10, "a session after reauth")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        assert cloud.counts["reauth"] == 1 and cloud.counts["enrol"] == 1
        cert = node_cert(data)
        assert cert.not_valid_after_utc > datetime.now(UTC) + timedelta(hours=23)
        assert pki.public_key_fingerprint(cert) == cloud.nodes["node-1"].fingerprint
        assert cloud.nonces == {}  # the nonce was used


async def test_expired_past_grace_needs_a_new_token_pipeline_keeps_running(
    tmp_path: Path,
) -> None:
    from test_agent_session import SIM_PIPELINE

    data = tmp_path / "node"
    pipe = tmp_path / "p.yaml"
    pipe.write_text(SIM_PIPELINE.format(limit=2000))
    async with FakeCloud(tmp_path, grace=timedelta(hours=1)) as cloud:
        await enrolled(data, cloud)
        replace_cert(data, cloud, datetime.now(UTC) - timedelta(days=2), timedelta(hours=1))
        agent = make_agent(data, cloud, pipeline=pipe)
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.uplink is not None and agent.uplink.problem, 10,
                           "the re-enrolment problem")
            await wait_for(lambda: agent.supervisor.state == "finished", 10,
                           "the pipeline to run to its end")
            await asyncio.sleep(0.2)
            st = json.loads((data / "status.json").read_text())
            assert not task.done()  # the agent keeps running
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        assert cloud.counts["reauth"] == 0 and cloud.counts["sessions"] == 1
        assert st["link"]["state"] == "needs re-enrolment"
        assert "enrol it again with a new token" in st["problem"]
        assert "beyond the grace period" in st["problem"]

        # with a new token it enrols again, with a fresh key
        old_fp = pki.public_key_fingerprint(pki.load_key(data / "identity" / "node.key"))
        agent = make_agent(data, cloud, token=cloud.token())
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: "node-2" in cloud.sessions, 10, "a session as node-2")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        assert (data / "identity" / "node_id").read_text().strip() == "node-2"
        new_fp = pki.public_key_fingerprint(pki.load_key(data / "identity" / "node.key"))
        assert new_fp != old_fp == cloud.nodes["node-1"].fingerprint
        assert new_fp == cloud.nodes["node-2"].fingerprint


async def test_revoked_live_stops_the_agent_and_the_upgrade_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "node"
    async with FakeCloud(tmp_path) as cloud:
        agent = make_agent(data, cloud, token=cloud.token())
        task = asyncio.create_task(agent.run())
        await wait_for(lambda: "node-1" in cloud.sessions, 10, "a session")
        cloud.revoke("node-1")
        with pytest.raises(Revoked, match="revoked by an operator"):
            await asyncio.wait_for(task, 10)
        assert json.loads((data / "status.json").read_text())["state"] == "failed"

        # restarted, it is refused at the session upgrade (403) and stops again
        again = make_agent(data, cloud)
        with pytest.raises(Revoked, match=r"revoked by the control plane \(the session "
                           r"upgrade was refused with 403\)"):
            await asyncio.wait_for(again.run(), 10)
        assert cloud.counts["refused_403"] == 1


async def test_revoked_as_the_session_opens_the_agent_still_reads_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane says ``revoked`` and closes before the agent's hello went out (CI:
    the agent's outbox snapshot before the hello took long on a loaded machine); the hello's
    send then fails on the closed socket, and the agent must still read the last word it was
    sent rather than take it for a dropped link (it was then refused at the next upgrade, with
    another reason)."""
    from edgewise.outbox.view import OutboxView

    plain = OutboxView.snapshot

    def slow(self: OutboxView, *args: object, **kwargs: object) -> object:
        import time
        time.sleep(0.5)  # in the uplink's worker thread: the revocation goes first
        return plain(self, *args, **kwargs)

    data = tmp_path / "node"
    async with FakeCloud(tmp_path) as cloud:
        agent = make_agent(data, cloud, token=cloud.token())
        monkeypatch.setattr(OutboxView, "snapshot", slow)
        task = asyncio.create_task(agent.run())
        await wait_for(lambda: "node-1" in cloud.sessions, 10, "a session")
        cloud.revoke("node-1")
        with pytest.raises(Revoked, match="revoked by an operator"):
            await asyncio.wait_for(task, 10)
        assert cloud.counts["refused_403"] == 0  # it did not come back to be refused


async def _cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgewise.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def test_cli_enrols_from_env_token_stops_on_sigterm_and_exits_1_when_revoked(
    tmp_path: Path,
) -> None:
    data = tmp_path / "node"
    async with FakeCloud(tmp_path) as cloud:
        token = cloud.token()
        proc = await _cli("agent", "run", "--cloud", cloud.url, "--ca", str(cloud.ca_path),
                          "--data", str(data), "--backoff-base", "0.05", "--backoff-cap", "0.2",
                          env={"EDGEWISE_ENROL_TOKEN": token})
        try:
            await wait_for(lambda: "node-1" in cloud.sessions, 20, "the CLI agent's session")
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        assert token not in err.decode() and token not in out.decode()
        assert json.loads((data / "status.json").read_text())["state"] == "stopped"

        # `agent status` on the stopped node
        st = await _cli("agent", "status", "--data", str(data), "--json")
        out, err = await asyncio.wait_for(st.communicate(), 15)
        assert st.returncode == 0, err.decode()
        status = json.loads(out)
        assert status["node_id"] == "node-1" and status["running"] is False
        assert status["link"]["state"] == "agent not running"

        # revoked: a clear one-line error and exit code 1; --cloud/--ca remembered
        cloud.revoke("node-1")
        proc = await _cli("agent", "run", "--data", str(data))
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1
        text = " ".join(err.decode().split())
        assert "error: this node has been revoked by the control plane" in text
        assert "Traceback" not in text


async def test_cli_without_token_on_a_fresh_node_is_a_config_error(tmp_path: Path) -> None:
    async with FakeCloud(tmp_path) as cloud:
        proc = await _cli("agent", "run", "--cloud", cloud.url, "--ca", str(cloud.ca_path),
                          "--data", str(tmp_path / "node"))
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert "is not enrolled yet: pass --token" in " ".join(err.decode().split())


async def test_a_refused_enrolment_token_stops_the_agent_without_showing_it(
    tmp_path: Path,
) -> None:
    from edgewise.edge.identity import EnrolmentRefused

    async with FakeCloud(tmp_path) as cloud:
        used = cloud.token()
        cloud.tokens[used] = 0  # already used
        agent = make_agent(tmp_path / "node", cloud, token=used)
        with pytest.raises(EnrolmentRefused) as err:
            await asyncio.wait_for(agent.run(), 10)
    assert str(err.value) == (
        "the control plane refused the enrolment token (401: enrolment token unknown, expired "
        "or used up); ask an operator for a new one (`edgewise cloud token create`)")
    assert used not in str(err.value)
    assert not (tmp_path / "node" / "identity" / "node.pem").exists()


# -- damaged identity files that the flags put right (the table: tests/e2e/test_damaged_files.py)


async def test_damaged_cloud_json_and_ca_are_written_again_from_the_flags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    data = tmp_path / "node"
    ident = data / "identity"
    async with FakeCloud(tmp_path) as cloud:
        await enrolled(data, cloud)
        (ident / "cloud.json").write_bytes(b"")
        (ident / "ca.pem").write_bytes(b"\xc1 garbage")
        (ident / "node_id").write_bytes(b"node-")  # cut short: node.pem names the node
        agent = make_agent(data, cloud)  # --cloud and --ca given
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: cloud.counts["sessions"] == 2, 10, "a session")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
    saved = json.loads((ident / "cloud.json").read_text())
    assert saved == {"cloud": cloud.url, "trust_domain": "test.local"}  # named by node.pem
    assert (ident / "ca.pem").read_bytes() == cloud.ca_path.read_bytes()
    assert (ident / "node_id").read_text() == "node-1\n"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("cloud.json is damaged (empty); writing it again from --cloud" in m
               for m in warned), warned
    assert any("node_id is damaged ('node-'); written again from node.pem" in m
               for m in warned), warned


@pytest.mark.parametrize(("name", "damage"), [("node.key", b""),
                                           ("node.pem", b"-----BEGIN CERTIFICATE-----\n")])
async def test_damaged_key_or_certificate_stops_or_with_a_token_enrols_a_new_node(
    tmp_path: Path, name: str, damage: bytes,
) -> None:
    data = tmp_path / "node"
    ident = data / "identity"
    async with FakeCloud(tmp_path) as cloud:
        await enrolled(data, cloud)
        (ident / name).write_bytes(damage)
        with pytest.raises(ConfigError, match=f"{name} is damaged .*--token NEW"):  # exit 2
            await make_agent(data, cloud).run()
        assert (ident / name).read_bytes() == damage  # the operator's to restore
        agent = make_agent(data, cloud, token=cloud.token())
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: "node-2" in cloud.sessions, 10, "a session as a new node")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 10)
        assert (ident / (name + ".damaged")).read_bytes() == damage
        assert (ident / "node_id").read_text().strip() == "node-2"
        fp = pki.public_key_fingerprint(pki.load_key(ident / "node.key"))
        assert fp == cloud.nodes["node-2"].fingerprint != cloud.nodes["node-1"].fingerprint
