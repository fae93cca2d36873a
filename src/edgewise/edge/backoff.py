"""Reconnect pacing for the uplink: exponential backoff with full jitter.

Pure: the delay is a function of the attempt number and a random source; the uplink sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from edgewise.edge.identity import ConfigError


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
