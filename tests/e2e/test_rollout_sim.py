"""Rollouts over the fleet simulator (issue 12): a real `edgewise cloud serve`, 100 virtual
nodes (`edgewise sim fleet`) in sites of two that act on the releases they are assigned, and
two rollouts through the operator API (`testbed.fleet.rollout_scenario`): release 2.0 with no
failures, then 2.2 with 5% of the nodes failing it (rolled back at their health gate); canary
1 + waves 10%,50%,100%, ``--max-failures 2%``, ``--max-unavailable-per-site 1``. The node with
the highest index is quarantined before the rollouts: it is in no wave.

Exact: the failing nodes are those with index 19, 39, 59, 79 and 99 (`release.Behaviour.fails`,
floor(100 x 0.05) = 5); 99 is the quarantined one. The long suite runs the same at 400 nodes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import LONG_ONLY
from edgewise.testbed.fleet.node import BUG
from edgewise.testbed.fleet.rollout_scenario import RolloutScenarioConfig, run_rollouts

pytestmark = pytest.mark.timeout(900)


def failing(n: int, every: int = 20) -> set[int]:
    return {i for i in range(n) if (i + 1) % every == 0}  # 5%: floor((i+1)/20) steps


@pytest.mark.parametrize("n", [100, pytest.param(400, marks=LONG_ONLY)])
async def test_a_rollout_completes_at_0_percent_and_halts_at_its_threshold_at_5(
        tmp_path: Path, n: int) -> None:
    res = await run_rollouts(RolloutScenarioConfig(
        n, tmp_path, rates=(("2.0", "0"), ("2.2", "5%")), processes=2, site_size=2,
        canary="1", waves="10%,50%,100%", max_failures="2%", max_unavailable_per_site=1,
        apply_seconds="0.2-0.8", quarantine=1, phase_timeout=300.0, settle_s=10.0))
    good, bad = res["rollouts"]
    quarantined = n - 1
    assert list(res["quarantined"]) == [quarantined]
    sim = res["sim"]
    why = {k: sim[k] for k in ("reconnects", "failures", "problems")}
    assert sim["problems"] == [] and sim["enrolled"] == n, why
    assert not [f for f in sim["failures"] if f.startswith(BUG)], why  # no node died of a bug
    # every node has its session at the stop, but for one that lost it (counted as a
    # reconnect, its reason in failures: CI saw one under load) and was still reconnecting
    assert n - sim["reconnects"] <= sim["connected_at_stop"] <= n, why
    if sim["reconnects"] == 0:
        assert sim["connected_at_stop"] == n, why
    targeted = n - 1
    allowed = targeted * 2 // 100  # 2% of the nodes in waves, rounded down
    # 0%: completes; every node but the quarantined one updated exactly once
    assert (good["state"], good["total"], good["failures_allowed"]) == (
        "completed", targeted, allowed)
    assert good["states"] == {"healthy": targeted, "skipped": 1}
    assert (good["updated"], good["updated_twice"], good["failed_reported"]) == (targeted, 0, 0)
    assert good["quarantined_updated"] == 0 and good["max_in_flight_per_site"] == 1
    assert good["seconds"] is not None and good["seconds"] > 0
    # 5%: halts at its threshold, the failures are exactly the failing nodes it reached
    assert (bad["state"], bad["paused_by"]) == ("paused", "failures")
    assert f"more than the 2% allowed ({allowed})" in bad["reason"]
    assert set(bad["failed_nodes"]) <= failing(n) - {quarantined}
    assert len(bad["failed_nodes"]) == bad["states"]["failed"] == bad["failed_reported"]
    assert bad["states"]["failed"] > allowed
    assert bad["states"].get("skipped") == 1 and bad["quarantined_updated"] == 0
    assert bad["updated"] == bad["states"]["healthy"] + bad["states"]["failed"]
    assert bad["updated"] + bad["states"].get("pending", 0) == targeted  # none in flight
    assert bad["updated_twice"] == 0 and bad["max_in_flight_per_site"] == 1
    assert bad["touched_after_pause"] == 0  # nothing assigned once it paused
    # only the wave in flight may still take a node after the crossing failure was reported
    assert bad["assigned_after_crossing"] is not None
    assert bad["assigned_after_crossing"] <= bad["wave_in_flight"]
    assert bad["beyond_wave_in_flight"] == 0
    # the nodes say the same: the failing ones rolled back, the quarantined one ran nothing
    rel = res["sim"]["releases"]
    assert rel["failed"] == {"2.2": bad["states"]["failed"]}
    assert rel["running"]["none"] == 1
    assert rel["steps"]["rolled_back"] == bad["states"]["failed"]
    assert rel["steps"]["staging"] == targeted + bad["updated"]
