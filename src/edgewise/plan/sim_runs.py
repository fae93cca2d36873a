"""The engine runs of `--simulate`: the processing-cost run (`CpuRun`), the realtime run
(`realtime_run`), and how their CPU is accounted for.

Each run is an `Engine` with the planner's `PlanSimulator` sources (`edgewise.plan.source`);
what it watches, it watches through the engine's supported hooks (an observer of routed batches)
and by timing the operators' calls. `edgewise.plan.simulate` says what the runs are for.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.engine import Engine, RouteObserver
from edgewise.pipeline.spec import parse_pipeline
from edgewise.plan.gc_cost import GcWatch
from edgewise.plan.sim_pipeline import CPU_SEGMENTS, PROBE, START_TS
from edgewise.plan.source import (
    PlanSimulator,
    out_of_step,
    plan_engine,
    split_fields,
    started,
)


def _timed(op: Any, acc: dict[str, float], sid: str, names: tuple[str, ...]) -> None:
    for name in names:
        fn = getattr(op, name)

        def wrapper(*args: Any, _fn: Callable[..., Any] = fn, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return _fn(*args, **kw)
            finally:
                acc[sid] += time.thread_time() - t0

        setattr(op, name, wrapper)


def sim_engine(doc: dict[str, Any], data: Path, observer: RouteObserver | None = None
               ) -> tuple[Engine, dict[str, PlanSimulator]]:
    """An engine for a pipeline document, with `PlanSimulator` sources (returned too)."""
    doc = copy.deepcopy(doc)
    fields = split_fields(doc)
    spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False), f"<{doc['metadata']['name']}>")
    return plan_engine(spec, data, observer=observer, fields=fields)


def run_engine(doc: dict[str, Any], data: Path) -> tuple[Engine, dict[str, Any]]:
    """Run a pipeline document to its end; the engine and its summary."""
    engine, _srcs = sim_engine(doc, data)
    return engine, asyncio.run(engine.run())


class CpuRun:
    """The processing-cost run: back to back, the batches of production; per stage, (event time
    of the source batch, thread CPU) of every call. ``at_turn(k)`` is called at ``turns``
    evenly spaced points of event time (in the engine's thread, which it may block: the
    planner's calibration takes its turns there)."""

    def __init__(self, doc: dict[str, Any], work: Path, segment: float,
                 at_turn: Callable[[int], None] | None = None, turns: int = 1) -> None:
        self.doc = doc
        self.work = work
        self.segment = segment
        self.turns = turns
        self.at_turn = at_turn or (lambda _k: None)
        self.samples: dict[str, list[tuple[float, float]]] = {}

    def run(self) -> None:
        clock = [START_TS]
        seen = [0]
        step = self.segment * CPU_SEGMENTS / self.turns
        sources = {src["id"] for src in self.doc["spec"]["sources"]}

        def observe(node: str, port: str, batch: Batch) -> None:
            if node in sources and batch.n and "ts" in batch.columns:
                clock[0] = float(batch.columns["ts"][-1])
                k = min(self.turns - 1, int((clock[0] - START_TS) // step))
                while seen[0] < k:
                    seen[0] += 1
                    self.at_turn(seen[0])

        engine, _srcs = sim_engine(self.doc, self.work, observer=observe)
        self.samples = {sid: [] for sid in engine.stages}
        watch = GcWatch()  # full collections are the node's, not a stage's (gc_cost)
        for sid, op in engine.stages.items():
            fn = op.process

            def process(batch: Batch, _fn: Callable[..., Any] = fn,
                        _out: list[tuple[float, float]] = self.samples[sid]) -> Any:
                f0 = watch.full_s()
                t0 = time.thread_time()
                try:
                    return _fn(batch)
                finally:
                    _out.append((clock[0], time.thread_time() - t0 - (watch.full_s() - f0)))

            op.process = process  # type: ignore[method-assign]
            inner = getattr(op, "inner", None)  # a user function: its calls run in a thread
            if inner is not None and callable(getattr(inner, "process", None)):
                fn_inner = inner.process

                def inner_process(batch: Batch, _fn: Callable[..., Any] = fn_inner,
                                  _out: list[tuple[float, float]] = self.samples[sid]) -> Any:
                    f0 = watch.full_s()
                    t0 = time.thread_time()  # in the stage's worker thread
                    try:
                        return _fn(batch)
                    finally:
                        _out.append((clock[0],
                                     time.thread_time() - t0 - (watch.full_s() - f0)))

                inner.process = inner_process
        self.at_turn(0)
        with watch:
            asyncio.run(engine.run())
        while seen[0] < self.turns - 1:
            seen[0] += 1
            self.at_turn(seen[0])


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """Pin this thread (and the threads it starts) to the CPU it runs on, then unpin it. Where
    that is not possible (not Linux), do nothing."""
    get = getattr(os, "sched_getaffinity", None)
    put = getattr(os, "sched_setaffinity", None)
    if get is None or put is None:
        yield
        return
    before = get(0)
    cpu = min(before)
    with contextlib.suppress(OSError, ValueError, IndexError):
        cpu = int(Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()[36])
    try:
        put(0, {cpu} if cpu in before else {min(before)})
    except OSError:
        yield
        return
    try:
        yield
    finally:
        put(0, before)


def segment_costs(samples: list[tuple[float, float]], start: float, segment: float,
                  segments: int) -> list[float]:
    """Thread CPU per segment of event time (``segments`` of ``segment`` seconds from
    ``start``; a call belongs to the segment of the source batch it serves)."""
    out = [0.0] * segments
    for t, c in samples:
        k = int((t - start) // segment)
        if 0 <= k < segments:
            out[k] += c
    return out


def segment_rate(costs: list[float], segment: float) -> tuple[float, float]:
    """Microseconds per event second from per-segment costs: the first segment is warm-up, the
    rest are repetitions. Their mean counts (the calibration took turns with them, so the two
    see the same mixture of fast and slow moments of a shared machine); their spread,
    (max - min) / mean, says how steady the machine was."""
    rest = np.array(costs[1:]) * 1e6 / segment
    mean = float(np.mean(rest)) if len(rest) else 0.0
    return mean, float((rest.max() - rest.min()) / mean) if mean > 0 else 0.0


def anchor_start(srcs: dict[str, PlanSimulator], backlog: float, window: float,
                 at: float) -> None:
    """Event time for the realtime run: ``backlog`` seconds in the past, shifted (later event
    times lag the clock by less than ``window``) so that at ``at`` seconds after the start,
    the middle of the measurement, a ``window`` (the longest whose state grows with it: values
    kept for percentiles) is half full: the state it has on average over its length. Without
    it the measured snapshot cost depended on where the clock happened to fall in the window
    (on the retail store, 864 or 4,000 of a 5-minute window's 4,800 values)."""
    now = float(round(time.time()))
    lag = (now + at - window / 2) % window if window > 0 else 0.0
    for src in srcs.values():
        src.start_ts = now - backlog - lag


def realtime_run(doc: dict[str, Any], data: Path, warm: float, span: float,
                 backlog: float = 0.0, window: float = 0.0
                 ) -> tuple[Engine, dict[str, Any], float, float, float, float]:
    """Run at the real pace; the process CPU of the steady part (after ``warm`` seconds, for
    ``span`` seconds) without the simulator's own work and the latency probe's, its wall time,
    the simulator's CPU in it, and the wall time of the whole run. With a ``backlog``, the
    sources start that many seconds in the past and the warm-up begins once it is handed over
    (operator state then has its steady size); ``window``: see `anchor_start`. The sources'
    batches are out of step (`out_of_step`)."""
    engine, srcs = sim_engine(doc, data)
    for src in srcs.values():
        src.backlog_s = backlog
    out_of_step(srcs)
    anchor_start(srcs, backlog, window, warm + span / 2)
    probe = {PROBE: 0.0}
    if PROBE in engine.stages:
        # its calls and its state in every group commit's snapshot
        _timed(engine.stages[PROBE], probe, PROBE, ("process", "on_timer", "snapshot"))
    if f"{PROBE}-sink" in engine.sinks:
        _timed(engine.sinks[f"{PROBE}-sink"], probe, PROBE, ("write",))
    marks: list[tuple[float, float, float, float]] = []

    def mark() -> None:
        marks.append((time.process_time(), time.perf_counter(),
                      sum(s.generation_s for s in srcs.values()), probe[PROBE]))

    async def main() -> dict[str, Any]:
        task = asyncio.create_task(engine.run())
        while backlog and not all(s.caught_up for s in srcs.values()) and not task.done():
            await asyncio.sleep(0.01)
        await started(srcs)
        await asyncio.sleep(warm)
        mark()
        await asyncio.sleep(span)
        mark()
        engine.stop()
        return await task

    t0 = time.perf_counter()
    summary = asyncio.run(main())
    total = time.perf_counter() - t0
    (c0, w0, g0, p0), (c1, w1, g1, p1) = marks
    cpu = (c1 - c0) - (g1 - g0) - (p1 - p0)
    return engine, summary, cpu, w1 - w0, g1 - g0, total
