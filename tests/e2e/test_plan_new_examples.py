"""`edgewise plan --simulate` on the three examples added for issue 14 (vehicle fleet, hospital
monitors, water utility): each exits 0, and estimate and measurement agree within 15% for
uplink bytes, records to the cloud and stage CPU, stage by stage for records where the run
expects at least 400 of them. Node cores are
compared and their ratio checked loosely (0.5-2): they are measured at the real rate on a
shared machine (docs/planner.md, Accuracy); docs/benchmarks.md has the figures.

The document's own checks (words, unmet constraints, capability sentences) are the document
tests' (test_plan_examples.check_example); these are the format's and the simulation's."""

from __future__ import annotations

import pytest
from test_plan_examples import AGREEMENT, plan_example

from conftest import LONG_ONLY


def check_estimates(name: str, out, cache) -> dict:
    summary = plan_example(name, out, cache, "--simulate")
    assert summary["simulated"] is True and summary["cpu_model"] == "calibrated"
    assert summary["findings"] == []
    for site in summary["sites"].values():
        est, meas = site["estimate"], site["measured"]
        for key in ("uplink_bytes_per_s", "records_per_s", "stage_cpu_us_per_s"):
            assert est[key] > 0, key
            assert meas[key] / est[key] == pytest.approx(1.0, abs=AGREEMENT), (key, est, meas)
        assert 0.5 <= meas["cores"] / est["cores"] <= 2.0, (est, meas)
        assert set(site["stages"]) == set(est["stage_cpu_us"])
        for sid, cmp in site["stages"].items():
            e_rec, m_rec = cmp["records_per_s"]
            # a count of n rare records varies by 1/sqrt(n): compare where 3 sigma < 15%
            if e_rec * site["simulation"]["event_seconds"] >= 400:
                assert m_rec / e_rec == pytest.approx(1.0, abs=AGREEMENT), (sid, cmp)
    return summary


@LONG_ONLY  # stage CPU within 15% flaked (0.75) in a full CI run: a timing ratio
@pytest.mark.slow
def test_vehicle_fleet(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = check_estimates("vehicle-fleet", tmp_path_factory.mktemp("fleet"),
                        tmp_path_factory.mktemp("cache"))
    bus = s["sites"]["bus"]
    assert bus["placement"]["harsh-braking"] == "edge"  # a user function, run in the engine
    assert bus["measured"]["stage_cpu_us"]["harsh-braking"] > 0
    assert bus["estimate"]["cores_parts"]["ingest"] > 0  # MQTT decoding, calibrated


@LONG_ONLY  # the default suite plans factory-line and vibration
@pytest.mark.slow
def test_hospital_monitors(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = check_estimates("hospital-monitors", tmp_path_factory.mktemp("hospital"),
                        tmp_path_factory.mktemp("cache"))
    ward = s["sites"]["ward"]
    # the slow NIBP source (one reading per 300 s) is simulated: 24 patients, 15-min windows
    assert ward["stages"]["blood-pressure"]["records_per_s"][1] == pytest.approx(24 / 900)


@LONG_ONLY  # the default suite plans factory-line and vibration
@pytest.mark.slow
def test_water_utility(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = check_estimates("water-utility", tmp_path_factory.mktemp("water"),
                        tmp_path_factory.mktemp("cache"))
    station = s["sites"]["station"]
    # per-group rates: the power registers (0.2 Hz) are planned as their own source, and the
    # window over "pumps" reads both: 16 + 8 pump keys and 8 pressure keys a minute
    assert station["stages"]["pump-minute"]["records_per_s"][1] == pytest.approx(32 / 60)


DEAD = """\
apiVersion: edgewise.io/v1
kind: Workload
metadata: {name: dead}
spec:
  use_case: a detector that never fires
  code: {path: fns}
  sites:
    - name: cell
      sources:
        - {id: cam, count: 4, rate_hz: 5}
  stages:
    - {id: detect, function: "quiet_fn:Quiet", inputs: [cam], reduction: 0.05,
       output_bytes_per_record: 40, during_outage: true}
    - {id: counts, operator: window, inputs: [cam], params: {size: 10s, aggregates: [count]}}
  requirements: {max_alarm_latency: 5s, offline_autonomy: 1h}
"""


@pytest.mark.slow
def test_a_path_dead_in_simulation_is_a_finding(tmp_path, plan_cache) -> None:
    import json

    from click.testing import CliRunner

    from edgewise.cli import main

    (tmp_path / "fns").mkdir()
    (tmp_path / "fns" / "quiet_fn.py").write_text(
        "class Quiet:\n    def __init__(self, options):\n        pass\n\n"
        "    def process(self, batch):\n        return None\n")
    (tmp_path / "w.yaml").write_text(DEAD)
    res = CliRunner().invoke(main, ["plan", str(tmp_path / "w.yaml"), "-o",
                                    str(tmp_path / "out"), "--simulate", "--rounds", "1"],
                             env={"EDGEWISE_CACHE_DIR": str(plan_cache)})
    assert res.exit_code == 0, res.output
    # 4 sensors x 5 Hz x 5% = 1 record/s expected; the throughput run is 30 s of data
    line = ("FINDING: cell: stage 'detect' emitted nothing in 30 s of simulated data where the "
            "estimate expects 1 records/s (30 in that span): its path is dead in the simulation")
    assert line in res.output
    found = json.loads((tmp_path / "out" / "plan.json").read_text())["findings"]
    assert [(f["stage"], f["kind"], f["measured_per_s"], f["expected_in_run"])
            for f in found] == [("detect", "dead-path", 0.0, 30.0)]
