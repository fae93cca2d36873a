"""kill -9 of a real ``edgewise cloud serve`` while a cloud pipeline runs: every fleet-wide
window is stored exactly once and equals the computation done offline over every reading.

Readings of three nodes go straight into the control plane's store (another process writing
the same SQLite file, as ingest would), a few chunks at a time, while the pipeline runs in the
server; the server is killed with SIGKILL at moments spread over the run and started again.
Two kills by default; ten in the long suite (EDGEWISE_LONG_TESTS=1).
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import LONG_ONLY
from edgewise.cloud.pipelines.models import CloudPipelineSet, CloudPipelineSetResponse
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store, database_url
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec
from edgewise.testbed.system import ChildProcess, System

T0 = 1_764_547_200.0
NODES = ("node-a", "node-b", "node-c")
PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {name: fleet}
spec:
  sources:
    - {id: ten, type: stream, stream: ten, nodes: {site: farm}, max_wait: 60s, poll: 0.05}
  stages:
    - {id: total, type: window, inputs: [ten], size: 2s, key_by: [], idle_timeout: 100000s,
       aggregates: [count, sum, min, max]}
  sinks:
    - {id: total-store, type: outbox, inputs: [total], stream: total}
  outbox: {commit_interval: 0.01}
"""


def readings(node: int, second: int) -> dict[str, np.ndarray]:
    """Ten readings of one node in event-time second ``second``."""
    ts = T0 + second + np.arange(10) / 10
    rng = np.random.default_rng(node * 100_000 + second)
    return {"sensor": np.array([f"n{node}"] * 10, dtype=object), "ts": ts,
            "value": np.round(rng.uniform(0, 100, 10), 2)}


def offline(sent: list[dict[str, np.ndarray]], size: float, up_to: float
            ) -> dict[float, tuple[int, float, float, float]]:
    ts = np.concatenate([c["ts"] for c in sent])
    v = np.concatenate([c["value"] for c in sent])
    out = {}
    for w in np.unique(np.floor((ts - T0) / size) * size + T0):
        if w + size > up_to:
            continue
        sel = (ts >= w) & (ts < w + size)
        out[float(w)] = (int(sel.sum()), float(v[sel].sum()), float(v[sel].min()),
                         float(v[sel].max()))
    return out


async def results(store: Store) -> dict[str, np.ndarray]:
    parts = [codec.decode(c.payload)
             for c in await store.read_chunks("cloud:fleet", "total", limit=1_000_000)]
    if not parts:
        return {"window_start": np.empty(0)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


async def kills_during_a_cloud_pipeline(tmp_path: Path, kills: int, seconds: int) -> None:
    async with System(tmp_path) as system:
        cloud = await system.start_cloud()
        url = database_url(None, cloud.data_dir)
        ca = CertificateAuthority.create(tmp_path / "test-ca")
        async with Store(url) as store:
            for n in NODES:
                _p, tok = EnrolmentToken.issue({"site": "farm"}, timedelta(hours=1), 1)
                await store.add_enrolment_token(tok)
                key = ec.generate_private_key(ec.SECP256R1())
                await store.enrol_node(tok.hash, n, ca.sign_node_csr(make_csr(key), n))
            res = await asyncio.to_thread(
                cloud.operator().call, "PUT", "/v1/cloud/pipelines/fleet",
                CloudPipelineSetResponse, body=CloudPipelineSet(text=PIPELINE))
            assert res.version == 1
            sent: list[dict[str, np.ndarray]] = []
            seqs = dict.fromkeys(NODES, 0)
            rnd = random.Random(7)
            kill_at = sorted(rnd.sample(range(3, seconds - 2), kills))
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
                if second in kill_at:
                    # kill while the pipeline works on this second's readings, once it has
                    # caught up with all but the last window closable before them
                    closable = len(offline(sent[:-len(NODES)], 2.0, T0 + second - 0.1))
                    deadline = time.monotonic() + 60
                    while len((await results(store))["window_start"]) < closable - 1:
                        assert time.monotonic() < deadline, cloud.child.log_tail()
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(rnd.uniform(0, 0.3))
                    cloud.child.kill()
                    assert await cloud.child.wait(30) is not None
                    cloud.close()
                    cloud.child = ChildProcess("cloud", cloud.child.argv, cloud.child.log)
                    await cloud.start()
            want = offline(sent, 2.0, T0 + seconds - 0.1)
            deadline = time.monotonic() + 60
            while len((await results(store))["window_start"]) < len(want):
                assert time.monotonic() < deadline, cloud.child.log_tail()
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # anything repeated would be stored by now
            got = await results(store)
            starts = got["window_start"].tolist()
            assert sorted(starts) == sorted(want)  # each window once: none lost, none twice
            for j, w in enumerate(starts):
                c, s, lo, hi = want[w]
                assert (int(got["count"][j]), got["min"][j], got["max"][j]) == (c, lo, hi)
                assert got["sum"][j] == pytest.approx(s, rel=1e-12)
            assert "Traceback" not in cloud.child.log.read_text()


async def test_kill_9_during_a_cloud_pipeline_each_result_once(tmp_path: Path) -> None:
    await kills_during_a_cloud_pipeline(tmp_path, kills=2, seconds=10)


@LONG_ONLY
async def test_kill_9_during_a_cloud_pipeline_ten_trials(tmp_path: Path) -> None:
    await kills_during_a_cloud_pipeline(tmp_path, kills=10, seconds=40)
