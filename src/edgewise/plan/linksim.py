"""The link model against the outbox: outages, backlog, drain and loss. Pure (numpy, seeded).

The link is down for the longest outage the workload must survive (starting on day 3) plus
shorter outages drawn at random until the downtime matches the availability. Every step the
edge produces its stored bytes per priority; while the link is up the outbox drains at the
usable uplink rate, highest priority first, oldest first (like ``Outbox.peek``). When the
outbox is full, `edgewise.outbox.policy.choose_evictions` (the agent's own rule) decides
what is compacted or dropped. The same run is repeated with the engine's default outbox size
and with none, to show what the planned size buys. A second link (`SecondRoute`: failover while
the first is down, or an offload window every day) adds its expected rate.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgewise.outbox import PRIORITIES
from edgewise.outbox.policy import StoredChunk, choose_evictions

MAX_STEPS = 10_000
DAY = 86400.0


@dataclass(frozen=True)
class StreamLoad:
    name: str
    priority: str
    compact: bool
    stored_per_s: float  # bytes per second written to the outbox


@dataclass
class LinkResult:
    horizon_s: float
    step_s: float
    outages: list[tuple[float, float]]  # (start, duration) in seconds
    downtime_share: float
    capacity_bytes: int
    max_backlog: float
    lost_bytes: dict[str, float]  # per kind: alarm | data | raw
    produced_bytes: dict[str, float]
    drain_s: float  # after the longest outage
    times: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    backlog: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    by_capacity: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def lost_share(self) -> float:
        total = sum(self.produced_bytes.values())
        return sum(self.lost_bytes.values()) / total if total else 0.0


def schedule(availability: float, longest: float, seed: int = 17) -> tuple[float, list[tuple[
        float, float]]]:
    """(horizon, outages): the longest outage on day 3, plus random shorter ones."""
    down = max(1e-6, 1.0 - availability)
    horizon = max(30 * DAY, longest / down if longest > 0 else 0.0, 4 * DAY + longest)
    outages: list[tuple[float, float]] = []
    if longest > 0:
        outages.append((3 * DAY, longest))
    budget = down * horizon - longest
    rng = np.random.default_rng(seed)
    mean = max(60.0, min(longest / 6 if longest else 600.0, 3600.0))
    while budget > mean / 2:
        d = float(min(rng.exponential(mean), budget, longest or mean))
        start = float(rng.uniform(0, horizon - d))
        if any(s <= start + d and start <= s + ln for s, ln in outages):
            continue
        outages.append((start, d))
        budget -= d
    outages.sort()
    return horizon, outages


@dataclass(frozen=True)
class SecondRoute:
    """A second link the site's router switches to (the node's session reconnects through
    whichever link is up; the agent itself keeps one uplink): ``failover`` carries the data
    while the first link is down, ``offload`` adds its rate in a daily window. Its own outages
    are counted as an expected share: its rate times its availability."""

    role: str  # failover | offload
    bytes_per_s: float  # usable for data
    availability: float
    window_start_s: float = 0.0  # offload: seconds after midnight UTC
    window_s: float = 0.0  # offload: the window's length

    @property
    def expected_per_s(self) -> float:
        return self.bytes_per_s * self.availability


def route_rates(t: np.ndarray, up: np.ndarray, uplink_bytes_per_s: float,
                second: SecondRoute | None) -> np.ndarray:
    """Bytes per second the site can send at each step: the first link while it is up, a
    failover link while it is down, plus an offload link in its daily window."""
    rates = np.where(up, uplink_bytes_per_s, 0.0)
    if second is None:
        return rates
    if second.role == "failover":
        return np.where(up, rates, second.expected_per_s)
    into_day = (t - second.window_start_s) % DAY
    return rates + np.where(into_day < second.window_s, second.expected_per_s, 0.0)


def simulate_link(streams: list[StreamLoad], kinds: dict[str, str], uplink_bytes_per_s: float,
                  availability: float, longest: float, capacity: int,
                  compare: dict[str, int] | None = None,
                  second: SecondRoute | None = None) -> LinkResult:
    """Run the link model. ``kinds`` maps stream name to alarm / data / raw; ``second``: a
    second link (`SecondRoute`), none by default."""
    horizon, outages = schedule(availability, longest)
    step = max(1.0, horizon / MAX_STEPS)
    if longest > 0:
        step = min(step, max(1.0, longest / 200))
    steps = math.ceil(horizon / step)
    t = np.arange(steps) * step
    up = np.ones(steps, dtype=bool)
    for start, dur in outages:
        up[(t >= start) & (t < start + dur)] = False
    rates = route_rates(t, up, uplink_bytes_per_s, second)
    result = _run(streams, kinds, rates, capacity, step)
    res = LinkResult(
        horizon, step, outages, float(1 - up.mean()), capacity, float(result[0].max()),
        result[1], result[2], _drain_after(result[0], up, t, outages), t, result[0],
    )
    for label, cap in (compare or {}).items():
        _, lost, _ = _run(streams, kinds, rates, cap, step)
        res.by_capacity[label] = lost
    return res


def _run(streams: list[StreamLoad], kinds: dict[str, str], rates: np.ndarray, capacity: int,
         step: float) -> tuple[np.ndarray, dict[str, float], dict[str, float]]:
    prio = {s.name: PRIORITIES[s.priority] for s in streams}
    queues: dict[int, deque[list]] = {}  # priority -> deque of [id, stream, bytes, compactable]
    used = 0.0
    next_id = 0
    lost: dict[str, float] = {k: 0.0 for k in set(kinds.values())}
    produced: dict[str, float] = {k: 0.0 for k in set(kinds.values())}
    backlog = np.zeros(len(rates))
    for i in range(len(rates)):
        for s in streams:
            nbytes = s.stored_per_s * step
            if nbytes <= 0:
                continue
            kind = kinds[s.name]
            produced[kind] += nbytes
            p = prio[s.name]
            if capacity <= 0:
                if rates[i] <= 0:
                    lost[kind] += nbytes
                    continue
            elif used + nbytes > capacity:
                stored = [StoredChunk(c[0], pr, int(c[2]), c[3])
                          for pr in sorted(queues) for c in queues[pr]]
                evictions, accept = choose_evictions(stored, int(used), int(nbytes), p,
                                                     capacity)
                for ev in evictions:
                    if used + nbytes <= capacity:
                        break
                    for pr, q in queues.items():
                        for c in q:
                            if c[0] != ev.chunk_id:
                                continue
                            if ev.action == "compact":
                                used -= c[2] - c[2] / 10
                                lost[kinds[c[1]]] += c[2] - c[2] / 10
                                c[2] /= 10
                                c[3] = False
                            else:
                                used -= c[2]
                                lost[kinds[c[1]]] += c[2]
                                c[2] = 0.0
                        queues[pr] = deque(c for c in q if c[2] > 0)
                if not accept or used + nbytes > capacity:
                    lost[kind] += nbytes
                    continue
            queues.setdefault(p, deque()).append([next_id, s.name, nbytes, s.compact])
            next_id += 1
            used += nbytes
        if rates[i] > 0:
            budget = rates[i] * step
            for pr in sorted(queues, reverse=True):
                q = queues[pr]
                while q and budget > 0:
                    c = q[0]
                    take = min(budget, c[2])
                    c[2] -= take
                    budget -= take
                    used -= take
                    if c[2] <= 1e-9:
                        q.popleft()
        backlog[i] = max(0.0, used)
    return backlog, lost, produced


def _drain_after(backlog: np.ndarray, up: np.ndarray, t: np.ndarray,
                 outages: list[tuple[float, float]]) -> float:
    if not outages:
        return 0.0
    longest = max(outages, key=lambda o: o[1])
    end = longest[0] + longest[1]
    after = np.flatnonzero((t >= end) & (backlog <= backlog.max() * 1e-3 + 1.0))
    if len(after) == 0:
        return math.inf
    return float(t[after[0]] - end)
