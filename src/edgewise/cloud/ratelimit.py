"""Per-node request rate limits: one token bucket per key (the device API keys by node id).

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second; a request takes
one. `RateLimiter.take(key)` returns 0 when the request may go ahead, else the seconds until a
token is back (the ``Retry-After`` of the 429). Buckets that have refilled completely hold no
information and are dropped when the table grows past ``max_keys``, so memory is bounded by the
nodes that were busy recently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._prune_at = max_keys

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if there was one, else seconds until there is."""
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self._prune_at:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        # many busy nodes: prune again only after the table has doubled (amortised O(1))
        self._prune_at = max(self.max_keys, 2 * len(self._buckets))


class TokenBucket:
    """One bucket (admission control: TLS handshakes, enrolments): ``rate`` tokens per second,
    at most ``burst`` at once. `take` returns 0.0 and takes a token, or the seconds until one
    is back (taking nothing); `wait` says the same without taking."""

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a rate above 0 and a burst of at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def wait(self) -> float:
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def take(self) -> float:
        wait = self.wait()
        if wait == 0.0:
            self._tokens -= 1.0
        return wait


class Pacer:
    """Admission to a costly handler (enrolment): requests beyond the bucket wait their turn,
    at most ``max_waiting`` at once; one more is refused (`admit` returns the seconds to tell
    it in ``Retry-After``). Waiters are served in arrival order.

    ``max_inflight`` bounds the requests waiting or admitted and not yet `done`: each holds
    a connection that the listener counts as unauthenticated until it closes, so a storm of
    enrolments that filled the listener's cap would leave no room for the TLS handshakes
    of the nodes' sessions. (In a start of 20,000 nodes one process closed 215,641
    connections at its cap while the enrolments took minutes, and enrolled nodes waited for
    their sessions: docs/benchmarks.md, *The stretch: 20,000 nodes*.)"""

    def __init__(self, rate: float, burst: int, max_waiting: int,
                 max_inflight: int | None = None) -> None:
        self.bucket = TokenBucket(rate, burst)
        self.max_waiting = max_waiting
        self.max_inflight = max_inflight
        self.waiting = 0
        self.inflight = 0  # waiting or admitted, not `done` yet
        self.waited = 0  # requests that waited for a token (in all)
        self.refused = 0
        self._turn = asyncio.Lock()

    async def admit(self) -> float:
        """0.0 once the request may go ahead (after waiting, maybe; call `done` when it
        ends); else the seconds after which to try again (the queue is full)."""
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            self.refused += 1
            return max(1.0, self.inflight / self.bucket.rate)
        if self.waiting == 0 and self.bucket.take() == 0.0:
            self.inflight += 1
            return 0.0
        if self.waiting >= self.max_waiting:
            self.refused += 1
            return max(self.bucket.wait(), self.max_waiting / self.bucket.rate)
        self.waiting += 1
        self.waited += 1
        self.inflight += 1
        try:
            async with self._turn:  # one waiter takes the next token, in arrival order
                while (wait := self.bucket.take()) > 0.0:
                    await asyncio.sleep(wait)
        except BaseException:
            self.inflight -= 1
            raise
        finally:
            self.waiting -= 1
        return 0.0

    def done(self) -> None:
        """A request `admit` let through has ended."""
        self.inflight -= 1


class ByteQuota:
    """A node's ingest quota: payload bytes per second, with a burst. `take(n)` debits ``n``
    bytes (the balance may go below zero) and returns the seconds to wait until the balance is
    back to zero: the session sleeps that long before it reads the next frame, so a node over
    its quota is slowed down by backpressure (its window fills), never refused or dropped."""

    def __init__(self, rate: float, burst: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("an ingest quota needs a rate and a burst above 0")
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()
        self.waited = 0.0  # seconds this node was held back, in all

    def take(self, n: int) -> float:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate) - n
        self._at = now
        wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        self.waited += wait
        return wait


DEVICE_RATE = web.AppKey("device_rate", RateLimiter)
ENROL_PACER = web.AppKey("enrol_pacer", Pacer)
