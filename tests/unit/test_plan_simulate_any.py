"""`--simulate` for any workload (issue 14): user functions run in the engine, multi-field
records simulated, slow sources, dead paths as findings, the calibrated MQTT decoding and
user-function costs."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgewise.plan.costs import Calibrator, Costs
from edgewise.plan.encoding import wire_overhead
from edgewise.plan.ingest_calibration import calibrate_mqtt
from edgewise.plan.model import build_plan
from edgewise.plan.sim_pipeline import SEED, START_TS, edge_pipeline
from edgewise.plan.sim_runs import run_engine
from edgewise.plan.simulate import _raw_wire, dead_paths
from edgewise.plan.workload import load_workload, parse_workload
from edgewise.sim.signals import SignalGroup, SignalSet
from edgewise.sync import codec

FUNCTION = '''
import numpy as np
from edgewise.pipeline.batch import Batch


class EveryTenth:
    """Keeps every tenth record of each batch and its field ``b``."""

    def __init__(self, options):
        self.field = options.get("field", "b")

    def process(self, batch):
        rows = np.arange(0, batch.n, 10)
        return Batch({"sensor": batch.columns["sensor"][rows], "ts": batch.columns["ts"][rows],
                      "value": batch.columns[self.field][rows]}, len(rows))
'''

WORKLOAD = """\
apiVersion: edgewise.io/v1
kind: Workload
metadata: {name: anyfn}
spec:
  use_case: a user function on a multi-field source
  code: {path: functions}
  sites:
    - name: yard
      sources:
        - id: ab
          count: 4
          rate_hz: 10
          fields:
            - {name: a, signal: {low: 0, high: 1, spike_prob: 0}}
            - {name: b, resolution: 1, signal: {low: 500, high: 600, spike_prob: 0}}
  stages:
    - {id: tenth, function: "anyfn_mod:EveryTenth", inputs: [ab], params: {field: b},
       cpu_us_per_record: 1, reduction: 0.1, output_bytes_per_record: 10}
  requirements: {max_alarm_latency: 5s, offline_autonomy: 1h}
"""


@pytest.fixture(scope="module")
def cache(plan_cache: Path) -> Path:
    """The session's calibration cache: the engine and MQTT are calibrated once."""
    return plan_cache


@pytest.fixture
def fn_workload(tmp_path: Path):
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "anyfn_mod.py").write_text(FUNCTION)
    (tmp_path / "w.yaml").write_text(WORKLOAD)
    sys.path.insert(0, str(tmp_path / "functions"))
    try:
        yield load_workload(tmp_path / "w.yaml")
    finally:
        sys.path.remove(str(tmp_path / "functions"))
        sys.modules.pop("anyfn_mod", None)


def test_user_function_runs_in_the_engine_on_multi_field_records(fn_workload, tmp_path):
    plan = build_plan(fn_workload, Costs())
    sp = plan.sites[0]
    assert sp.where("tenth") == "edge"
    doc = edge_pipeline(sp, 1.0, realtime=False, limit_s=10.0, probe=False, sync="normal",
                        big_batches=True)
    assert doc["spec"]["stages"] == [{"id": "tenth", "type": "python",
                                      "class": "anyfn_mod:EveryTenth", "inputs": ["ab"],
                                      "options": {"field": "b"}}]
    engine, summary = run_engine(doc, tmp_path / "run")
    # 4 sensors x 10 Hz x 10 s in batches of 40 (one second): 4 of every 40 kept
    assert summary["readings_in"] == 400
    assert engine.counters.out["tenth"] == 40
    from edgewise.outbox import Outbox, outbox_file

    with Outbox(outbox_file(tmp_path / "run")) as ob:
        cols = ob.read_stream("tenth")
    # field b, simulated with its own signal: whole numbers around 500-600, not field a's
    assert len(cols["value"]) == 40
    assert np.all((cols["value"] > 450) & (cols["value"] < 650))
    assert np.all(cols["value"] == np.round(cols["value"]))


def test_user_function_is_calibrated_among_the_stages(fn_workload, cache):
    costs = Calibrator(cache)
    plan = build_plan(fn_workload, costs)
    cost = plan.sites[0].stage_costs["tenth"]
    assert cost.source == "calibrated" and cost.operator == "function"
    assert set(cost.coef) == {"call", "record"}
    assert cost.calls >= 3


def test_a_function_that_cannot_be_imported_keeps_its_declared_cost(tmp_path, cache):
    (tmp_path / "functions").mkdir()
    (tmp_path / "w.yaml").write_text(WORKLOAD.replace("anyfn_mod:", "absent_mod:"))
    wl = load_workload(tmp_path / "w.yaml")
    plan = build_plan(wl, Calibrator(cache))
    cost = plan.sites[0].stage_costs["tenth"]
    assert cost.source == "declared"
    # 1 us per record and the calibrated hand-over per call
    assert cost.coef["record"] == 1.0 and cost.coef["call"] > 0


SLOW = """\
apiVersion: edgewise.io/v1
kind: Workload
metadata: {name: slow}
spec:
  use_case: tank levels every ten seconds
  sites:
    - name: tank
      link: {batch_interval: 1s}
      sources: [{id: level, count: 20, rate_hz: 0.1, protocol: modbus, alarm: {high: 95}}]
  requirements: {max_alarm_latency: 30s, offline_autonomy: 24h}
"""


def test_slow_source_raw_wire_is_one_chunk_per_reading_tick() -> None:
    sp = build_plan(parse_workload(SLOW), Costs()).sites[0]
    got = _raw_wire(sp, 60.0)  # divided by zero before: 0.1 Hz x 1 s rounds to no tick
    sig = SignalSet((SignalGroup("tank/level", 20, 40.0, 80.0, 5.0, 600.0, 0.5, 0.001, 100.5,
                                 2),), SEED, 0.1)
    nbytes = 0.0
    for k in range(6):  # 60 s: six ticks of 10 s, each its own chunk
        s, ticks, values = sig.readings(k * 20, 20)
        p = len(codec.encode({"sensor": sig.names[s],
                              "ts": np.round(START_TS + ticks / 0.1, 6), "value": values}))
        nbytes += p + wire_overhead(p)
    assert got == pytest.approx(nbytes / 60.0)


def test_dead_path_is_a_finding() -> None:
    sp = build_plan(parse_workload(SLOW), Costs()).sites[0]
    est = sp.estimate.calibration.stage_out["level-alarms"]
    assert est > 0
    seconds = math.ceil(10 / est)  # the estimate expects 10 alarms in the run

    def m(out: float, secs: float = seconds) -> SimpleNamespace:
        return SimpleNamespace(stage_out={"level-aggregates": 0.3, "level-alarms": out},
                               throughput_s=secs, sample_fraction=1.0)

    found = dead_paths(sp, m(0.0))
    assert [(f.site, f.stage, f.kind, f.measured_per_s) for f in found] == [
        ("tank", "level-alarms", "dead-path", 0.0)]
    assert found[0].expected_in_run == pytest.approx(est * seconds)
    assert found[0].message.startswith(
        f"tank: stage 'level-alarms' emitted nothing in {seconds:g} s of simulated data")
    assert dead_paths(sp, m(0.001)) == []  # alive, however little
    assert dead_paths(sp, m(0.0, seconds / 5)) == []  # 2 expected: too few to tell


def test_mqtt_decoding_is_measured_per_message_and_per_wake_up() -> None:
    got = calibrate_mqtt(3000)
    assert got["messages"] == 3000
    assert got["us_per_message"] > 0 and got["us_per_wake"] > 0
    # a message alone pays a whole wake-up; in a burst of 50 it shares one
    assert got["single_us"] > got["burst_us"]
    assert got["single_us"] == pytest.approx(got["us_per_message"] + got["us_per_wake"])


def test_a_naive_baseline_the_link_cannot_carry_is_said(tmp_path: Path) -> None:
    from edgewise.plan.run import run_plan

    root = Path(__file__).resolve().parents[2]
    res = run_plan(root / "examples/workloads/vibration.yaml", tmp_path, simulate=False,
                   calibrate=False)
    site = res["summary"]["sites"]["pump-station"]
    # 240,000 readings/s, one JSON MQTT message each, over a 5 Mbit/s link
    assert site["naive_fits_uplink"] is False and site["uplink_bits_per_s"] == 5e6
    assert site["naive_bytes_per_s"] * 8 > 5e6
    assert ", more than the 5,000 kbit/s link carries)" in res["lines"][3]
