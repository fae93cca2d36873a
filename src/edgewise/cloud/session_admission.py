"""Admission of session upgrades (issue 11, the reconnect storm): a queue, then a 429.

After a restart every node of the fleet upgrades to its session within seconds. Each
upgrade's hello costs a read transaction and a welcome; a node whose welcome takes longer than
its welcome timeout (10 s) gives up and connects again, and the server goes on working for a
session nobody waits for. So the sessions *starting* (upgraded, hello not answered yet) are
bounded by what this process answers in `STARTING_WAIT` seconds at its measured welcome rate
(at least `MIN_STARTING`, at most `MAX_STARTING`).

An upgrade beyond that bound has already paid for its TLS handshake, the dearest part of a
reconnect. It therefore **waits** for a start slot, first come first served, for up to
`ADMIT_WAIT` seconds (well inside the node's 20 s upgrade timeout; at most `MAX_WAITING`
upgrades at once, each an open TLS connection); a slot freed by a welcome or an ended session
goes straight to the longest waiter. Only an upgrade whose wait runs out (or that finds the
line full) is told when to come back: the device API's 429 with ``Retry-After``, the time the
sessions starting and waiting take at the measured welcome rate. The line is bounded by time,
not by that rate: before the first welcomes the rate is a guess, and a line sized by it
(16 a second then) turned most of a 2,000-node storm away although the process answered 150 a
second. Before this queue every upgrade over the bound got a 429 (1,677 of them in a
2,000-node storm here), its node waited out the ``Retry-After`` on top of its growing backoff,
and the last tenth of the fleet came back a minute after the rest (docs/benchmarks.md,
"The reconnect storm's queue").
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

# sessions waiting for their hello's answer: what this process answers in STARTING_WAIT s,
# within MIN_STARTING..MAX_STARTING
STARTING_WAIT = 4.0
MIN_STARTING = 256
MAX_STARTING = 4096
# an upgrade over that bound waits up to ADMIT_WAIT s for a slot, MAX_WAITING at most at once
ADMIT_WAIT = 5.0
MAX_WAITING = 4096
# a 429's Retry-After: the line's time at the measured rate, within 1..MAX_RETRY_AFTER s (a
# rate measured in a storm's first seconds can be tiny; unbounded, it once told 208 nodes to
# come back in many minutes)
MAX_RETRY_AFTER = 10.0


class StartAdmission:
    """The sessions starting now, the welcome rate, and the upgrades waiting for a slot."""

    def __init__(self, *, admit_wait: float = ADMIT_WAIT) -> None:
        # the upgrade's TLS handshake is paid: waiting beats a retry with another handshake
        self.admit_wait = admit_wait
        self.starting = 0  # upgrades admitted whose hello is not answered yet
        self.welcome_rate: float | None = None  # hellos answered per second, smoothed
        self.waited = 0  # upgrades admitted after waiting for a slot (in all)
        self.refused = 0  # upgrades told to retry (in all)
        self._waiters: deque[asyncio.Future[None]] = deque()  # cancelled ones skipped
        self.waiting = 0  # upgrades in line for a slot now
        self._welcomed = 0
        self._rate_since = time.monotonic()

    def _rate(self) -> float:
        now = time.monotonic()
        if now - self._rate_since >= 1.0:
            sample = self._welcomed / (now - self._rate_since)
            if self.welcome_rate is not None:
                self.welcome_rate = 0.5 * self.welcome_rate + 0.5 * sample
            elif sample > 0:  # the first second with welcomes
                self.welcome_rate = sample
            self._welcomed, self._rate_since = 0, now
        return self.welcome_rate or MIN_STARTING / STARTING_WAIT

    def limit(self) -> int:
        return max(MIN_STARTING, min(MAX_STARTING, int(self._rate() * STARTING_WAIT)))

    async def admit(self) -> float:
        """Admit one upgrade: 0.0 once it holds a start slot (give it back with `ended`),
        after waiting in line if need be; else the seconds after which to retry (nothing
        held). Cancellation while waiting gives back a slot handed over meanwhile."""
        self._fill()
        rate, limit = self._rate(), self.limit()
        waiting = self.waiting
        if self.starting < limit and not waiting:
            self.starting += 1
            return 0.0
        if waiting >= MAX_WAITING:
            self.refused += 1
            return self._retry_after(rate)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.admit_wait):
                await asyncio.shield(fut)
        except TimeoutError:
            if fut.done():  # handed a slot as the wait ran out: it is ours
                self.waited += 1
                return 0.0
            fut.cancel()
            self.waiting -= 1
            self.refused += 1
            return self._retry_after(rate)
        except asyncio.CancelledError:
            if fut.done():
                self.ended(welcomed=False)  # the slot handed over goes to the next in line
            else:
                fut.cancel()
                self.waiting -= 1
            raise
        self.waited += 1
        return 0.0

    def _retry_after(self, rate: float) -> float:
        line = (self.starting + self.waiting) / max(rate, MIN_STARTING / STARTING_WAIT)
        return min(MAX_RETRY_AFTER, max(1.0, line))

    def ended(self, *, welcomed: bool) -> None:
        """An admitted upgrade's start is over: its hello was answered (``welcomed``) or its
        session ended before that. The slot goes to the longest waiter, if any."""
        if welcomed:
            self._welcomed += 1
        self.starting -= 1
        self._fill()

    def _fill(self) -> None:
        """Hand free slots to the longest waiters."""
        if not self.waiting:  # what is left in the deque gave up waiting: drop it
            self._waiters.clear()
            return
        limit = self.limit()
        while self._waiters and self.starting < limit:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.starting += 1
                self.waiting -= 1
