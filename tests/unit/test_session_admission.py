"""Admission of session upgrades (issue 11, the reconnect storm): while more sessions wait for
their hello's answer than the process answers in a few seconds, an upgrade is told when to
come back (the device API's 429 with ``Retry-After``) instead of joining a queue its node will
give up on after its 10 s welcome timeout."""

from __future__ import annotations

from edgewise.cloud import sessions as sessions_mod
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.sessions import MIN_STARTING, STARTING_WAIT, SessionRegistry
from edgewise.security.tls import RevocationList


def test_upgrades_beyond_the_starting_backlog_are_told_when_to_retry(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(sessions_mod.time, "monotonic", lambda: now[0])
    reg = SessionRegistry(None, None, Metrics(), RevocationList())  # type: ignore[arg-type]
    assert reg.session_retry_after() == 0.0
    reg.starting = MIN_STARTING - 1
    assert reg.session_retry_after() == 0.0
    reg.starting = MIN_STARTING  # no rate measured yet: MIN_STARTING / STARTING_WAIT a second
    assert reg.session_retry_after() == MIN_STARTING / (MIN_STARTING / STARTING_WAIT)
    for _ in range(MIN_STARTING):  # all answered within one second: 64 welcomes a second
        reg.hello_done()
    assert reg.starting == 0
    now[0] += 1.0
    assert reg.session_retry_after() == 0.0
    assert reg.welcome_rate == MIN_STARTING
    reg.starting = int(MIN_STARTING * STARTING_WAIT)  # 4 s of welcomes at that rate wait
    assert reg.session_retry_after() == STARTING_WAIT
    reg.starting -= 1
    assert reg.session_retry_after() == 0.0
