"""The CPU cost model: feature rates from the flow model, the fit, the static table, the
calibration cache, the planner's simulator sources (production batches, event-time order),
turn-taking, and the measurement's segments."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgewise.pipeline.spec import parse_pipeline
from edgewise.plan import flows as F
from edgewise.plan.cost_model import config_of, feature_rates
from edgewise.plan.costs import CACHE_FILE, Calibrator, Costs
from edgewise.plan.model import build_plan
from edgewise.plan.sim_pipeline import state_backlog
from edgewise.plan.sim_runs import segment_costs, segment_rate
from edgewise.plan.site_calibration import Turns, nnls
from edgewise.plan.site_figures import commits_per_s, source_batches
from edgewise.plan.source import PlanSimulator, plan_engine
from edgewise.plan.workload import load_workload, parse_workload

ROOT = Path(__file__).resolve().parents[2]
FACTORY = ROOT / "examples" / "workloads" / "factory-line.yaml"

TINY = """\
apiVersion: edgewise.io/v1
kind: Workload
metadata: {name: tiny}
spec:
  use_case: a handful of temperatures
  sites:
    - name: room
      sources:
        - {id: temps, count: 8, rate_hz: 20}
  stages:
    - {id: avg, operator: window, inputs: [temps], params: {size: 1s}}
    - {id: hot, operator: threshold, inputs: [temps], params: {high: 100.0}}
  requirements: {max_alarm_latency: 100ms, offline_autonomy: 1h}
"""


def _factory_flows() -> tuple[object, dict[str, F.Flow]]:
    wl = load_workload(FACTORY)
    site = wl.sites[0]
    flows = {s.id: F.source_flow(s, site.name) for s in site.sources}
    for st in wl.stages:
        flows[st.id] = F.stage_flow(st, [flows[r] for r in st.inputs])
    return wl, flows


def test_flow_calls_follow_the_batching_of_production() -> None:
    _wl, flows = _factory_flows()
    # MQTT lingers 5 ms: 10,000 readings/s give 50 records, less than one tick of 200 sensors
    assert flows["sensors"].calls == pytest.approx(50.0)
    assert flows["sensors"].batch == pytest.approx(200.0)
    assert flows["windows"].calls == pytest.approx(1.0)  # every window closes in one call
    # 0.1% spikes: a batch of 200 readings holds an alarm with probability 1 - (1 - p)^200
    p = flows["alarms"].rate / 10_000
    assert flows["alarms"].calls == pytest.approx(50 * (1 - (1 - p) ** 200))


def test_window_feature_rates_of_the_factory_line() -> None:
    wl, flows = _factory_flows()
    st = next(s for s in wl.stages if s.id == "windows")
    rates = feature_rates(st, config_of(st), flows["sensors"], flows["windows"])
    # 50 calls of 200 readings, one per sensor: 200 (sensor, window) groups per call
    assert rates == pytest.approx({"call": 50.0, "record": 10_000.0, "group": 10_000.0,
                                   "fire": 1.0, "out": 200.0, "held": 0.0})


def test_nnls_keeps_coefficients_non_negative() -> None:
    x = np.array([[1.0, 10.0, 0.0], [1.0, 20.0, 1.0], [1.0, 30.0, 0.0], [1.0, 40.0, 1.0]])
    y = x @ np.array([5.0, 2.0, 0.0]) - np.array([0.0, 1.0, 0.0, 1.0])  # third would be -1
    coef = nnls(x, y)
    assert (coef >= 0).all()
    assert coef[2] == 0.0
    exact = nnls(x, x @ np.array([5.0, 2.0, 3.0]))
    assert exact == pytest.approx([5.0, 2.0, 3.0])


def test_static_table_gives_the_documented_factory_estimate() -> None:
    plan = build_plan(load_workload(FACTORY))  # no calibration: the static table
    cal = plan.sites[0].estimate.calibration
    assert cal.stage_cpu_us["windows"] == pytest.approx(23_120.0)
    assert cal.method.startswith("CPU coefficients from the planner's static table")
    parts = plan.sites[0].node_cpu
    assert set(parts) == {"ingest", "stages", "engine", "commits", "ticks"}
    # MQTT: 5.5 us per message and 26 us per batch handed over (50 a second: 200 readings)
    assert parts["ingest"] == pytest.approx((10_000 * 5.5 + 50 * 26.0) / 1e6)


def test_commits_are_at_most_one_per_interval() -> None:
    assert commits_per_s(4.0) == 4.0
    assert commits_per_s(50.0) == 50.0
    # 200 batches/s: a commit starts with the first batch 20 ms after the last one
    assert commits_per_s(200.0) == pytest.approx(1 / (0.02 + 0.0025))
    wl = load_workload(ROOT / "examples" / "workloads" / "wind-farm.yaml")
    assert source_batches(wl.sites[0]) == pytest.approx(1 + 1 + 25)


def test_state_backlog_only_for_windows_that_keep_values() -> None:
    retail = build_plan(load_workload(ROOT / "examples" / "workloads" / "retail.yaml"))
    factory = build_plan(load_workload(FACTORY))
    assert state_backlog(retail.sites[0]) == 300.0  # dwell-stats: 5 min of p50/p95 values
    assert state_backlog(factory.sites[0]) == 0.0


def test_segments_file_calls_by_event_time_and_drop_the_warm_up() -> None:
    calls = [(0.5, 1.0), (1.5, 0.002), (1.9, 0.002), (2.0, 0.003), (3.5, 0.004), (9.0, 1.0)]
    costs = segment_costs(calls, 0.0, 1.0, 4)
    assert costs == pytest.approx([1.0, 0.004, 0.003, 0.004])
    rate, spread = segment_rate(costs, 1.0)
    assert rate == pytest.approx((4000 + 3000 + 4000) / 3)
    assert spread == pytest.approx(1000 / rate)


def test_calibration_is_cached_and_a_bad_cache_is_ignored(tmp_path: Path) -> None:
    wl = parse_workload(TINY, "tiny.yaml")
    first = Calibrator(tmp_path)
    plan = build_plan(wl, first)
    assert first.cached == 0 and first.seconds > 0
    costs = plan.sites[0].stage_costs
    assert {c.source for c in costs.values()} == {"calibrated"}
    assert costs["avg"].coef["record"] + costs["avg"].coef["group"] > 0
    again = Calibrator(tmp_path)
    plan2 = build_plan(wl, again)
    assert again.seconds == 0.0 and again.cached >= 2
    assert plan2.sites[0].estimate.calibration.stage_cpu_us == \
        plan.sites[0].estimate.calibration.stage_cpu_us
    # another machine (or other code) does not reuse it; a damaged file is recalibrated
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    data["machine"]["cpu"] = "another CPU"
    (tmp_path / CACHE_FILE).write_text(json.dumps(data))
    assert Calibrator(tmp_path)._entries == {}
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert Calibrator(tmp_path)._entries == {}


def test_static_costs_need_no_calibration(tmp_path: Path) -> None:
    costs = Costs()
    plan = build_plan(parse_workload(TINY, "tiny.yaml"), costs)
    assert {c.source for c in plan.sites[0].stage_costs.values()} == {"static"}
    assert costs.seconds == 0.0


def _two_sources(realtime: bool) -> dict:
    return {"apiVersion": "edgewise.io/v1", "kind": "Pipeline", "metadata": {"name": "two"},
            "spec": {"sources": [
                {"id": "slow", "type": "simulator", "profile": "custom", "rate_hz": 1.0,
                 "realtime": realtime, "start": 1_764_547_200.0, "batch": 4, "limit": 40,
                 "groups": [{"prefix": "s", "count": 4}]},
                {"id": "fast", "type": "simulator", "profile": "custom", "rate_hz": 25.0,
                 "realtime": realtime, "start": 1_764_547_200.0, "batch": 2, "limit": 500,
                 "groups": [{"prefix": "f", "count": 2}]}]}}


def test_fast_forward_sources_take_turns_in_event_time_order(tmp_path: Path) -> None:
    spec = parse_pipeline(yaml.safe_dump(_two_sources(False)), "<two>")
    seen: list[tuple[str, float]] = []

    def routed(node: str, port: str, batch) -> None:  # type: ignore[no-untyped-def]
        if node in engine.sources:
            seen.append((node, float(batch.columns["ts"][0])))

    engine, srcs = plan_engine(spec, tmp_path, observer=routed)
    assert all(isinstance(s, PlanSimulator) and s.lockstep is not None for s in srcs.values())
    summary = asyncio.run(engine.run())
    assert summary["readings_in"] == 540
    times = [t for _, t in seen]
    assert times == sorted(times)
    # 10 ticks of the 1 Hz source, 250 of the 25 Hz one, interleaved as in real time: the
    # second tick of the slow one comes after the first 25 of the fast one (ties either way)
    slow = [i for i, (n, _) in enumerate(seen) if n == "slow"]
    assert len(slow) == 10 and slow[0] in (0, 1) and slow[1] in (26, 27)
    assert sum(s.generation_s for s in srcs.values()) > 0


def test_realtime_source_hands_over_production_batches_and_a_backlog(tmp_path: Path) -> None:
    doc = _two_sources(True)
    doc["spec"]["sources"] = doc["spec"]["sources"][1:]
    doc["spec"]["sources"][0].update(limit=None, batch=10, start="now")
    spec = parse_pipeline(yaml.safe_dump(doc), "<rt>")
    sizes: list[int] = []

    def routed(node: str, port: str, batch) -> None:  # type: ignore[no-untyped-def]
        if node in engine.sources:
            sizes.append(batch.n)

    engine, srcs = plan_engine(spec, tmp_path, duration=0.3, observer=routed)
    srcs["fast"].backlog_s = 4.0  # 4 s of 50 readings/s at once, then 10 every 0.2 s
    t0 = time.perf_counter()
    asyncio.run(engine.run())
    assert time.perf_counter() - t0 < 2.0
    assert srcs["fast"].caught_up
    assert set(sizes) == {10}
    assert 20 <= len(sizes) <= 23  # 20 of the backlog, one or two in 0.3 s


def test_turns_alternate_and_stop() -> None:
    turns = Turns(slice_s=0.002)
    log: list[str] = []

    def calibration() -> None:
        try:
            turns.wait_turn()
            for _ in range(10_000):
                log.append("c")
                t0 = time.thread_time()
                while time.thread_time() - t0 < 0.001:
                    pass
                turns.maybe_yield()
                if turns.stopping:
                    break
        finally:
            turns.done()

    worker = threading.Thread(target=calibration)
    worker.start()
    for _ in range(3):
        turns.give()
        log.append("m")
    turns.stop()
    worker.join(timeout=5)
    assert not worker.is_alive() and turns.finished
    runs = "".join(log).split("m")
    # three turns of the calibration (each two or three slices of 1 ms); stopped at once then
    assert len(runs) == 4 and all(2 <= len(r) <= 4 for r in runs[:3])
    assert runs[3] == ""
    turns.give()  # after it finished: returns at once
