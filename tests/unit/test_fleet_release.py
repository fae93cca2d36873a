"""A virtual node's updater (`testbed.fleet.release`): the agent's slot state machine driven by
time, the status line the rollouts read, exact failure counts."""

from __future__ import annotations

from fractions import Fraction

import pytest

from edgewise.cloud.rollouts.observe import seen
from edgewise.errors import ConfigError
from edgewise.testbed.fleet.release import (
    Behaviour,
    NodeUpdater,
    parse_rate,
    parse_seconds_range,
)


@pytest.mark.parametrize(("n", "rate", "expected"), [
    (200, "0", 0), (200, "0.05", 10), (200, "1%", 2), (10_000, "0.01", 100),
    (10_000, "5%", 500), (199, "0.05", 9), (7, "1", 7), (3, "1/3", 1)])
def test_exactly_floor_n_times_rate_nodes_fail(n: int, rate: str, expected: int) -> None:
    b = Behaviour({None: parse_rate(rate)[1]})
    assert sum(b.fails(i, "2.0") for i in range(n)) == expected


def test_rates_per_release_and_their_parsing() -> None:
    assert parse_rate("2.1=0.01") == ("2.1", Fraction(1, 100))
    assert parse_rate("5%") == (None, Fraction(1, 20))
    b = Behaviour(dict(parse_rate(r) for r in ("0.5", "2.0=0")))
    assert sum(b.fails(i, "2.0") for i in range(100)) == 0
    assert sum(b.fails(i, "2.1") for i in range(100)) == 50
    for bad in ("x", "1.5", "-0.1", "2.0=", "200%"):
        with pytest.raises(ConfigError):
            parse_rate(bad)
    assert parse_seconds_range("1-5") == (1.0, 5.0)
    assert parse_seconds_range("2") == (2.0, 2.0)
    for bad in ("5-1", "a-b", "-1", "1-99999"):
        with pytest.raises(ConfigError):
            parse_seconds_range(bad)


def observed(u: NodeUpdater) -> tuple[str | None, bool, str | None, str]:
    s = seen("online", {"status": f"running; {u.status_line()}", "applied_version": 1})
    return s.running, s.on_trial, s.failed, s.failure_phase


def test_a_good_release_stages_goes_on_trial_and_commits() -> None:
    u = NodeUpdater(0, Behaviour(apply_s=(4.0, 4.0)))
    assert u.status_line() == "" and u.health() == {}
    assert u.assign("2.0", 100.0) and u.busy and u.next_at == 102.0
    assert u.advance(101.9, 0.0) is None
    assert u.status_line() == "no release" and u.health() == {"release": None,
                                                              "release_failed": None}
    assert u.advance(102.0, 0.0) == "switched" and u.engine_starts == 1
    assert observed(u) == ("2.0", True, None, "")
    assert u.advance(104.0, 0.0) == "committed" and not u.busy
    assert observed(u) == ("2.0", False, None, "")
    assert u.health() == {"release": "2.0", "release_failed": None}
    assert not u.assign("2.0", 105.0)  # running already


def test_a_failing_release_rolls_back_at_its_gate_and_is_not_tried_again() -> None:
    u = NodeUpdater(0, Behaviour({None: Fraction(1)}, apply_s=(2.0, 2.0)))
    u.assign("2.0", 0.0)
    assert u.advance(1.0, 50.0) == "switched"
    assert u.advance(2.0, 51.0) == "rolled_back" and u.engine_starts == 2
    assert u.status_line() == ("no release; release 2.0 failed (gate): alarms beyond their "
                               "bound (simulated)")
    assert observed(u) == (None, False, "2.0", "gate")
    assert u.health() == {"release": None, "release_failed": "2.0"}
    assert not u.assign("2.0", 3.0)  # failed here: the agent does not try it again
    assert u.assign("2.1", 3.0)  # a newer one is staged


def test_a_refused_release_never_switches() -> None:
    u = NodeUpdater(0, Behaviour({"2.0": Fraction(1)}, phase="verify", apply_s=(2.0, 2.0)))
    u.assign("2.0", 0.0)
    assert u.advance(1.0, 0.0) == "refused" and u.engine_starts == 0
    assert observed(u) == (None, False, "2.0", "verify")


def test_an_assignment_that_changes_while_staging_is_not_switched_to() -> None:
    u = NodeUpdater(0, Behaviour(apply_s=(2.0, 2.0)))
    u.assign("2.0", 0.0)
    assert not u.assign("2.1", 0.5)  # busy: noted, staged once this one is given up
    assert u.advance(1.0, 0.0) == "superseded"
    assert u.busy and u.state.staging_version == "2.1"
    assert u.advance(2.0, 0.0) == "switched" and u.advance(3.0, 0.0) == "committed"
    assert u.state.running_version == "2.1"
