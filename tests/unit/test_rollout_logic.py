"""Rollouts, the pure parts: spec parsing, the wave planner, the per-site budget, the fleet
gates, reading the node's status line, and the state machine's decisions."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgewise.cloud.rollouts import machine
from edgewise.cloud.rollouts.observe import Seen, seen
from edgewise.cloud.rollouts.plan import admit, plan_waves
from edgewise.cloud.rollouts.spec import (
    Amount,
    Gate,
    RolloutSpec,
    Sample,
    judge,
    parse_waves,
)
from edgewise.errors import BadRequest

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_amounts_and_waves_parse_and_refuse() -> None:
    assert Amount.parse("5%", "x").of(10) == 1  # rounds up: a canary of 5% is one node
    assert Amount.parse("2%", "x").allowed(10) == 0  # a threshold rounds down
    assert Amount.parse("3", "x").of(2) == 2
    assert parse_waves("10%,50%,100%") == (10.0, 50.0, 100.0)
    for bad in ("50%,10%,100%", "10%,50%", "10,100%", "0%,100%"):
        with pytest.raises(BadRequest):
            parse_waves(bad)
    with pytest.raises(BadRequest):
        Amount.parse("101%", "x")
    with pytest.raises(BadRequest):
        Amount.parse("1.5", "x")


def test_gates_parse_and_refuse() -> None:
    g = Gate.parse("alarm_rate<=2x")
    assert (g.metric, g.op, g.value, g.relative) == ("alarm_rate", "<=", 2.0, True)
    assert str(Gate.parse(" dropped == 0 ")) == "dropped==0"
    for bad in ("dropped<=2x", "cpu<=1", "alarm_rate>=2x", "alarm_rate"):
        with pytest.raises(BadRequest):
            Gate.parse(bad)


def test_spec_round_trips_through_its_stored_form() -> None:
    spec = RolloutSpec("2.0", {"site": "a"}, Amount(5, True), (10.0, 100.0), 60.0,
                       Amount(2, True), 1, "site", (Gate.parse("alarm_rate<=2x"),), 30.0, 60.0)
    assert RolloutSpec.from_json(spec.to_json()) == spec


@given(st.integers(min_value=1, max_value=400),
       st.sampled_from(["0", "1", "3", "5%", "50%"]),
       st.lists(st.integers(min_value=1, max_value=99), max_size=4))
def test_every_node_is_in_exactly_one_wave_and_waves_are_cumulative(
        n: int, canary: str, cuts: list[int]) -> None:
    percents = (*sorted(set(cuts)), 100)
    nodes = [f"n{i}" for i in range(n)]
    waves = plan_waves("ro-1", nodes, Amount.parse(canary, "c"), [float(p) for p in percents])
    flat = [x for _, w in waves for x in w]
    assert sorted(flat) == sorted(nodes) and len(flat) == len(set(flat))
    assert all(w for _, w in waves)
    c = Amount.parse(canary, "c").of(n)
    if c:
        assert waves[0][0] == "canary" and len(waves[0][1]) == c
    done = c
    for name, w in waves[1 if c else 0:]:
        pct = float(name.split("(")[1].rstrip("%)"))
        done += len(w)
        assert done == (n if pct >= 100 else max(c, -(-n * int(pct) // 100)))
    assert plan_waves("ro-1", list(reversed(nodes)), Amount.parse(canary, "c"),
                      [float(p) for p in percents]) == waves  # the same plan after a restart


@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["a", "b", "c", None])),
                max_size=60),
       st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 3)),
       st.integers(1, 3))
def test_the_budget_never_lets_a_site_exceed_its_limit(
        candidates: list[tuple[int, str | None]], busy: dict[str, int], limit: int) -> None:
    cands = [(f"n{i}-{j}", site) for j, (i, site) in enumerate(candidates)]
    counts = Counter(busy)
    admitted = admit(cands, Counter(busy), limit)
    sites = dict(cands)
    per_site = Counter(sites[n] for n in admitted if sites[n] is not None)
    for site, k in per_site.items():
        assert k + counts[site] <= max(limit, counts[site])
        assert k <= max(0, limit - counts[site])
    # as many as fit: every site under its limit had no candidate left out
    for n, site in cands:
        if n not in admitted:
            assert site is not None and counts[site] + per_site[site] >= limit
    assert [n for n, s in cands if s is None] == [n for n in admitted if sites[n] is None]


def pairs(before: tuple[int, int], after: tuple[int, int], nodes: int = 2
          ) -> list[tuple[Sample, Sample]]:
    return [(Sample(readings=before[0], alarms=before[1]),
             Sample(readings=after[0], alarms=after[1]))] * nodes


def test_a_relative_alarm_gate_passes_the_same_rate_and_fails_double() -> None:
    gate = Gate.parse("alarm_rate<=1.5x")
    assert judge(gate, pairs((10_000, 100), (10_000, 100))).verdict == "pass"
    assert judge(gate, pairs((10_000, 100), (10_000, 200))).verdict == "fail"
    # 1.9x over 1,380 readings with a 1.5x bound of 43 alarms: not enough to tell, the wave
    # waits (this passed before, in the e2e test: 55 alarms within 43 + room for chance)
    assert judge(gate, pairs((10_000, 208), (690, 27))).verdict == "unknown"
    assert judge(gate, pairs((10_000, 208), (5_000, 200))).verdict == "fail"
    # too few readings to judge: the wave waits
    assert judge(gate, pairs((10_000, 100), (100, 50))).verdict == "unknown"
    assert judge(gate, pairs((100, 1), (10_000, 100))).verdict == "unknown"
    # nothing before: no alarms after is fine, a few are within chance, a flood is not
    assert judge(Gate.parse("alarm_rate<=2x"), pairs((10_000, 0), (10_000, 0))).verdict == "pass"
    assert judge(Gate.parse("alarm_rate<=2x"), pairs((10_000, 0), (10_000, 1))).verdict == "pass"
    assert judge(Gate.parse("alarm_rate<=2x"), pairs((10_000, 0), (10_000, 50))
                 ).verdict == "fail"


def test_dropped_counts_growth_since_assignment_and_errors_count_the_new_engine() -> None:
    p = [(Sample(dropped=5), Sample(dropped=5, dead_letters=0)),
         (Sample(dropped=0), Sample(dropped=3, dead_letters=2))]
    assert judge(Gate.parse("dropped==0"), p).detail == "dropped 3"
    assert judge(Gate.parse("dropped==0"), p).verdict == "fail"
    assert judge(Gate.parse("dropped<=3"), p).verdict == "pass"
    assert judge(Gate.parse("errors==0"), p).verdict == "fail"


def test_the_status_line_of_the_updater_is_read() -> None:
    s = seen("online", {"applied_version": 7, "status": "running; release 2.0 on trial",
                        "counters": {"readings_in": 10, "alarms": 2, "a.dropped": 1,
                                     "b.dropped": 2}})
    assert (s.online, s.applied_version, s.running, s.on_trial) == (True, 7, "2.0", True)
    assert s.sample == Sample(10, 2, 0, 3)
    s = seen("offline", {"applied_version": 8, "status":
                         "running; release 1.0; release 2.0 failed (gate): alarms: 40 > 3"})
    assert (s.online, s.running, s.on_trial, s.failed) == (False, "1.0", False, "2.0")
    assert s.failure == "gate: alarms: 40 > 3"
    s = seen("online", {"status": "running; no release; release 2.0 failed (stage): x"})
    assert (s.running, s.failed) == (None, "2.0")
    assert seen(None, None) == Seen()


def rollout(**kw: object) -> machine.Rollout:
    spec = RolloutSpec("2.0", {}, Amount(1, False), (100.0,), bake_s=0,
                       max_failures=Amount(0, False),
                       max_unavailable_per_site=kw.pop("budget", None),  # type: ignore[arg-type]
                       node_timeout_s=60)
    args: dict[str, object] = {"id": "ro-1", "spec": spec, "state": "running", "wave": 0,
                               "waves": 2, "total": 4}
    args.update(kw)
    return machine.Rollout(**args)  # type: ignore[arg-type]


def on(running: str | None = None, online: bool = True, **kw: object) -> Seen:
    return Seen(online=online, applied_version=5, running=running, **kw)  # type: ignore[arg-type]


def test_offline_nodes_are_deferred_and_the_budget_counts_offline_nodes() -> None:
    members = {n: machine.Member(n, 1, site) for n, site in
               (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b"))}
    step = machine.decide(rollout(wave=1, budget=1), members,
                          {"a1": on(), "a2": on(), "b1": on(online=False), "b2": on()}, NOW)
    assert step.assign == ["a1"]  # one per site; site b has b1 offline already
    assert step.members["b1"][0] == "deferred"


def test_a_failure_beyond_the_threshold_pauses_and_assigns_nothing_more() -> None:
    members = {"c": machine.Member("c", 0, None, "assigned", version=6,
                                   assigned_at=NOW),
               "w": machine.Member("w", 1, None)}
    bad = on("1.0", failed="2.0", failure="gate: x")
    step = machine.decide(rollout(), members, {"c": bad, "w": on()}, NOW)
    assert step.members["c"][0] == "failed"
    assert step.rollout["state"] == "paused" and step.assign == []


def test_a_node_that_does_not_run_the_release_in_time_fails() -> None:
    m = machine.Member("c", 0, None, "assigned", version=5, assigned_at=NOW)
    r = rollout()
    assert machine.classify(r, m, on("1.0"), NOW + timedelta(seconds=59)) is None
    assert machine.classify(r, m, on("2.0", on_trial=True), NOW) is None
    assert machine.classify(r, m, on("2.0"), NOW)[0] == "healthy"  # type: ignore[index]
    assert machine.classify(r, m, on("1.0"), NOW + timedelta(seconds=61))[0] == "failed"  # type: ignore[index]
    # a download cut by a control-plane restart: the node tries again, it has not failed
    # (seen in the e2e test with a kill -9 of cloud serve)
    cut = seen("online", {"status": "running; no release; release 2.0 failed (download): "
                          "pipelines/line.yaml: RemoteProtocolError: Server disconnected"})
    assert machine.classify(r, m, cut, NOW) is None
    bad = seen("online", {"status": "running; no release; release 2.0 failed (validate): x"})
    assert machine.classify(r, m, bad, NOW)[0] == "failed"  # type: ignore[index]


def test_abort_rolls_back_what_it_changed_and_skips_the_rest() -> None:
    members = {"h": machine.Member("h", 0, None, "healthy"),
               "f": machine.Member("f", 0, None, "failed"),
               "p": machine.Member("p", 1, None, "pending"),
               "d": machine.Member("d", 1, None, "deferred")}
    step = machine.decide(rollout(state="aborting"), members, {}, NOW)
    assert sorted(step.rollback) == ["f", "h"]
    assert step.members["p"][0] == step.members["d"][0] == "skipped"
    assert "state" not in step.rollout
    done = {n: machine.Member(n, 0, None, "rolled_back") for n in "hf"}
    assert machine.decide(rollout(state="aborting"), done, {}, NOW).rollout["state"] == \
        "aborted"


def test_late_nodes_get_the_target_after_completion_until_the_intents_expire() -> None:
    m = {"d": machine.Member("d", 0, None, "deferred")}
    r = rollout(state="completed", completed_at=NOW)
    assert machine.decide(r, m, {"d": on()}, NOW + timedelta(hours=1)).assign == ["d"]
    late = machine.decide(r, m, {"d": on()}, NOW + timedelta(days=2))
    assert late.assign == [] and late.members["d"][0] == "skipped"


def test_with_a_relative_gate_a_node_is_assigned_once_it_has_a_baseline() -> None:
    members = {"a": machine.Member("a", 1, None), "b": machine.Member("b", 1, None)}
    fresh = Seen(online=True, sample=Sample(readings=160, alarms=3))
    ready = Seen(online=True, sample=Sample(readings=5000, alarms=100))
    gated = rollout(wave=1)
    gated = machine.Rollout(**{**vars(gated), "spec": RolloutSpec(
        "2.0", {}, gates=(Gate.parse("alarm_rate<=1.5x"),))})
    step = machine.decide(gated, members, {"a": fresh, "b": ready}, NOW)
    assert step.assign == ["b"] and "baseline" in step.rollout["reason"]
    assert machine.decide(rollout(wave=1), members, {"a": fresh, "b": ready}, NOW
                          ).assign == ["a", "b"]  # no relative gate: no baseline needed
