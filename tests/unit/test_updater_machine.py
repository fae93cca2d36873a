"""The slot state machine (edgewise.edge.updater.machine) as a table: every state a node can be
in, every event, and what follows; plus the state file's round trip and refusals."""

from __future__ import annotations

import dataclasses

import pytest

from edgewise.edge.updater import machine as m
from edgewise.edge.updater.machine import Failure, Release, SlotState

A1 = Release("a", "1", "d1")
B2 = Release("b", "2", "d2")
A3 = Release("a", "3", "d3")

NONE = SlotState()
COMMITTED = SlotState(active=A1)
COMMITTED_WITH_PREV = SlotState(active=B2, previous=A1)
TRIAL0 = SlotState(active=B2, previous=A1, pending=0, alarm_rate=0.5)
TRIAL2 = SlotState(active=B2, previous=A1, pending=2, alarm_rate=0.5)
TRIAL3 = SlotState(active=B2, previous=A1, pending=3, alarm_rate=0.5)
FIRST_TRIAL3 = SlotState(active=A1, pending=3)
STAGING = SlotState(active=A1, staging="b", staging_version="2")
STAGING_ON_TRIAL = SlotState(active=B2, previous=A1, pending=1, staging="a",
                             staging_version="3")  # cannot be produced; on_start still copes

NOW = 1000.0


def fail(version: str, phase: str, reason: str) -> Failure:
    return Failure(version, phase, reason, NOW)


START_TABLE = [
    # name, state, count, expected state, rolled back, discard
    ("no release", NONE, True, NONE, False, None),
    ("committed", COMMITTED, True, COMMITTED, False, None),
    ("first start of a trial, counted", TRIAL0, True,
     dataclasses.replace(TRIAL0, pending=1), False, None),
    ("first start, the launcher counts", TRIAL0, False, TRIAL0, False, None),
    ("third start, counted", TRIAL2, True, dataclasses.replace(TRIAL2, pending=3), False, None),
    ("attempts used up: roll back", TRIAL3, True,
     SlotState(active=A1, last_failure=fail(
         "2", "start", "release 2 was started 3 times without passing its health gate (a "
         "crash, a hang or a power loss each time)"), failed=("2",)), True, None),
    ("attempts used up, not counting: still rolled back", TRIAL3, False,
     SlotState(active=A1, last_failure=fail(
         "2", "start", "release 2 was started 3 times without passing its health gate (a "
         "crash, a hang or a power loss each time)"), failed=("2",)), True, None),
    ("first release used up: back to no release", FIRST_TRIAL3, True,
     SlotState(last_failure=fail(
         "1", "start", "release 1 was started 3 times without passing its health gate (a "
         "crash, a hang or a power loss each time)"), failed=("1",)), True, None),
    ("staging cut short", STAGING, True, COMMITTED, False, "b"),
    ("staging cut short on trial", STAGING_ON_TRIAL, True,
     SlotState(active=B2, previous=A1, pending=2), False, "a"),
]


@pytest.mark.parametrize(("name", "state", "count", "expected", "rolled_back", "discard"),
                         START_TABLE, ids=[row[0] for row in START_TABLE])
def test_on_start(name: str, state: SlotState, count: bool, expected: SlotState,
                  rolled_back: bool, discard: str | None) -> None:
    d = m.on_start(state, max_attempts=3, count=count, now=NOW)
    assert d.state == expected
    assert d.rolled_back is rolled_back
    assert d.discard == discard
    assert d.changed is (expected != state)


def test_on_start_needs_an_attempt() -> None:
    with pytest.raises(ValueError):
        m.on_start(NONE, max_attempts=0, count=True, now=NOW)


SHOULD_APPLY = [
    ("nothing assigned", COMMITTED, None, False),
    ("the running one", COMMITTED, "1", False),
    ("a new one", COMMITTED, "2", True),
    ("a new one, no release yet", NONE, "1", True),
    ("one that failed here", dataclasses.replace(COMMITTED, failed=("2",)), "2", False),
    ("a trial under way", TRIAL0, "3", False),
    ("the previous one again (an operator's rollback)", COMMITTED_WITH_PREV, "1", True),
]


@pytest.mark.parametrize(("name", "state", "assigned", "expected"), SHOULD_APPLY,
                         ids=[row[0] for row in SHOULD_APPLY])
def test_should_apply(name: str, state: SlotState, assigned: str | None,
                      expected: bool) -> None:
    assert m.should_apply(state, assigned) is expected


STAGE_TABLE = [
    # name, state, expected state after begin_staging("9")
    ("no release: slot a", NONE, SlotState(staging="a", staging_version="9")),
    ("active in a: slot b", COMMITTED, SlotState(active=A1, staging="b", staging_version="9")),
    ("previous in a given up", COMMITTED_WITH_PREV,
     SlotState(active=B2, staging="a", staging_version="9")),
    ("after a rollback to no release, previous slot untouched",
     SlotState(previous=B2), SlotState(previous=B2, staging="a", staging_version="9")),
    ("a second staging of another version", STAGING,
     SlotState(active=A1, staging="b", staging_version="9")),
]


@pytest.mark.parametrize(("name", "state", "expected"), STAGE_TABLE,
                         ids=[row[0] for row in STAGE_TABLE])
def test_begin_staging(name: str, state: SlotState, expected: SlotState) -> None:
    assert m.begin_staging(state, "9") == expected


def test_no_staging_during_a_trial() -> None:
    with pytest.raises(m.TransitionError):
        m.begin_staging(TRIAL0, "9")


def test_switch_commit_rollback_cycle() -> None:
    staged = m.begin_staging(COMMITTED, "2")
    on_trial = m.switch(staged, B2, alarm_rate=0.5)
    assert on_trial == TRIAL0
    assert m.commit(on_trial) == COMMITTED_WITH_PREV
    back = m.rollback(on_trial, "gate", "no records", NOW)
    assert back == SlotState(active=A1, last_failure=fail("2", "gate", "no records"),
                             failed=("2",))
    # the next release goes into b again (the failed one's slot), never into a
    assert m.begin_staging(back, "3").staging == "b"
    # committed 2 then 3: 3 goes into a, giving up 1
    nxt = m.begin_staging(COMMITTED_WITH_PREV, "3")
    assert m.switch(nxt, A3, None) == SlotState(active=A3, previous=B2, pending=0)


TRANSITION_ERRORS = [
    ("switch without staging", lambda: m.switch(COMMITTED, B2, None)),
    ("switch of another version", lambda: m.switch(STAGING, Release("b", "7", "x"), None)),
    ("switch into another slot", lambda: m.switch(STAGING, Release("a", "2", "x"), None)),
    ("commit when committed", lambda: m.commit(COMMITTED)),
    ("rollback when committed", lambda: m.rollback(COMMITTED, "gate", "x", NOW)),
    ("damaged without a release", lambda: m.damaged(NONE, "x", NOW)),
]


@pytest.mark.parametrize("call", [row[1] for row in TRANSITION_ERRORS],
                         ids=[row[0] for row in TRANSITION_ERRORS])
def test_transition_errors(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(m.TransitionError):
        call()


def test_abandon_staging_keeps_what_runs() -> None:
    assert m.abandon_staging(STAGING) == COMMITTED
    assert m.should_apply(m.abandon_staging(STAGING), "2") is True


def test_refuse_permanent_and_transient() -> None:
    staged = m.begin_staging(COMMITTED, "2")
    bad = m.refuse(staged, "2", "validate", "pipeline x invalid", NOW, permanent=True)
    assert bad == SlotState(active=A1, last_failure=fail("2", "validate", "pipeline x invalid"),
                            failed=("2",))
    net = m.refuse(staged, "2", "download", "refused", NOW, permanent=False)
    assert net == SlotState(active=A1, last_failure=fail("2", "download", "refused"))
    assert m.should_apply(net, "2") is True
    assert m.should_apply(bad, "2") is False


def test_damaged_active_runs_previous_and_is_staged_again() -> None:
    d = m.damaged(COMMITTED_WITH_PREV, "slot b: x is missing", NOW)
    assert d == SlotState(active=A1, last_failure=fail("2", "start", "slot b: x is missing"))
    assert m.should_apply(d, "2") is True


def test_failed_list_is_bounded_and_moves_a_repeat_last() -> None:
    s = NONE
    for i in range(m.MAX_FAILED + 5):
        s = m.refuse(s, str(i), "verify", "x", NOW, permanent=True)
    assert len(s.failed) == m.MAX_FAILED
    assert s.failed[0] == "5" and s.failed[-1] == str(m.MAX_FAILED + 4)
    s = m.refuse(s, "10", "verify", "x", NOW, permanent=True)
    assert s.failed[-1] == "10" and len(s.failed) == m.MAX_FAILED


@pytest.mark.parametrize("state", [NONE, COMMITTED, TRIAL2, STAGING, STAGING_ON_TRIAL,
                                   m.rollback(TRIAL0, "gate", "r", NOW)])
def test_json_round_trip(state: SlotState) -> None:
    assert SlotState.from_json(state.to_json()) == state


BAD_FILES = [
    ("not a map", []),
    ("wrong format", {"format": 2}),
    ("pending without active", {"format": 1, "pending": 1}),
    ("negative pending", {"format": 1, "active": A1.to_json(), "pending": -1}),
    ("bad slot", {"format": 1, "active": {"slot": "c", "version": "1", "digest": "d"}}),
    ("staging into the active slot", {"format": 1, "active": A1.to_json(), "staging": "a"}),
    ("failed not versions", {"format": 1, "failed": [1]}),
    ("alarm rate text", {"format": 1, "alarm_rate": "3"}),
]


@pytest.mark.parametrize("doc", [row[1] for row in BAD_FILES], ids=[r[0] for r in BAD_FILES])
def test_bad_state_files(doc: object) -> None:
    with pytest.raises(ValueError):
        SlotState.from_json(doc)
