"""The one reconnect policy: full-jitter ceilings, and failures forgotten after a healthy period."""

from __future__ import annotations

import pytest

from edgewise.common.backoff import Backoff, Retry
from edgewise.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ceilings_double_up_to_the_cap() -> None:
    b = Backoff(0.5, 4.0)
    assert [b.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay(3, rng=lambda: 0.25) == 0.5
    with pytest.raises(ConfigError, match="0 < base <= cap"):
        Backoff(2.0, 1.0)


def test_retry_counts_failures_and_uses_the_full_ceiling_with_rng_one() -> None:
    clock = Clock()
    r = Retry(Backoff(1.0, 8.0), reset_after=30.0, clock=clock, rng=lambda: 1.0)
    assert [r.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert r.attempts == 5


def test_a_short_connection_does_not_reset_but_a_healthy_one_does() -> None:
    clock = Clock()
    r = Retry(Backoff(1.0, 8.0), reset_after=30.0, clock=clock, rng=lambda: 1.0)
    r.failed()
    r.failed()
    r.connected()
    clock.now += 29.0  # flapped before it was healthy: keeps backing off
    assert not r.healthy()
    assert r.failed() == 4.0
    r.connected()
    clock.now += 30.0
    assert r.healthy()
    assert r.failed() == 1.0  # a day of service, then one blip: starts short again
    assert r.attempts == 1


def test_reset_forgets_failures() -> None:
    r = Retry(Backoff(1.0, 8.0), rng=lambda: 1.0)
    r.failed()
    r.failed()
    r.reset()
    assert r.failed() == 1.0


def test_a_retry_after_is_waited_at_least_with_jitter_up_to_as_much_again() -> None:
    ups = iter([0.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    retry = Retry(Backoff(0.5, 30.0), rng=lambda: next(ups))
    assert retry.failed(at_least=4.0) == 4.0  # backoff 0 s, jitter 0 s
    assert retry.failed(at_least=4.0) == 8.0  # backoff 1 s, jitter the whole 4 s
    assert retry.failed(at_least=0.2) == 1.0  # the backoff's own 2 s * 0.5 is longer
    assert retry.attempts == 3


def test_retry_after_headers_are_read_and_bounded() -> None:
    from edgewise.edge.device_http import MAX_RETRY_AFTER_S, retry_after

    assert retry_after({"Retry-After": "7"}) == 7.0
    assert retry_after({}) is None and retry_after(None) is None
    assert retry_after({"Retry-After": "99999999"}) == MAX_RETRY_AFTER_S
    assert retry_after({"Retry-After": "soon"}) == 1.0
    assert retry_after({"Retry-After": "-5"}) == 0.0
    assert 0.0 < retry_after({"Retry-After": "Fri, 31 Dec 2100 23:59:59 GMT"}) == 600.0
