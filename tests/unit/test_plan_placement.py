"""Placement: hand-checked cases from the planner issue, and the data-flow rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgewise.plan.placement import MUST_CLOUD, MUST_EDGE, StageFacts, decide, decide_one

BASE = StageFacts(
    id="s", inputs=("src",), operator="window", latency_budget_s=None, cloud_p99_s=0.045,
    edge_p99_s=0.003, link_p99_rtt_s=0.040, bytes_in_per_s=1000.0, bytes_out_per_s=1000.0,
    uplink_bytes_per_s=1e6, cost_per_gb=0.0, cores=0.0, memory_bytes=0.0, needs=(),
    during_outage=False, local_action=False, personal_data_in=False, largest_node_cores=8,
    largest_node_ram=32 * 1024**3, gpu_available=False, edge_core_month=0.0,
    cloud_core_month=0.0,
)


def verdicts(d) -> dict[str, object]:
    return {s.criterion: s.value for s in d.scores}


def test_5ms_budget_over_40ms_rtt_goes_to_the_edge() -> None:
    d = decide_one(replace(BASE, latency_budget_s=0.005))
    assert d.where == "edge"
    assert verdicts(d)["latency"] == MUST_EDGE
    why = next(s.why for s in d.scores if s.criterion == "latency")
    assert why == "budget 5.0 ms < cloud path p99 45.0 ms (link p99 RTT 40.0 ms)"
    assert d.reason == "edge: latency requires it"


def test_budget_above_the_cloud_path_is_neutral() -> None:
    d = decide_one(replace(BASE, latency_budget_s=2.0, bytes_out_per_s=2000.0, cores=1.0))
    assert verdicts(d)["latency"] == 0
    assert d.where == "cloud"  # output larger than input: the bandwidth score says cloud
    assert d.reason == "cloud: score -1"


def test_fleet_wide_context_goes_to_the_cloud() -> None:
    d = decide_one(replace(BASE, needs=("global_context",), bytes_out_per_s=10.0))
    assert d.where == "cloud"
    assert verdicts(d)["context"] == MUST_CLOUD
    assert d.reason == "cloud: context requires it"


def test_privacy_stage_stays_on_site_even_when_bandwidth_says_cloud() -> None:
    d = decide_one(replace(BASE, needs=("privacy",), bytes_out_per_s=5000.0))
    assert verdicts(d)["bandwidth"] == -1
    assert d.where == "edge"
    assert d.reason == "edge: privacy requires it"


def test_needed_during_outages_is_edge() -> None:
    d = decide_one(replace(BASE, during_outage=True, operator="threshold"))
    assert d.where == "edge"
    assert verdicts(d)["offline"] == MUST_EDGE


def test_privacy_and_global_context_split_a_window() -> None:
    d = decide_one(replace(BASE, needs=("privacy", "global_context")))
    assert d.where == "split"
    assert d.infeasible == []


def test_conflict_without_a_split_is_reported_infeasible() -> None:
    d = decide_one(replace(BASE, operator="threshold", latency_budget_s=0.001,
                           needs=("global_context",)))
    assert d.where == "edge"
    assert len(d.infeasible) == 1
    assert "no placement meets both" in d.infeasible[0]
    assert d.infeasible[0].startswith("stage 's': latency (budget 1.0 ms < cloud path p99")


def test_gpu_need_without_gpu_node_goes_to_cloud_and_with_privacy_is_infeasible() -> None:
    assert decide_one(replace(BASE, needs=("gpu",))).where == "cloud"
    assert decide_one(replace(BASE, needs=("gpu",), gpu_available=True)).where == "edge"
    d = decide_one(replace(BASE, needs=("gpu", "privacy"), operator="function"))
    assert d.infeasible and "compute (needs a GPU" in d.infeasible[0]


def test_tie_goes_to_the_edge() -> None:
    d = decide_one(replace(BASE, cores=0.0))
    total = sum(float(s.value) for s in d.scores)
    assert total == 1.0  # only the compute fit (+1) scores
    d2 = decide_one(replace(BASE, cores=1.0))  # 1 of 8 cores: no compute bonus
    assert d2.where == "edge"
    assert d2.reason == "edge: score +0 (a tie goes to the edge: autonomy first)"


def test_edge_stage_pulls_its_input_stage_to_the_edge() -> None:
    up = replace(BASE, id="prep", bytes_out_per_s=2000.0, cores=1.0)  # alone: cloud
    assert decide_one(up).where == "cloud"
    down = replace(BASE, id="alarm", inputs=("prep",), operator="threshold",
                   latency_budget_s=0.005)
    out = decide([up, down])
    assert out["alarm"].where == "edge"
    assert out["prep"].where == "edge"
    assert out["prep"].reason == "edge: feeds 'alarm', which runs at the edge"


def test_stage_reading_a_cloud_result_moves_to_the_cloud() -> None:
    up = replace(BASE, id="fleet", needs=("global_context",))
    down = replace(BASE, id="trend", inputs=("fleet",))
    out = decide([up, down])
    assert out["fleet"].where == "cloud"
    assert out["trend"].where == "cloud"
    assert out["trend"].reason == "cloud: reads 'fleet', whose result is in the cloud"


def test_edge_requirement_reading_a_cloud_requirement_is_infeasible() -> None:
    up = replace(BASE, id="fleet", operator="threshold", needs=("global_context",))
    down = replace(BASE, id="alarm", inputs=("fleet",), latency_budget_s=0.001)
    out = decide([up, down])
    msgs = out["alarm"].infeasible
    assert msgs == [
        "stage 'alarm' must run at the edge but reads 'fleet', which must run in the cloud",
        "stage 'alarm' must run at the edge but reads 'fleet', whose result only exists in "
        "the cloud",
    ]


@pytest.mark.parametrize("pinned", ["edge", "cloud"])
def test_pinned_placement_is_kept_and_conflicts_reported(pinned: str) -> None:
    d = decide_one(replace(BASE, pinned=pinned))
    assert d.where == pinned
    assert d.infeasible == []
    d = decide_one(replace(BASE, pinned="cloud", during_outage=True))
    assert d.where == "cloud"
    assert d.infeasible == ["stage 's' is pinned to the cloud but offline: needed during "
                            "outages: must work while the link is down"]
