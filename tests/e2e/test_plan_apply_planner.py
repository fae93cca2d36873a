"""`edgewise plan apply` against a real control plane (``edgewise cloud serve``), without
agents: three nodes enrolled through its store with the site label, the wind-farm plan
applied (dry run, apply, apply again), the edge part in each node's desired state, the cloud
part running in the control plane; ten-minute records written into the store for the three
nodes come out of the fleet-wide power curve as computed offline. In the long suite
(EDGEWISE_LONG_TESTS=1), like test_wind_farm_apply.py (the same with three real agents);
tests/integration/test_plan_apply.py covers the command by default.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import LONG_ONLY
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store, database_url
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec
from edgewise.testbed.system import System, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "workloads" / "wind-farm.yaml"
T0 = 1_764_547_200.0
NODES = ("farm-a", "farm-b", "farm-c")


def ten_minute(node: int) -> dict[str, np.ndarray]:
    """Two sensors' ten-minute records over 2 h 10 min, as the edge's window writes them."""
    starts = T0 + 600 * np.arange(13)
    rng = np.random.default_rng(node)
    n = len(starts)
    return {"sensor": np.array(["wtg/power/000"] * n + ["wtg/wind/000"] * n, dtype=object),
            "ts": np.concatenate([starts, starts]),
            "window_start": np.concatenate([starts, starts]),
            "window_end": np.concatenate([starts, starts]) + 600,
            "count": np.full(2 * n, 600), "mean": np.round(rng.uniform(0, 3000, 2 * n), 3),
            "min": np.zeros(2 * n), "max": np.round(rng.uniform(3000, 4000, 2 * n), 1),
            "stddev": np.ones(2 * n)}


@LONG_ONLY  # the planner and four CLI processes: 80 s at load 13 on 2 cores
async def test_plan_apply_installs_both_parts(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    res = await run_cli("plan", str(EXAMPLE), "-o", str(out), "--no-calibrate", timeout=120)
    assert res.returncode in (0, 3), res.stderr  # 3: the plan names an unmet constraint
    async with System(tmp_path / "sys") as system:
        cloud = await system.start_cloud()
        ca = CertificateAuthority.create(tmp_path / "test-ca")
        async with Store(database_url(None, cloud.data_dir)) as store:
            for n in NODES:
                _p, tok = EnrolmentToken.issue({"site": "farm"}, timedelta(hours=1), 1)
                await store.add_enrolment_token(tok)
                key = ec.generate_private_key(ec.SECP256R1())
                await store.enrol_node(tok.hash, n, ca.sign_node_csr(make_csr(key), n))
            args = ("plan", "apply", str(out), "--cloud", cloud.url, "--data",
                    str(cloud.data_dir))
            dry = await run_cli(*args, "--dry-run")
            assert dry.returncode == 0, dry.stderr
            assert dry.stdout.splitlines() == [
                "edge  wind-farm-farm: nodes site=farm: would set on 3 of 3 node(s)",
                "cloud wind-farm-farm: would create"]
            assert await store.list_cloud_pipelines() == []
            done = await run_cli(*args, "--json")
            assert done.returncode == 0, done.stderr
            assert [(c["part"], c["action"]) for c in json.loads(done.stdout)["changes"]] == [
                ("edge", "set"), ("cloud", "new")]
            again = await run_cli(*args)
            assert again.stdout.splitlines() == [
                "edge  wind-farm-farm: nodes site=farm: already as planned",
                "cloud wind-farm-farm: already as planned"]
            for n in NODES:
                desired = await store.get_desired_state(n)
                assert desired is not None and desired.version == 1
                edge = desired.pipelines["wind-farm-farm"]
                assert "ten-minute" in edge and "fleet-power-curve" not in edge
            cloud_text = (await store.get_cloud_pipeline("wind-farm-farm")).text
            assert "type: stream" in cloud_text and "opcua" not in cloud_text
            now = datetime.now(UTC)
            sent = []
            for i, n in enumerate(NODES):
                cols = ten_minute(i)
                sent.append(cols)
                k = len(cols["ts"])
                await store.commit_ingest(
                    [ChunkWrite(n, "ten-minute", 0, k, k, False, codec.encode(cols), now)], (),
                    [MarkWrite(n, "ten-minute", k, now)])
            deadline = time.monotonic() + 60
            while True:
                chunks = await store.read_chunks("cloud:wind-farm-farm", "fleet-power-curve")
                got = [codec.decode(c.payload) for c in chunks]
                if sum(len(g["ts"]) for g in got) >= 2:
                    break
                assert time.monotonic() < deadline, cloud.child.log_tail(30)
                await asyncio.sleep(0.2)
    rows = {float(w): (int(c), m, x) for g in got for w, c, m, x in zip(
        g["window_start"], g["count"], g["mean_mean"], g["max_max"], strict=True)}
    ts = np.concatenate([s["ts"] for s in sent])
    mean = np.concatenate([s["mean"] for s in sent])
    mx = np.concatenate([s["max"] for s in sent])
    assert sorted(rows) == [T0, T0 + 3600]  # the third hour has no later record to close it
    for h in (0, 1):
        sel = (ts >= T0 + 3600 * h) & (ts < T0 + 3600 * (h + 1))
        count, m, x = rows[T0 + 3600 * h]
        assert (count, x) == (int(sel.sum()), float(mx[sel].max()))
        assert m == pytest.approx(float(mean[sel].mean()), rel=1e-12)
