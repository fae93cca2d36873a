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
* in real time its batches can be shifted by ``phase_s``: the devices of different sources are
  not synchronised, so their batches do not arrive at the same instant (which would let one
  group commit take several sources' batches, fewer commits than production pays);
* it gives a multi-field record its value columns (`value_columns`): the pipeline document the
  planner writes carries them as ``fields`` on the simulator source, which `split_fields` takes
  out before the engine validates the document, and each column gets signals of its own;
* run back to back (``realtime: false``), the sources of one engine take turns in event-time
  order (`Lockstep`), as they do in real time: otherwise each source hands over one batch per
  round, a 25 Hz source falls ever further behind a 1 Hz one, and every operator runs between
  the wrong neighbours (what runs between two calls of an operator changes its cost).

The planner builds an `Engine` from a normal pipeline document with ``type: simulator`` sources
and hands it these in their place (`plan_engine`, through the engine's ``sources=`` parameter).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext, SourceOutput
from edgewise.pipeline.engine import Engine, RouteObserver
from edgewise.pipeline.sources.simulator import SimulatorSource
from edgewise.pipeline.spec import PipelineSpec
from edgewise.plan import flows as F
from edgewise.plan.workload import SourceSpec
from edgewise.sim.signals import SignalGroup, SignalSet

# source id -> [{"name", "groups"}] per value column of a multi-field record
Fields = dict[str, list[dict[str, Any]]]


def value_columns(src: SourceSpec, site: str, fraction: float,
                  boost: float = 1.0) -> list[tuple[str, list[dict[str, Any]]]]:
    """(column, simulator groups) per value column of a source's readings: ``value`` with the
    source's signals, or each field of a multi-field record with its own; ``fraction`` of the
    sensors of every group (at least one), spikes ``boost`` times likelier."""
    cols = [(f.name, f.signal, f.decimals) for f in src.fields] or [("value", None, src.decimals)]
    out = []
    for name, signal, decimals in cols:
        groups = []
        for prefix, count, sig in F.source_groups(src, site):
            sig = signal or sig
            groups.append({
                "prefix": prefix, "count": max(1, round(count * fraction)),
                "base_low": sig.low, "base_high": sig.high, "drift": sig.drift,
                "period_s": sig.period, "noise": sig.noise,
                "spike_prob": min(1.0, sig.spike_prob * boost), "spike_value": sig.spike_value,
                "decimals": decimals,
            })
        out.append((name, groups))
    return out


def split_fields(doc: dict[str, Any]) -> Fields:
    """Take the ``fields`` of multi-field simulator sources out of a pipeline document (the
    engine's simulator does not know them); `plan_engine` gives them to the sources."""
    out: Fields = {}
    for src in doc["spec"]["sources"]:
        if "fields" in src:
            out[src["id"]] = src.pop("fields")
    return out


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
    phase_s = 0.0  # real time: every batch this much later (sources out of step)
    caught_up = False  # real time: the backlog is handed over
    pause_every = 0  # back to back: pause before every n-th batch (0: never)
    pause_s = 0.0
    paused: set[int] | None = None  # ids of the batches emitted after a pause
    columns: tuple[tuple[str, SignalSet | None], ...] = (("value", None),)  # None: the main set

    async def run(self, out: SourceOutput) -> None:
        cfg = self.config
        sig = self.signals
        if self.start_ts is None:
            self.start_ts = float(round(time.time())) if cfg.start == "now" else float(cfg.start)
            self.start_ts -= self.backlog_s
        per_s = sig.n_sensors * cfg.rate_hz * cfg.speed
        size = cfg.batch
        t0 = time.monotonic() - self.backlog_s + self.phase_s  # a backlog is due at once
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
        cols = {"sensor": sig.names[s], "ts": np.round(self.start_ts + ticks / sig.rate_hz, 6)}
        for name, other in self.columns:
            cols[name] = values if other is None else other.readings(self.produced, want)[2]
        cols[ACCEPTED] = np.full(want, time.perf_counter())
        batch = Batch(cols, want)
        self.generation_s += time.thread_time() - c0
        self.produced += want
        if paused and self.paused is not None:
            self.paused.add(id(batch))
        await out.emit(batch, {"produced": self.produced, "start_ts": self.start_ts})
        if not self.config.realtime and self.lockstep is None:
            await asyncio.sleep(0)


def plan_sources(spec: PipelineSpec, data_dir: str | Path,
                 fields: Fields | None = None) -> dict[str, PlanSimulator]:
    """A `PlanSimulator` for each simulator source of ``spec`` (by id, from its config), to run
    in their place; those that run back to back share a `Lockstep`. ``fields``: the value
    columns of multi-field sources (from `split_fields`); the first uses the source's groups."""
    ctx = RunContext(spec.name, Path(data_dir), spec.path.parent)  # as the engine makes it
    swapped: dict[str, PlanSimulator] = {}
    for c in spec.sources:
        if issubclass(c.cls, SimulatorSource):
            swapped[c.id] = sim = PlanSimulator(c.id, c.config, ctx)
            cols = (fields or {}).get(c.id)
            if cols:
                sim.columns = tuple(
                    (col["name"], None if k == 0 else SignalSet(
                        tuple(SignalGroup(**g) for g in col["groups"]),
                        c.config.seed + k, c.config.rate_hz))
                    for k, col in enumerate(cols))
    fast = [sid for sid, s in swapped.items() if not s.config.realtime]
    if len(fast) > 1:
        lockstep = Lockstep(fast)
        for sid in fast:
            swapped[sid].lockstep = lockstep
    return swapped


PHASE_STEP = 0.6180339887  # sources' batches out of step by this share of a batch gap


def out_of_step(srcs: dict[str, PlanSimulator]) -> None:
    """Shift each source's batches by a different share of its batch gap (the golden-ratio
    sequence: 0, 0.62, 0.24, 0.85, ...), as unsynchronised devices arrive; the model counts a
    group commit per batch (at most one per commit interval), not one per instant at which
    every source's batch arrives together."""
    for i, src in enumerate(srcs.values()):
        src.phase_s = (i * PHASE_STEP) % 1.0 * batch_gap(src)


FIRST_GAP_S = 10.0  # `started` waits for sources whose batches come at least this often


def batch_gap(src: PlanSimulator) -> float:
    """Seconds between a source's batches in real time."""
    cfg = src.config
    return cfg.batch / max(src.signals.n_sensors * cfg.rate_hz * cfg.speed, 1e-9)


async def started(srcs: dict[str, PlanSimulator], timeout: float = 30.0) -> None:
    """Wait until every source that hands over a batch at least every FIRST_GAP_S has handed
    over one (a 1 Hz source out of step starts up to a second late; a window it feeds holds
    nothing until then, and its snapshots cost nothing)."""
    deadline = time.monotonic() + timeout
    waiting = [s for s in srcs.values() if batch_gap(s) <= FIRST_GAP_S]
    while any(s.produced == 0 for s in waiting) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def plan_engine(spec: PipelineSpec, data_dir: str | Path, *, duration: float | None = None,
                observer: RouteObserver | None = None, fields: Fields | None = None,
                ) -> tuple[Engine, dict[str, PlanSimulator]]:
    """An engine for ``spec`` whose simulator sources are `PlanSimulator` ones (returned too)."""
    sources = plan_sources(spec, data_dir, fields)
    engine = Engine(spec, data_dir, duration=duration, observer=observer, sources=sources)
    return engine, sources


def generation_s(sources: dict[str, Any]) -> float:
    return sum(s.generation_s for s in sources.values())
