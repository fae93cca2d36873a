"""The planner's stand-in for a site's sensors: the `simulator` source with production batching.

`PlanSimulator` is the engine's `SimulatorSource` (same signals, names, seeds and positions) with
two differences the planner needs to measure CPU honestly:

* it hands the engine the batches production would: ``batch`` readings at a time, every
  ``batch / (sensors * rate)`` seconds when real-time (an MQTT source lingering 5 ms collects
  that many), where the plain simulator releases whatever is due, often one tick at a time;
* it counts the CPU it spends making the synthetic readings (``generation_s``, thread CPU), so
  the planner can subtract it: on a node, the protocol source does that work, and the planner
  models it separately (`edgewise.plan.cost_model.INGEST_US`);
* in real time it can start with a backlog (``backlog_s`` of readings handed over at once), so
  that operators whose state grows over a window (percentiles) are measured at the size their
  state has in steady operation, not after two seconds;
* run back to back (``realtime: false``), the sources of one engine take turns in event-time
  order (`Lockstep`), as they do in real time: otherwise each source hands over one batch per
  round, a 25 Hz source falls ever further behind a 1 Hz one, and every operator runs between
  the wrong neighbours (what runs between two calls of an operator changes its cost).

The planner builds an `Engine` from a normal pipeline document with ``type: simulator`` sources
and swaps these in with `install` before running it.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import SourceOutput
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.sources.simulator import SimulatorSource


class Lockstep:
    """Lets the fast-forward sources of one engine emit in event-time order."""

    def __init__(self, sources: list[str]) -> None:
        self.next: dict[str, float] = dict.fromkeys(sources, -math.inf)
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created in the running loop
            self._cond = asyncio.Condition()
        return self._cond

    async def turn(self, source: str, ts: float) -> None:
        """Wait until no other source has readings older than ``ts`` still to hand over."""
        cond = self._condition()
        async with cond:
            self.next[source] = ts
            cond.notify_all()
            await cond.wait_for(lambda: ts <= min(self.next.values()))

    async def leave(self, source: str) -> None:
        cond = self._condition()
        async with cond:
            self.next.pop(source, None)
            cond.notify_all()


class PlanSimulator(SimulatorSource):
    """A simulator source that emits fixed-size batches and counts its own CPU."""

    generation_s = 0.0  # thread CPU spent making readings and batches
    lockstep: Lockstep | None = None
    backlog_s = 0.0  # real time: start this far in the past and hand the backlog over at once
    caught_up = False  # real time: the backlog is handed over
    pause_every = 0  # back to back: pause before every n-th batch (0: never)
    pause_s = 0.0
    paused: set[int] | None = None  # ids of the batches emitted after a pause

    async def run(self, out: SourceOutput) -> None:
        cfg = self.config
        sig = self.signals
        if self.start_ts is None:
            self.start_ts = float(round(time.time())) if cfg.start == "now" else float(cfg.start)
            self.start_ts -= self.backlog_s
        per_s = sig.n_sensors * cfg.rate_hz * cfg.speed
        size = cfg.batch
        t0 = time.monotonic() - self.backlog_s  # a backlog is due at once
        first0 = self.produced
        try:
            while cfg.limit is None or self.produced < cfg.limit:
                want = size if cfg.limit is None else min(size, cfg.limit - self.produced)
                if cfg.realtime:
                    due = t0 + (self.produced + want - first0) / per_s
                    if due > time.monotonic():
                        self.caught_up = True
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                elif self.lockstep is not None:
                    tick = self.produced // sig.n_sensors
                    await self.lockstep.turn(self.id, self.start_ts + tick / sig.rate_hz)
                pause = self.pause_every and (self.produced // size) % self.pause_every == \
                    self.pause_every - 1
                if pause:
                    await asyncio.sleep(self.pause_s)  # as in real time: idle, then a batch
                await self._emit_batch(out, want, bool(pause))
        finally:
            if self.lockstep is not None:
                await asyncio.shield(self.lockstep.leave(self.id))

    async def _emit_batch(self, out: SourceOutput, want: int, paused: bool = False) -> None:
        sig = self.signals
        assert self.start_ts is not None
        c0 = time.thread_time()
        s, ticks, values = sig.readings(self.produced, want)
        batch = Batch(
            {
                "sensor": sig.names[s],
                "ts": np.round(self.start_ts + ticks / sig.rate_hz, 6),
                "value": values,
                ACCEPTED: np.full(want, time.perf_counter()),
            },
            want,
        )
        self.generation_s += time.thread_time() - c0
        self.produced += want
        if paused and self.paused is not None:
            self.paused.add(id(batch))
        await out.emit(batch, {"produced": self.produced, "start_ts": self.start_ts})
        if not self.config.realtime and self.lockstep is None:
            await asyncio.sleep(0)


def install(engine: Engine) -> dict[str, PlanSimulator]:
    """Replace the engine's simulator sources (before `run`) with `PlanSimulator` ones; those
    that run back to back share a `Lockstep`."""
    swapped: dict[str, PlanSimulator] = {}
    for sid, src in list(engine.sources.items()):
        if isinstance(src, SimulatorSource):
            new = PlanSimulator(sid, src.config, engine.ctx)
            engine.sources[sid] = new
            swapped[sid] = new
    fast = [sid for sid, s in swapped.items() if not s.config.realtime]
    if len(fast) > 1:
        lockstep = Lockstep(fast)
        for sid in fast:
            swapped[sid].lockstep = lockstep
    return swapped


def generation_s(sources: dict[str, Any]) -> float:
    return sum(s.generation_s for s in sources.values())
