"""A TPM node with the real processes: ``edgewise cloud serve --allow-agent-digest`` and
``edgewise agent run --tpm swtpm:...``: the agent enrols through its TPM, measures its launch,
attests, and its outbox key is sealed to the TPM. Long suite: with the control plane's policy
changed (its agent no longer allowed) the restarted agent is quarantined with the reason and
what it sends from then on is stored flagged; with PCRs 0-7 extended before the agent starts and
a golden firmware set on the control plane, the agent attests its firmware PCRs
(tests/integration/test_tpm_quarantine.py and test_tpm_firmware.py cover these in the default
suite)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import swtpm
from conftest import LONG_ONLY
from edgewise.cloud.store import Store
from edgewise.security.tpm.measure import agent_code_digest
from edgewise.sync import codec
from edgewise.testbed.system import AgentProcess, ChildProcess, System, factory_pipeline

pytestmark = pytest.mark.asyncio
swtpm_factory = swtpm.swtpm_factory  # fixture


async def verdict_of(db: Path, node_id: str, seen: dict[str, Any] | None,
                     agent: AgentProcess, timeout: float = 90) -> dict[str, Any]:
    """The node's newest attestation verdict in the control plane's store, once it differs
    from ``seen``."""
    deadline = time.monotonic() + timeout
    async with Store(f"sqlite+aiosqlite:///{db}") as store:
        while True:
            record = await store.tpm_of(node_id)
            if record is not None and record.verdict is not None and record.verdict != seen:
                return record.verdict
            assert time.monotonic() < deadline and agent.running, \
                agent.child and agent.child.log_tail()
            await asyncio.sleep(0.2)


async def _tpm_agent(system: System, tmp_path: Path, tcti: str, digest: str,
                     cloud_args: tuple[str, ...] = ()
                     ) -> tuple[AgentProcess, str, Path, dict[str, Any]]:
    """A control plane allowing ``digest`` and a TPM agent it attested: (agent, node id,
    database, first verdict)."""
    text, _ = factory_pipeline(None)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(text)
    cloud = await system.start_cloud(extra_args=["--allow-agent-digest", digest, *cloud_args])
    token = await cloud.token({"site": "tpm"})
    agent = await system.add_agent("n1", pipeline, token, proxy=False,
                                   extra_args=["--tpm", tcti])
    deadline = time.monotonic() + 90
    while agent.node_id is None:
        assert time.monotonic() < deadline and agent.running, agent.child.log_tail()
        await asyncio.sleep(0.1)
    node_id = agent.node_id
    db = cloud.data_dir / "edgewise.db"
    return agent, node_id, db, await verdict_of(db, node_id, None, agent)


async def test_tpm_agent_enrols_and_attests(
    swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    digest = agent_code_digest()
    async with System(tmp_path) as system:
        agent, node_id, db, first = await _tpm_agent(system, tmp_path, swtpm_factory("node"),
                                                     digest)
        assert (first["attestation"], first["quarantined"], first["measurements"]) == \
            ("tpm", False, {"agent": digest}), first
        ident = agent.data_dir / "identity"
        for name in ("node.tpmkey", "ak.tpmkey", "outbox.key.tpm", "measurements.log"):
            assert (ident / name).exists(), name
        assert (ident / "node.tpmkey").read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY")
        # the outbox is encrypted at rest; what reaches the control plane decodes
        deadline = time.monotonic() + 90
        async with Store(f"sqlite+aiosqlite:///{db}") as store:
            while not (chunks := await store.read_chunks(node_id, "aggregates", limit=1)):
                assert time.monotonic() < deadline and agent.running, agent.child.log_tail()
                await asyncio.sleep(0.2)
        assert codec.decode(chunks[0].payload)["count"].size > 0


@LONG_ONLY
async def test_tpm_agent_quarantined_when_its_agent_is_no_longer_allowed(
    swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    digest = agent_code_digest()
    async with System(tmp_path) as system:
        agent, node_id, db, first = await _tpm_agent(system, tmp_path, swtpm_factory("node"),
                                                     digest)
        assert not first["quarantined"], first
        # the operator no longer allows this agent: restart both, the node is quarantined
        cloud = system.cloud
        assert cloud is not None
        await cloud.stop()
        argv = [a for a in cloud.child.argv if a not in ("--allow-agent-digest", digest)]
        cloud.child = ChildProcess("cloud", argv, cloud.child.log)
        await cloud.start()
        await agent.stop()
        agent.start()
        second = await verdict_of(db, node_id, first, agent)
        assert (second["quarantined"], second["reason"]) == (
            True, "measurement: agent code not in the allowed set"), second
        assert digest not in str(second)
        async with Store(f"sqlite+aiosqlite:///{db}") as store:
            node = await store.get_node(node_id)
            assert (await store.fleet_rows([node]))[0].quarantine == second["reason"]
            # what it sends from now on is acknowledged but stored apart, flagged
            deadline = time.monotonic() + 90
            while not [c for c in await store.read_chunks(
                    node_id, "aggregates", limit=100_000, include_quarantined=True)
                    if c.quarantined]:
                assert time.monotonic() < deadline and agent.running, agent.child.log_tail()
                await asyncio.sleep(0.2)
            assert all(not c.quarantined for c in await store.read_chunks(
                node_id, "aggregates", limit=100_000))


@LONG_ONLY
async def test_tpm_agent_with_golden_firmware_attests_its_firmware_pcrs(
    swtpm_factory: Callable[[str], str], tmp_path: Path,
) -> None:
    """PCRs 0-7 extended before the agent starts (simulated measured boot), the control plane
    started with --firmware-pcrs 0-7 and a golden set of those values: the agent attests."""
    import hashlib
    import json

    from edgewise.security.tpm import Tpm

    tcti = swtpm_factory("node")
    golden = {}
    with Tpm(tcti) as tpm:
        for p in range(8):
            tpm.extend(p, hashlib.sha256(f"firmware {p}".encode()).digest())
        golden = {str(p): v.hex() for p, v in tpm.read_pcrs(list(range(8))).items()}
    sets = tmp_path / "golden.json"
    sets.write_text(json.dumps([golden]))
    digest = agent_code_digest()
    async with System(tmp_path) as system:
        _agent, _node_id, _db, first = await _tpm_agent(
            system, tmp_path, tcti, digest,
            ("--firmware-pcrs", "0-7", "--golden-firmware", str(sets)))
    assert (first["quarantined"], first["measurements"]) == (
        False, {"agent": digest, **{f"pcr{p}": v for p, v in golden.items()}}), first
