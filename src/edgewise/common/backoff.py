"""Reconnect pacing, the one policy every client loop uses: exponential backoff with full jitter.

`Backoff` is pure: the delay is a function of the attempt number and a random source. `Retry` is
the small state machine a client loop keeps beside it: it counts failed attempts, gives the next
delay, and forgets the failures once the connection has been healthy for ``reset_after``
seconds, so one blip after a day of service does not start at the longest delay, and a
connection that flaps right after every connect still backs off.

Used by the uplink, the agent's engine restarts and certificate renewal, the MQTT, OPC UA and
Modbus sources, the webhook sink and the control plane's data-out forwarders.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgewise.errors import ConfigError


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, 2015).

    The delay before attempt ``n`` (1, 2, ...) is uniform in ``[0, min(cap, base * 2**(n-1))]``:
    a fleet that lost its link at the same moment does not come back in lockstep.
    """

    base: float = 0.5  # seconds
    cap: float = 30.0  # seconds

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.cap >= self.base):
            raise ConfigError(
                f"backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}"
            )

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(max(attempt, 1) - 1, 62))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * self.ceiling(attempt)


class Retry:
    """Failed attempts of one client loop, paced by a `Backoff`.

    ``failed()`` after an attempt that did not work returns the seconds to wait before the next
    one; ``connected()`` when a connection is up; ``healthy()`` tells whether it has stayed up
    for ``reset_after`` seconds (then the count of failures is forgotten at the next
    ``failed()``, which starts again from the shortest delay).
    """

    def __init__(
        self,
        backoff: Backoff,
        reset_after: float = 30.0,  # seconds connected before earlier failures are forgotten
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = backoff
        self.reset_after = reset_after
        self.attempts = 0  # failures since the last healthy period
        self._clock = clock
        self._rng = rng
        self._up_since: float | None = None

    def connected(self) -> None:
        """A connection is up (call once per connection)."""
        self._up_since = self._clock()

    def healthy(self) -> bool:
        """Up for at least ``reset_after`` seconds."""
        return self._up_since is not None and self._clock() - self._up_since >= self.reset_after

    def reset(self) -> None:
        """Forget every failure (a request that succeeded, say)."""
        self.attempts = 0

    def failed(self, at_least: float | None = None) -> float:
        """Count a failure (or the loss of a connection); the seconds to wait before retrying.
        ``at_least``: the server asked for that pause (``Retry-After``); the wait is then at
        least that, plus up to as much again (jitter, at most the cap), so a fleet told the
        same number does not come back in lockstep."""
        if self.healthy():
            self.attempts = 0
        self._up_since = None
        self.attempts += 1
        delay = self.backoff.delay(self.attempts, self._rng)
        if at_least is not None and at_least > 0:
            delay = max(delay, at_least + self._rng() * min(at_least, self.backoff.cap))
        return delay
