"""The wind-farm acceptance: ``edgewise plan`` then ``edgewise plan apply`` against a real
control plane with three agents. The fleet-wide power curve runs only in the cloud (no node
runs or sends it), and its results equal the same computation done offline over every raw
reading: count and max exactly, mean to float rounding.

The planned pipeline reads OPC UA and Modbus servers that do not exist here, so the test
replaces its three sources, by id, with seeded simulators of a few sensors each (a wind farm's
3 h 10 min at 1 Hz, as fast as the engine takes them); stages and sinks stay as planned. All
three nodes run the same pipeline, so they produce the same readings. In the long suite
(EDGEWISE_LONG_TESTS=1); tests/integration/test_plan_apply.py covers the command by default.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import LONG_ONLY
from edgewise.pipeline.spec import parse_pipeline
from edgewise.testbed.system import System, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "workloads" / "wind-farm.yaml"
T0 = 1_764_547_200.0  # on the hour
SECONDS = 3 * 3600 + 600
SCADA = {"id": "scada", "type": "simulator", "placement": "edge", "profile": "custom",
         "seed": 7, "rate_hz": 1.0, "realtime": False, "start": T0, "limit": 6 * SECONDS,
         "groups": [{"prefix": "wtg/power", "count": 3, "base_low": 200, "base_high": 3000,
                     "drift": 400, "noise": 30, "spike_prob": 0.0, "decimals": 1},
                    {"prefix": "wtg/wind", "count": 3, "base_low": 3, "base_high": 14,
                     "drift": 3, "noise": 1.0, "spike_prob": 0.0, "decimals": 1}]}
OTHERS = [
    {"id": "temperatures", "type": "simulator", "placement": "edge", "profile": "custom",
     "seed": 8, "rate_hz": 1.0, "realtime": False, "start": T0, "limit": 2 * 600,
     "groups": [{"prefix": "farm/temperatures", "count": 2, "decimals": 1}]},
    {"id": "tower", "type": "simulator", "placement": "edge", "profile": "custom", "seed": 9,
     "rate_hz": 1.0, "realtime": False, "start": T0, "limit": 2 * 120,
     "groups": [{"prefix": "farm/tower", "count": 2, "decimals": 3}]},
]
PLACEHOLDER = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {name: placeholder}
spec:
  sources: [{id: s, type: simulator, limit: 0}]
  sinks: [{id: l, type: log, inputs: [s]}]
"""


def offline_power_curve(pipeline_text: str, nodes: int) -> dict[float, tuple[int, float, float]]:
    """ten-minute (per sensor: count, mean, max) then fleet-power-curve (per hour: count,
    mean(mean), max(max)) over every raw reading of every node, with numpy."""
    spec = parse_pipeline(pipeline_text, "<edge>")
    comp = next(c for c in spec.sources if c.id == "scada")
    src = comp.cls(comp.id, comp.config, None)
    s, ticks, values = src.signals.readings(0, comp.config.limit)
    ts = np.round(T0 + ticks / comp.config.rate_hz, 6)
    win = np.floor((ts - T0) / 600).astype(int)
    means, maxes, starts = [], [], []
    for sensor in np.unique(s):
        for w in np.unique(win):
            sel = (s == sensor) & (win == w)
            means.append(values[sel].sum() / sel.sum())
            maxes.append(values[sel].max())
            starts.append(T0 + 600 * w)
    means_a, maxes_a, starts_a = np.array(means), np.array(maxes), np.array(starts)
    out = {}
    for h in range(3):  # the hours the cloud can close: a later ten-minute record exists
        sel = (starts_a >= T0 + 3600 * h) & (starts_a < T0 + 3600 * (h + 1))
        m = np.repeat(means_a[sel], nodes)
        out[T0 + 3600 * h] = (int(sel.sum()) * nodes, float(m.sum() / len(m)),
                              float(maxes_a[sel].max()))
    return out


@LONG_ONLY  # about 2 minutes at load 18 on 2 cores: three agents and a control plane
async def test_plan_apply_wind_farm(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    res = await run_cli("plan", str(EXAMPLE), "-o", str(out), "--no-calibrate", timeout=120)
    assert res.returncode in (0, 3), res.stderr
    planned = out / "pipelines" / "farm.yaml"
    doc = yaml.safe_load(planned.read_text())
    ids = [s["id"] for s in doc["spec"]["sources"]]
    assert ids == ["temperatures", "scada", "tower"]
    doc["spec"]["sources"] = [OTHERS[0], SCADA, OTHERS[1]]
    planned.write_text(yaml.safe_dump(doc, sort_keys=False))
    placeholder = tmp_path / "placeholder.yaml"
    placeholder.write_text(PLACEHOLDER)
    async with System(tmp_path / "sys") as system:
        cloud = await system.start_cloud()
        token = await cloud.token({"site": "farm"}, uses=3)
        agents = [await system.add_agent(f"farm-{i}", placeholder, token, proxy=False)
                  for i in range(3)]
        deadline = time.monotonic() + 60
        while len(await asyncio.to_thread(cloud.operator().list_nodes, "site=farm")) < 3:
            assert time.monotonic() < deadline, agents[0].child.log_tail()
            await asyncio.sleep(0.2)
        dry = await run_cli("plan", "apply", str(out), "--cloud", cloud.url, "--data",
                            str(cloud.data_dir), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines() == [
            "edge  wind-farm-farm: nodes site=farm: would set on 3 of 3 node(s)",
            "cloud wind-farm-farm: would create"]
        done = await run_cli("plan", "apply", str(out), "--cloud", cloud.url, "--data",
                             str(cloud.data_dir), "--json")
        assert done.returncode == 0, done.stderr
        changes = json.loads(done.stdout)["changes"]
        assert [(c["part"], c["action"]) for c in changes] == [("edge", "set"),
                                                                ("cloud", "new")]
        again = await run_cli("plan", "apply", str(out), "--cloud", cloud.url, "--data",
                              str(cloud.data_dir))
        assert again.stdout.splitlines() == [
            "edge  wind-farm-farm: nodes site=farm: already as planned",
            "cloud wind-farm-farm: already as planned"]
        op = cloud.operator()
        edge_text = (await asyncio.to_thread(op.get_config, agents[0].node_id)
                     ).desired.pipelines["wind-farm-farm"]
        assert "fleet-power-curve" not in edge_text  # it runs only in the cloud
        deadline = time.monotonic() + 120
        while True:
            got = await asyncio.to_thread(op.data_query, "cloud:wind-farm-farm",
                                          "fleet-power-curve")
            if len(got.records) >= 3:
                break
            assert time.monotonic() < deadline, cloud.child.log_tail(40)
            await asyncio.sleep(0.5)
        want = offline_power_curve(edge_text, 3)
        rows = {r.data["window_start"]: r.data for r in got.records}
        assert sorted(rows) == sorted(want)
        for w, (count, mean, hi) in want.items():
            assert rows[w]["count"] == count
            assert rows[w]["max_max"] == hi
            assert rows[w]["mean_mean"] == pytest.approx(mean, rel=1e-9)
        streams = {(s.node, s.stream) for s in (await asyncio.to_thread(op.data_stats)).streams}
        for a in agents:
            assert (a.node_id, "ten-minute") in streams
            assert (a.node_id, "fleet-power-curve") not in streams
