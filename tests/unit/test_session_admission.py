"""Admission of session upgrades (issue 11, the reconnect storm): while more sessions wait for
their hello's answer than the process answers in a few seconds, an upgrade waits in line for a
start slot when that line is answered within `ADMIT_WAIT` seconds; beyond it, it is told when
to come back (the device API's 429 with ``Retry-After``). Before the line, every upgrade over
the bound got a 429 after its TLS handshake, and its node waited that out on top of its
backoff: the last tenth of a 2,000-node fleet came back a minute after the rest."""

from __future__ import annotations

import asyncio

import pytest

from edgewise.cloud import session_admission as mod
from edgewise.cloud.session_admission import MIN_STARTING, STARTING_WAIT, StartAdmission


async def full(**kw: float) -> StartAdmission:
    """An admission with every start slot taken (no rate measured yet: the bound is
    MIN_STARTING)."""
    adm = StartAdmission(**kw)
    for _ in range(MIN_STARTING):
        assert await adm.admit() == 0.0
    return adm


async def in_line(adm: StartAdmission, n: int) -> list[asyncio.Task[float]]:
    """``n`` upgrades waiting in line."""
    tasks = [asyncio.create_task(adm.admit()) for _ in range(n)]
    await asyncio.sleep(0)
    assert adm.waiting == n
    return tasks


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    return now


async def test_upgrades_within_the_bound_are_admitted_at_once(clock: list[float]) -> None:
    adm = await full()
    assert (adm.starting, adm.waiting, adm.waited, adm.refused) == (MIN_STARTING, 0, 0, 0)
    for _ in range(MIN_STARTING):  # all answered within one second: 256 welcomes a second
        adm.ended(welcomed=True)
    assert adm.starting == 0
    clock[0] += 1.0
    assert adm.limit() == int(MIN_STARTING * STARTING_WAIT)
    assert adm.welcome_rate == MIN_STARTING
    assert adm.limit() == int(MIN_STARTING * STARTING_WAIT)


async def test_an_upgrade_over_the_bound_waits_for_a_slot_first_come_first_served(
    clock: list[float],
) -> None:
    adm = await full()
    first, second = await in_line(adm, 2)
    assert adm.starting == MIN_STARTING
    assert not first.done() and not second.done()
    adm.ended(welcomed=True)  # one hello answered: its slot goes to the first in line
    assert await asyncio.wait_for(first, 1.0) == 0.0
    assert not second.done()
    assert (adm.waiting, adm.starting, adm.waited) == (1, MIN_STARTING, 1)
    adm.ended(welcomed=False)  # a session that ended before its hello frees a slot too
    assert await second == 0.0
    assert (adm.waiting, adm.starting, adm.waited, adm.refused) == (0, MIN_STARTING, 2, 0)


async def test_a_full_line_is_told_at_once_when_to_retry(
    clock: list[float], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mod, "MAX_WAITING", 16)
    adm = await full()
    line = await in_line(adm, 16)
    # the line is full: refused at once, told the time of all before it at the rate (16/s
    # before any welcome was measured)
    assert await adm.admit() == (MIN_STARTING + 16) / (MIN_STARTING / STARTING_WAIT)
    assert (adm.refused, adm.waiting) == (1, 16)
    for t in line:
        t.cancel()
    await asyncio.gather(*line, return_exceptions=True)
    assert (adm.waiting, adm.starting) == (0, MIN_STARTING)


async def test_a_wait_that_runs_out_is_refused_and_holds_no_slot() -> None:
    adm = await full(admit_wait=0.05)
    assert await adm.admit() >= 1.0  # nobody ended within 50 ms
    assert (adm.waiting, adm.starting, adm.refused, adm.waited) == (0, MIN_STARTING, 1, 0)
    adm.ended(welcomed=True)  # the slot is not handed to the one that left
    assert adm.starting == MIN_STARTING - 1
    assert not adm._waiters  # nothing of the one that left is kept


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on() -> None:
    adm = await full()
    a, b = await in_line(adm, 2)
    adm.ended(welcomed=True)  # hands the slot to `a` ...
    a.cancel()  # ... whose request is cancelled before it runs (its node went away)
    with pytest.raises(asyncio.CancelledError):
        await a
    assert await b == 0.0  # the slot went on to `b`
    assert (adm.waiting, adm.starting) == (0, MIN_STARTING)


async def test_retry_after_is_bounded_whatever_the_measured_rate(
    clock: list[float], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storm's first second measured a handful of welcomes: the line's time at that rate was
    many minutes, and 208 nodes told so stayed away (a 2,000-node run)."""
    monkeypatch.setattr(mod, "MAX_WAITING", 2000)
    adm = await full()
    adm.ended(welcomed=True)  # one welcome in the first second: 1 a second measured
    await adm.admit()
    clock[0] += 1.0
    line = await in_line(adm, 2000)
    assert adm.welcome_rate == 1.0
    assert await adm.admit() == mod.MAX_RETRY_AFTER  # not (256 + 2000) / 1 s
    for t in line:
        t.cancel()
    await asyncio.gather(*line, return_exceptions=True)


async def test_the_line_is_exported_as_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from edgewise.cloud.app import AdmissionMetrics

    adm = await full()
    line = await in_line(adm, 3)
    adm.ended(welcomed=True)
    assert await asyncio.wait_for(line[0], 1.0) == 0.0
    registry = CollectorRegistry()
    registry.register(AdmissionMetrics(adm))
    text = generate_latest(registry).decode()
    assert f"edgewise_sessions_starting {float(MIN_STARTING)}" in text
    assert "edgewise_sessions_waiting 2.0" in text
    assert "edgewise_sessions_admitted_after_wait_total 1.0" in text
    for t in line[1:]:
        t.cancel()
    await asyncio.gather(*line[1:], return_exceptions=True)
