"""The plan model: infeasible requirements are reported, artefacts validate, the link model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.pipeline.spec import load_pipeline
from edgewise.plan import artefacts, blocks, document
from edgewise.plan.linksim import StreamLoad, simulate_link
from edgewise.plan.model import build_plan
from edgewise.plan.workload import load_workload, parse_workload

ROOT = Path(__file__).resolve().parents[2]
FACTORY = ROOT / "examples" / "workloads" / "factory-line.yaml"

INFEASIBLE = """\
apiVersion: edgewise.io/v1
kind: Workload
metadata: {name: too-much}
spec:
  use_case: alarms faster than any node can act, over a thin link
  sites:
    - name: site
      sources:
        - {id: s, count: 2000, rate_hz: 100}
      link: {uplink: 64kbps, rtt: {p50: 40ms, p99: 40ms}}
  stages:
    - {id: raw, operator: map, inputs: [s], params: {set: {v2: "value * 2"}},
       placement: cloud}
    - {id: alarm, operator: threshold, inputs: [s], params: {high: 100.0},
       latency_budget: 5us, during_outage: true, needs: [global_context]}
  requirements:
    max_alarm_latency: 10us
    offline_autonomy: 1h
"""


def test_infeasible_requirements_are_reported_not_ignored() -> None:
    plan = build_plan(parse_workload(INFEASIBLE, "too-much.yaml"))
    unmet = plan.unmet
    # the stricter of the stage's budget (5 us) and the maximum (10 us); a 100 Hz source alone
    # takes 10 ms between readings
    assert any(u.startswith("site: alarm alarm latency: sample period 10.0 ms + edge path p99 ")
               and u.endswith(" against 5 us - unmeetable wherever it runs: sampling, debounce "
                              "and windows alone take 10.0 ms") for u in unmet)
    assert any(u.startswith("site: uplink capacity: ") and "(s-raw " in u for u in unmet)
    assert any("stage 'alarm': latency (budget 0.0 ms < cloud path p99" in u and
               "context (needs fleet-wide context); no placement meets both" in u for u in unmet)
    md = blocks.to_markdown(document.build(plan))
    top = md.split("## 1. Edge Topology Design")[0]
    assert "## Unmet constraints" in top
    assert f"**{len(unmet)} requirement(s) or hard constraint(s) are NOT met" in top
    for u in unmet:
        assert f"- **UNMET** {u}" in top


def test_factory_line_plan_places_and_quantifies() -> None:
    plan = build_plan(load_workload(FACTORY))
    sp = plan.sites[0]
    assert {st.id: sp.where(st.id) for st in sp.stages} == {"windows": "edge", "alarms": "edge"}
    assert [(s.name, s.priority) for s in sp.streams] == [("windows", "normal"),
                                                         ("alarms", "alarm")]
    f = sp.estimate
    assert f.readings_per_s == 10_000
    assert sp.flows["windows"].rate == 200.0
    assert sp.flows["alarms"].rate == pytest.approx(10.0, rel=0.01)  # 0.1% spikes above 100.5
    assert f.naive_per_s / f.edge_wire_per_s > 100
    assert f.latency.edge_p99 < f.latency.cloud_p99
    assert plan.unmet == []
    assert [c.met for c in plan.hard] == [True, True, True, True]


def test_artefacts_are_the_pipelines_plan_apply_reads(tmp_path: Path) -> None:
    plan = build_plan(load_workload(ROOT / "examples" / "workloads" / "retail.yaml"))
    # files an older planner wrote that nothing reads go; an operator's own file stays
    (tmp_path / "agents").mkdir()
    for old in ("rollout.yaml", "agents/store.yaml"):
        (tmp_path / old).write_text(artefacts.HEADER + "kind: x\n")
    (tmp_path / "agents" / "mine.yaml").write_text("kind: mine\n")
    written = artefacts.write_artefacts(plan, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["pipelines/store.yaml"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml")) == [
        "agents/mine.yaml", "pipelines/store.yaml"]
    spec = load_pipeline(tmp_path / "pipelines" / "store.yaml")
    placement = {c.id: c.entry.placement for c in spec.stages}
    assert placement == {"occupancy": "edge", "dwell-stats": "edge", "queue-alert": "edge",
                         "chain-footfall-partial": "edge", "chain-footfall": "cloud"}


def test_the_rollout_command_runs_the_planned_waves() -> None:
    from edgewise.cloud.rollouts.plan import plan_waves
    from edgewise.cloud.rollouts.spec import RolloutSpec

    plan = build_plan(load_workload(ROOT / "examples" / "workloads" / "retail.yaml"))
    (sp,) = plan.sites
    assert artefacts.rollout_command(plan, sp) == (
        "edgewise rollout create --release VERSION --selector site=store --canary 1% "
        "--waves 10%,50%,100% --bake 30m --max-unavailable-per-site 1 "
        "--gate 'error_rate<=0.001' --gate 'dropped==0' --intent-ttl 168h")
    r = artefacts.rollout_settings(plan, sp)
    spec = RolloutSpec.from_json({"release": "1.0.0", "selector": {"site": "store"},
                                  "canary": r["canary"],
                                  "waves": [f"{w}%" for w in r["waves"]],
                                  "gates": r["gates"]})
    waves = plan_waves("ro-00000000", [f"n{i}" for i in range(r["nodes"])], spec.canary,
                       spec.waves)
    assert [(name, len(ids)) for name, ids in waves] == [
        ("canary", 4), ("wave 1 (10%)", 36), ("wave 2 (50%)", 160), ("wave 3 (100%)", 200)]
    assert [len(ids) for _, ids in waves] == [k for _, k, _ in artefacts.rollout_waves(400)]


def test_the_document_describes_plan_apply_and_no_unread_file() -> None:
    plan = build_plan(load_workload(ROOT / "examples" / "workloads" / "retail.yaml"))
    doc, _words, _warnings = document.build_within(plan)
    md = blocks.to_markdown(doc)
    assert ("Deploying store (400 node(s) of k3s-small): enrol each node (`edgewise agent "
            "run --cloud URL --token TOKEN`, the token from `edgewise cloud token create "
            "--labels site=store`), then `edgewise plan apply DIR --cloud URL` (DIR: this "
            "folder; `--dry-run` first) installs `pipelines/store.yaml`: its edge part on "
            "every node labelled `site=store`, its cloud part (chain-footfall) on the control "
            "plane.") in md
    assert ("Releases reach store with `edgewise rollout create --release VERSION --selector "
            "site=store --canary 1%") in md
    assert "agents/" not in md and "rollout.yaml" not in md
    assert "edgewise config set --selector site=store --pipeline" not in md


@pytest.mark.parametrize(("fleet", "waves"), [
    (1, [("all", 1)]), (2, [("canary", 1), ("all", 1)]),
    (15, [("canary", 1), ("early", 1), ("half", 6), ("all", 7)]),
    (10_000, [("canary", 100), ("early", 900), ("half", 4000), ("all", 5000)])])
def test_rollout_waves(fleet: int, waves: list[tuple[str, int]]) -> None:
    got = artefacts.rollout_waves(fleet)
    assert [(n, k) for n, k, _ in got] == waves
    assert sum(k for _, k, _ in got) == fleet


def test_link_model_outbox_rides_out_the_outage_and_none_loses_it() -> None:
    loads = [StreamLoad("alarms", "alarm", False, 100.0), StreamLoad("agg", "normal", False,
                                                                      1000.0)]
    kinds = {"alarms": "alarm", "agg": "data"}
    res = simulate_link(loads, kinds, uplink_bytes_per_s=10_000.0, availability=0.99,
                        longest=6 * 3600.0, capacity=64 * 1024**2,
                        compare={"small": 5 * 1024**2, "none": 0})
    assert res.lost_bytes == {"alarm": 0.0, "data": 0.0}
    assert res.max_backlog == pytest.approx(1100.0 * 6 * 3600, rel=0.01)
    assert res.drain_s == pytest.approx(1100.0 * 6 * 3600 / (10_000 - 1100), rel=0.1)
    small = res.by_capacity["small"]
    assert small["alarm"] == 0.0  # alarms are kept, lower priority goes first
    assert small["data"] > 1000.0 * 6 * 3600 - 5 * 1024**2 - 1100 * res.step_s
    none = res.by_capacity["none"]
    down = sum(d for _, d in res.outages)
    assert none["alarm"] == pytest.approx(100.0 * down, rel=0.02)
