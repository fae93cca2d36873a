"""Two real control-plane processes on one PostgreSQL database: a cloud pipeline runs on exactly
one of them; kill -9 of that one and the other takes it over when the lease expires, and every
fleet-wide window is stored exactly once, equal to the computation done offline.

Readings of three nodes go straight into the shared store (as ingest would), a second of event
time at a time. The replica that runs the pipeline (the lease's ``runner``) is killed with
SIGKILL while results flow; the other must take over (a new term) and the results must stay
exact. In the long suite (EDGEWISE_LONG_TESTS=1) the killed replica is started again and the
new runner killed in turn, three times.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_cloud_pipeline_crash import NODES, PIPELINE, T0, offline, readings, results

from conftest import LONG_ONLY
from edgewise.cloud.pipelines.models import CloudPipelineDetail
from edgewise.cloud.pipelines.worker import REPLICA_FILE
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec
from edgewise.testbed.system import ChildProcess, ControlPlane, free_port

LEASE = 3.0  # s: --limit pipeline_lease


def replica(tmp_path: Path, name: str, db: str) -> ControlPlane:
    logs = tmp_path / f"logs-{name}"
    logs.mkdir(parents=True, exist_ok=True)
    return ControlPlane(tmp_path / name, free_port(), logs,
                        ("--db", db, "--limit", f"pipeline_lease={LEASE:g}"))


def runner_name(cp: ControlPlane) -> str:
    return (cp.data_dir / REPLICA_FILE).read_text().strip()


async def holder(store: Store, replicas: list[ControlPlane]) -> tuple[ControlPlane, int]:
    """The replica whose name the lease holds now, and the lease's term."""
    r = await store.pipeline_runner("fleet")
    assert r is not None and r.runner is not None
    (cp,) = [c for c in replicas if r.runner.endswith("/" + runner_name(c))]
    return cp, r.term


async def restart(cp: ControlPlane) -> None:
    cp.close()
    cp.child = ChildProcess("cloud", cp.child.argv, cp.child.log)
    await cp.start()


async def two_replicas_take_over(tmp_path: Path, db: str, kills: int, seconds: int) -> None:
    a, b = replica(tmp_path, "a", db), replica(tmp_path, "b", db)
    replicas = [a, b]
    try:
        await a.start()
        shutil.copytree(a.data_dir / "pki", b.data_dir / "pki")  # one PKI for the fleet
        shutil.copy2(a.cli_config, b.cli_config)  # the admin token is in the shared store
        await b.start()
        ca = CertificateAuthority.create(tmp_path / "test-ca")
        async with Store(db) as store:
            for n in NODES:
                _p, tok = EnrolmentToken.issue({"site": "farm"}, timedelta(hours=1), 1)
                await store.add_enrolment_token(tok)
                key = ec.generate_private_key(ec.SECP256R1())
                await store.enrol_node(tok.hash, n, ca.sign_node_csr(make_csr(key), n))
            await store.put_cloud_pipeline("fleet", PIPELINE, actor="test")
            sent = []
            seqs = dict.fromkeys(NODES, 0)
            kill_at = [round(seconds * (i + 1) / (kills + 1)) for i in range(kills)]
            terms = []
            for second in range(seconds):
                now = datetime.now(UTC)
                writes, marks = [], []
                for i, n in enumerate(NODES):
                    cols = readings(i, second)
                    sent.append(cols)
                    writes.append(ChunkWrite(n, "ten", seqs[n], 10, 10, False,
                                             codec.encode(cols), now))
                    seqs[n] += 10
                    marks.append(MarkWrite(n, "ten", seqs[n], now))
                await store.commit_ingest(writes, (), marks)
                if second not in kill_at:
                    continue
                # wait until the runner has caught up with all but the last closable window
                closable = len(offline(sent[:-len(NODES)], 2.0, T0 + second - 0.1))
                deadline = time.monotonic() + 60
                while len((await results(store))["window_start"]) < closable - 1:
                    assert time.monotonic() < deadline, a.child.log_tail() + b.child.log_tail()
                    await asyncio.sleep(0.02)
                victim, term = await holder(store, replicas)
                (other,) = [c for c in replicas if c is not victim]
                victim.child.kill()
                assert await victim.child.wait(30) is not None
                terms.append(term)
                deadline = time.monotonic() + LEASE + 30
                while True:  # the other replica takes over once the lease has expired
                    now_holder, now_term = await holder(store, replicas)
                    if now_holder is other:
                        assert now_term > term
                        break
                    assert time.monotonic() < deadline, other.child.log_tail()
                    await asyncio.sleep(0.1)
                await restart(victim)  # back as the standby
                # each replica answers for the pipeline: only the runner runs it
                for cp in replicas:
                    show = await asyncio.to_thread(cp.operator().call, "GET",
                                                   "/v1/cloud/pipelines/fleet",
                                                   CloudPipelineDetail)
                    assert show.runner is not None and show.runner.endswith(
                        "/" + runner_name(other))
                    assert show.state == ("running" if cp is other else "unknown")
            want = offline(sent, 2.0, T0 + seconds - 0.1)
            deadline = time.monotonic() + 60
            while len((await results(store))["window_start"]) < len(want):
                assert time.monotonic() < deadline, a.child.log_tail() + b.child.log_tail()
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # anything repeated would be stored by now
            got = await results(store)
            starts = got["window_start"].tolist()
            assert sorted(starts) == sorted(want)  # each window once: none lost, none twice
            for j, w in enumerate(starts):
                c, s, lo, hi = want[w]
                assert (int(got["count"][j]), got["min"][j], got["max"][j]) == (c, lo, hi)
                assert got["sum"][j] == pytest.approx(s, rel=1e-12)
            assert len(terms) == kills
            for cp in replicas:
                assert "Traceback" not in cp.child.log.read_text()
    finally:
        for cp in replicas:
            cp.close()
            cp.child.kill()


async def test_kill_9_of_the_runner_the_other_replica_takes_over(
        tmp_path: Path, postgres: str) -> None:
    await two_replicas_take_over(tmp_path, postgres, kills=1, seconds=10)


@LONG_ONLY
async def test_kill_9_of_the_runner_three_takeovers(tmp_path: Path, postgres: str) -> None:
    await two_replicas_take_over(tmp_path, postgres, kills=3, seconds=24)
