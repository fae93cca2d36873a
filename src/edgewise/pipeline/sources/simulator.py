"""Simulated sensors: the reference factory line or your own signal groups, seeded.

Real-time by default (readings appear at their sample rate, stamped with wall-clock event time);
``realtime: false`` produces as fast as the engine takes them. ``limit`` makes the source finite.
Its position is the number of readings produced, so a restart continues the same sequence.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Source, SourceOutput
from edgewise.sim.signals import FACTORY_LINE, FACTORY_RATE_HZ, SignalGroup, SignalSet


class GroupConfig(ComponentConfig):
    prefix: str
    count: int = Field(ge=1, le=100_000)
    base_low: float = 40.0
    base_high: float = 80.0
    drift: float = 5.0
    period_s: float = Field(default=600.0, gt=0)
    noise: float = Field(default=0.5, ge=0)
    spike_prob: float = Field(default=0.001, ge=0, le=1)
    spike_value: float = 100.5
    decimals: int = Field(default=2, ge=0, le=6)


class SimulatorConfig(ComponentConfig):
    profile: Literal["factory-line", "custom"] = "factory-line"
    """factory-line: the reference workload (200 sensors); custom: the signal groups listed in
    groups."""
    seed: int = 42
    """Seed of the generated values: the same seed gives the same readings."""
    rate_hz: float = Field(default=FACTORY_RATE_HZ, gt=0, le=100_000)
    """Readings per second of each sensor (its sample rate)."""
    groups: list[GroupConfig] = []
    """profile: custom: the signal groups (prefix, count, base_low, base_high, drift, period_s,
    noise, spike_prob, spike_value, decimals)."""
    realtime: bool = True
    """true: readings appear at their sample rate; false: as fast as the engine takes them."""
    speed: float = Field(default=1.0, gt=0)
    """With realtime: a multiple of the sample rate to produce at (2: twice as fast)."""
    limit: int | None = Field(default=None, ge=0)
    """Stop after this many readings in all (the source is then finite); none: run until
    stopped."""
    start: float | Literal["now"] = "now"
    """Event time of the first reading, in Unix seconds; now: the wall-clock time the source
    starts."""
    batch: int = Field(default=4096, ge=1)
    """Readings per emitted batch, at most."""


class SimulatorSource(Source):
    Config = SimulatorConfig

    def __init__(self, id: str, config: SimulatorConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        if config.profile == "factory-line":
            groups = FACTORY_LINE
        else:
            groups = tuple(SignalGroup(**g.model_dump()) for g in config.groups)
        self.signals = SignalSet(groups, config.seed, config.rate_hz)
        self.finite = config.limit is not None
        self.produced = 0
        self.first_index = 0  # index of the first reading of this run (restarts continue)
        self.start_ts: float | None = None

    def restore(self, position: Any) -> None:
        self.produced = self.first_index = int(position["produced"])
        self.start_ts = float(position["start_ts"])

    def stats(self) -> dict[str, Any]:
        return {"first_index": self.first_index, "next_index": self.produced}

    async def run(self, out: SourceOutput) -> None:
        cfg = self.config
        sig = self.signals
        if self.start_ts is None:
            self.start_ts = float(round(time.time())) if cfg.start == "now" else float(cfg.start)
        limit = cfg.limit
        t0 = time.monotonic()
        first0 = self.produced
        per_s = sig.n_sensors * cfg.rate_hz * cfg.speed
        while limit is None or self.produced < limit:
            want = cfg.batch if limit is None else min(cfg.batch, limit - self.produced)
            if cfg.realtime:
                due = int((time.monotonic() - t0) * per_s) + first0
                # release whole ticks only: all sensors sample at the same instant
                due -= due % sig.n_sensors
                if due <= self.produced:
                    next_tick = (self.produced - first0 + sig.n_sensors) / per_s
                    await asyncio.sleep(max(0.0, t0 + next_tick - time.monotonic()))
                    continue
                want = min(want, due - self.produced)
            s, ticks, values = sig.readings(self.produced, want)
            ts = np.round(self.start_ts + ticks / sig.rate_hz, 6)
            batch = Batch(
                {
                    "sensor": sig.names[s],
                    "ts": ts,
                    "value": values,
                    ACCEPTED: np.full(want, time.perf_counter()),
                },
                want,
            )
            self.produced += want
            await out.emit(batch, {"produced": self.produced, "start_ts": self.start_ts})
            if not cfg.realtime:
                await asyncio.sleep(0)
