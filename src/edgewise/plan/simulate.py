"""`--simulate`: run the real engine on synthetic data and measure what the model estimated.

For each site type the edge part of the placed pipeline is generated with one `simulator`
source per workload source (same sensors, rates, resolution and signal statistics; the planner's
`PlanSimulator` hands over the batches production would) and run three times with
`Engine(...).run()`:

1. a *throughput* run (``realtime: false``, big batches, finite): long enough for every window
   to close a few times; gives the records each stage emits and, read back from the outbox and
   encoded with the wire codec one chunk per stream per uplink interval, the bytes the uplink
   carries;
2. a *processing-cost* run (``realtime: false``, the batches of production): thread CPU
   (``time.thread_time``) around every operator call, each call filed under the event time of
   the source batch it serves. The run is thirteen equal segments of event time (whole windows
   when they fit); the first is warm-up and dropped. The calibration of the CPU model runs in
   turns with the segments (`edgewise.plan.site_calibration.Turns`): the speed of a shared machine
   changes from one second to the next, and this way the estimate and the measurement see
   the same machine;
3. a *realtime* run at the workload's real rate: the process CPU (``time.process_time``) over
   its steady part, minus the simulator's own work and the latency probe's, for node sizing;
   the accept-to-local-action latency of alarms (and of a cheap probe stage beside them, so
   that rare alarms still give a distribution), and the outbox fill rate.

Large workloads are sampled: fewer sensors per group (the same fraction everywhere) and the
results scaled back; the fraction is reported. Then the link model runs against the outbox
(`edgewise.plan.linksim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgewise.edge.outbox import Outbox
from edgewise.errors import EdgewiseError
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.spec import parse_pipeline
from edgewise.plan import flows as F
from edgewise.plan.cost_model import StageCost
from edgewise.plan.costs import Costs
from edgewise.plan.linksim import LinkResult, StreamLoad, simulate_link
from edgewise.plan.model import (
    DATA_SHARE,
    DEFAULT_OUTBOX,
    STORE_OVERHEAD,
    Calibration,
    Plan,
    SitePlan,
    apply_measurement,
    reestimate,
)
from edgewise.plan.model import source_batches as _source_batches
from edgewise.plan.source import install
from edgewise.plan.workload import SourceSpec
from edgewise.sim.signals import SignalGroup, SignalSet

log = logging.getLogger(__name__)

START_TS = 1_764_547_200.0  # 2025-12-01T00:00:00Z, a multiple of every common window size
SEED = 42
THROUGHPUT_BUDGET = 4_000_000  # readings in the throughput run
REALTIME_S = 2.0  # measured span of the realtime run
REALTIME_WARM_S = 0.5  # not measured: start-up, first commits
REALTIME_MAX_RATE = 250_000.0  # readings/s in the realtime run
MAX_BACKLOG_S = 600.0  # seconds of readings the realtime run may start with
MIN_DURATION_S = 10.0
CPU_RUN_S = 1.5  # thread CPU the processing-cost run may take (by the estimate)
CPU_SEGMENTS = 13  # the first is warm-up
CPU_TURNS = 48  # the calibration's turns during the processing-cost run
CPU_MIN_EVENT_S = 3.0  # event seconds at least, else the workload is sampled
CPU_MAX_EVENT_S = 6 * 3600.0
PROBE_PER_S = 2_000.0  # latency probe samples per second
PROBE = "latency-probe"


MEASURED_METHOD = (
    "thread CPU of every operator call in the engine on synthetic data, in the batches of "
    "production, back to back over {segments} segments after a warm-up, the calibration taking "
    "turns with them on the same CPU; node cores from the process CPU of {seconds:.1f} s at "
    "the real rate, the simulator's own work left out")


@dataclass
class SiteMeasurement:
    site: str
    sample_fraction: float
    throughput_s: float  # event-time seconds in the throughput run
    throughput_readings: int
    realtime_readings: int
    realtime_wall_s: float  # the measured span of the realtime run
    realtime_fraction: float
    stage_out: dict[str, float]
    stage_cpu_us: dict[str, float]
    stream_records: dict[str, float]
    stream_wire: dict[str, float]
    stream_payload: dict[str, float]
    raw_wire: float
    stored_per_s: float
    latency_s: np.ndarray
    latency_source: str
    cores_total: float
    generation_cpu_s: float
    late: int
    cpu_event_s: float = 0.0  # event seconds of the processing-cost run
    cpu_segment_s: float = 0.0
    cpu_fraction: float = 1.0
    stage_cpu_spread: dict[str, float] | None = None  # (max-min)/median over the segments
    stage_costs: dict[str, StageCost] | None = None  # calibrated beside the measurement


# -- the pipeline ----------------------------------------------------------------------------------

def _groups(src: SourceSpec, site: str, fraction: float, boost: float = 1.0) -> list[dict]:
    out = []
    for prefix, count, sig in F.source_groups(src, site):
        out.append({
            "prefix": prefix, "count": max(1, round(count * fraction)),
            "base_low": sig.low, "base_high": sig.high, "drift": sig.drift,
            "period_s": sig.period, "noise": sig.noise,
            "spike_prob": min(1.0, sig.spike_prob * boost), "spike_value": sig.spike_value,
            "decimals": src.decimals,
        })
    return out


def edge_pipeline(sp: SitePlan, fraction: float, *, realtime: bool, limit_s: float | None,
                  probe: bool, sync: str, big_batches: bool = False) -> dict[str, Any]:
    """The edge part of a site's pipeline with simulator sources (a Pipeline document)."""
    sources = []
    for src in sp.site.sources:
        groups = _groups(src, sp.name, fraction)
        n = sum(g["count"] for g in groups)
        entry: dict[str, Any] = {
            "id": src.id, "type": "simulator", "profile": "custom", "seed": SEED,
            "rate_hz": src.rate_hz, "groups": groups, "realtime": realtime,
            "start": START_TS if not realtime else "now",
            # the batch the engine gets in production: one tick of all sensors, or what
            # arrives within the linger time (see flows.batch_records)
            "batch": F.MAX_BATCH if big_batches else F.batch_records(
                src.count * src.rate_hz, src.count, src.protocol),
        }
        if limit_s is not None:
            entry["limit"] = round(limit_s * src.rate_hz) * n
        sources.append(entry)
    stages: list[dict[str, Any]] = []
    sinks: list[dict[str, Any]] = []
    alarm_inputs: list[str] = []
    for st in sp.stages:
        where = sp.where(st.id)
        if where not in ("edge", "split"):
            continue
        if st.function is not None:
            raise EdgewiseError(
                f"stage {st.id!r} is a user function ({st.function}); the simulation runs "
                "built-in operators only")
        stages.append({"id": st.id, "type": st.operator, "inputs": list(st.inputs),
                       **st.params})
        if st.local is not None or st.operator in ("threshold", "anomaly"):
            sinks.append({"id": f"{st.id}-local", "type": "log", "inputs": [st.id],
                          "level": "DEBUG", "max_per_batch": 1})
            alarm_inputs.extend(r for r in st.inputs if r not in alarm_inputs)
    if probe and alarm_inputs:
        rate = sum(sp.flows[r].rate for r in alarm_inputs) * fraction
        every = max(1, int(rate / PROBE_PER_S))
        # declared before the other stages so it runs right after the alarm stages
        stages.insert(0, {"id": PROBE, "type": "downsample", "inputs": alarm_inputs,
                          "every": every})
        sinks.append({"id": f"{PROBE}-sink", "type": "log", "inputs": [PROBE],
                      "level": "DEBUG", "max_per_batch": 1})
    for s in sp.streams:
        sinks.append({"id": f"{s.name}-out", "type": "outbox", "inputs": [s.origin],
                      "stream": s.name, "priority": s.priority, "compact": s.compact})
    return {
        "apiVersion": "edgewise.io/v1", "kind": "Pipeline",
        "metadata": {"name": f"{sp.name}-sim"},
        "spec": {"sources": sources, "stages": stages, "sinks": sinks,
                 "outbox": {"sync": sync, "max_bytes": "8GiB"}},
    }


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


def _engine(doc: dict[str, Any], data: Path, duration: float | None = None) -> tuple[
        Engine, dict[str, Any]]:
    spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False), f"<{doc['metadata']['name']}>")
    engine = Engine(spec, data, duration=duration)
    return engine, install(engine)


def _run_engine(doc: dict[str, Any], data: Path) -> tuple[Engine, dict[str, Any]]:
    engine, _srcs = _engine(doc, data)
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
        engine, _srcs = _engine(self.doc, self.work)
        self.samples = {sid: [] for sid in engine.stages}
        clock = [START_TS]
        seen = [0]
        step = self.segment * CPU_SEGMENTS / self.turns
        route = engine._route

        def routed(node: str, port: str, batch: Batch) -> None:
            if node in engine.sources and batch.n and "ts" in batch.columns:
                clock[0] = float(batch.columns["ts"][-1])
                k = min(self.turns - 1, int((clock[0] - START_TS) // step))
                while seen[0] < k:
                    seen[0] += 1
                    self.at_turn(seen[0])
            route(node, port, batch)

        engine._route = routed  # type: ignore[method-assign]
        for sid, op in engine.stages.items():
            fn = op.process

            def process(batch: Batch, _fn: Callable[..., Any] = fn,
                        _out: list[tuple[float, float]] = self.samples[sid]) -> Any:
                t0 = time.thread_time()
                try:
                    return _fn(batch)
                finally:
                    _out.append((clock[0], time.thread_time() - t0))

            op.process = process  # type: ignore[method-assign]
        self.at_turn(0)
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


def _realtime(doc: dict[str, Any], data: Path, warm: float, span: float,
              backlog: float = 0.0) -> tuple[Engine, dict[str, Any], float, float, float, float]:
    """Run at the real pace; the process CPU of the steady part (after ``warm`` seconds, for
    ``span`` seconds) without the simulator's own work and the latency probe's, its wall time,
    the simulator's CPU in it, and the wall time of the whole run. With a ``backlog``, the
    sources start that many seconds in the past and the warm-up begins once it is handed over
    (operator state then has its steady size)."""
    engine, srcs = _engine(doc, data)
    for src in srcs.values():
        src.backlog_s = backlog
    probe = {PROBE: 0.0}
    if PROBE in engine.stages:
        _timed(engine.stages[PROBE], probe, PROBE, ("process", "on_timer"))
    marks: list[tuple[float, float, float, float]] = []

    def mark() -> None:
        marks.append((time.process_time(), time.perf_counter(),
                      sum(s.generation_s for s in srcs.values()), probe[PROBE]))

    async def main() -> dict[str, Any]:
        task = asyncio.create_task(engine.run())
        while backlog and not all(s.caught_up for s in srcs.values()) and not task.done():
            await asyncio.sleep(0.01)
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


# -- durations and sampling ----------------------------------------------------------------------

def needed_duration(sp: SitePlan) -> float:
    """Event-time seconds for every windowed stage to emit at least three times."""
    need = MIN_DURATION_S
    for st in sp.stages:
        if sp.where(st.id) not in ("edge", "split"):
            continue
        p = st.params
        from edgewise.pipeline.units import parse_duration

        if st.operator == "window":
            size = parse_duration(p["size"])
            slide = parse_duration(p.get("slide") or p["size"])
            need = max(need, size + 2 * slide)
        elif st.operator == "fft":
            per_key = sp.flows[st.inputs[0]].per_key_rate
            need = max(need, 3 * int(p["samples"]) / max(per_key, 1e-9))
        elif st.operator == "downsample" and p.get("interval") is not None:
            need = max(need, 3 * parse_duration(p["interval"]))
    return need


def _fraction(rate: float, seconds: float, budget: float) -> float:
    return min(1.0, budget / max(rate * seconds, 1.0))


def _actual_fraction(sp: SitePlan, fraction: float) -> float:
    full = sum(s.count * s.rate_hz for s in sp.site.sources)
    got = sum(sum(g["count"] for g in _groups(s, sp.name, fraction)) * s.rate_hz
              for s in sp.site.sources)
    return got / full


# -- measuring -----------------------------------------------------------------------------------

def _stream_bytes(cols: dict[str, np.ndarray], interval: float) -> tuple[int, float, float]:
    """(chunks, wire bytes, codec bytes) for records sent one chunk per ``interval`` of event
    time."""
    if not cols:
        return 0, 0.0, 0.0
    from edgewise.sync import codec

    tcol = "window_start" if "window_start" in cols else "ts" if "ts" in cols else None
    n = len(next(iter(cols.values())))
    if tcol is None:
        groups = [np.arange(n)]
    else:
        slot = np.floor((cols[tcol].astype(np.float64) - START_TS) / interval + 1e-9)
        order = np.argsort(slot, kind="stable")
        bounds = np.flatnonzero(np.diff(slot[order])) + 1
        groups = np.split(order, bounds)
    total = 0.0
    body = 0.0
    batch = Batch(cols, n)
    for g in groups:
        payload = len(codec.encode(batch.take(np.sort(g)).columns))
        total += payload + F.wire_overhead(payload)
        body += payload
    return len(groups), total, body


def _raw_wire(sp: SitePlan, seconds: float) -> float:
    """Every reading through the codec, one chunk per uplink interval (bytes/s, full site)."""
    from edgewise.sync import codec

    interval = sp.site.link.batch_interval
    total = 0.0
    for src in sp.site.sources:
        groups = _groups(src, sp.name, 1.0)
        sig = SignalSet(tuple(SignalGroup(**g) for g in groups), SEED, src.rate_hz)
        per_chunk = round(interval * src.rate_hz) * sig.n_sensors
        chunks = max(1, min(int(seconds / interval), 200_000 // max(per_chunk, 1), 10))
        nbytes = 0.0
        first = 0
        for _ in range(chunks):
            m = min(per_chunk, 200_000)
            s, ticks, values = sig.readings(first, m)
            payload = len(codec.encode({
                "sensor": sig.names[s], "ts": np.round(START_TS + ticks / src.rate_hz, 6),
                "value": values,
            })) * (per_chunk / m)
            nbytes += payload + F.wire_overhead(int(payload))
            first += per_chunk
        total += nbytes / (chunks * interval)
    return total


def cpu_run_shape(sp: SitePlan, full_rate: float) -> tuple[float, float, float]:
    """(sample fraction, event seconds, segment seconds) of the processing-cost run: about
    CPU_RUN_S of thread CPU by the estimate, segments of whole windows when they fit."""
    est = sp.estimate.calibration
    per_s = sum(est.stage_cpu_us[st.id] for st in sp.stages if sp.where(st.id) != "cloud")
    eng = sp.engine_cost
    per_s += _source_batches(sp.site) * (eng.batch_us if eng else 20.0) + full_rate * 0.5
    per_s = max(per_s, 1.0) * 1e-6  # CPU seconds per event second
    fraction = min(1.0, CPU_RUN_S / (per_s * CPU_MIN_EVENT_S))
    event_s = min(CPU_MAX_EVENT_S, max(CPU_MIN_EVENT_S, CPU_RUN_S / (per_s * fraction)))
    segment = event_s / CPU_SEGMENTS
    period = longest_period(sp)
    if period and segment >= period:
        segment = math.floor(segment / period) * period
    return fraction, segment * CPU_SEGMENTS, segment


def state_backlog(sp: SitePlan) -> float:
    """Seconds of readings the realtime run starts with, so that window state that grows with
    the window (values kept for percentiles) has its steady size: a window's length, at most
    MAX_BACKLOG_S; 0 if no edge stage keeps such state."""
    from edgewise.pipeline.units import parse_duration

    need = 0.0
    for st in sp.stages:
        if sp.where(st.id) in ("edge", "split") and st.operator == "window" and any(
                str(a).strip().startswith("p") for a in st.params.get("aggregates", [])):
            need = max(need, parse_duration(st.params["size"]))
    return min(need, MAX_BACKLOG_S)


def longest_period(sp: SitePlan) -> float:
    """The longest emission period of the edge stages (window slide, downsample interval, FFT
    block), seconds; 0 if none."""
    from edgewise.pipeline.units import parse_duration

    period = 0.0
    for st in sp.stages:
        if sp.where(st.id) not in ("edge", "split"):
            continue
        p = st.params
        if st.operator == "window":
            period = max(period, parse_duration(p.get("slide") or p["size"]))
        elif st.operator == "downsample" and p.get("interval") is not None:
            period = max(period, parse_duration(p["interval"]))
        elif st.operator == "fft":
            period = max(period, int(p["samples"]) / max(sp.flows[st.inputs[0]].per_key_rate,
                                                          1e-9))
    return period


def measure_site(sp: SitePlan, work: Path, costs: Costs,
                 say: Callable[[str], None] | None = None) -> SiteMeasurement:
    say = say or (lambda _m: None)
    full_rate = sum(s.count * s.rate_hz for s in sp.site.sources)
    interval = sp.site.link.batch_interval
    # 1. throughput: big batches, every window closes a few times -> records and bytes
    say(f"simulating site {sp.name}: throughput run")
    seconds = needed_duration(sp)
    frac = _fraction(full_rate, seconds, THROUGHPUT_BUDGET)
    f_act = _actual_fraction(sp, frac)
    doc = edge_pipeline(sp, frac, realtime=False, limit_s=seconds, probe=False, sync="normal",
                        big_batches=True)
    engine, summary = _run_engine(doc, work / "throughput")
    tp_readings = int(summary["readings_in"])
    stage_out: dict[str, float] = {}
    for st in sp.stages:
        if st.id not in engine.stages:
            continue
        scale = f_act if sp.flows[st.id].scales_with_keys else 1.0
        stage_out[st.id] = engine.counters.out.get(st.id, 0) / seconds / scale
    recs: dict[str, float] = {}
    wire: dict[str, float] = {}
    payload: dict[str, float] = {}
    with Outbox(work / "throughput" / "outbox.db") as ob:
        for s in sp.streams:
            cols = ob.read_stream(s.name)
            n = len(next(iter(cols.values()))) if cols else 0
            scale = f_act if sp.flows[s.origin].scales_with_keys else 1.0
            _chunks, nbytes, body = _stream_bytes(cols, interval)
            recs[s.name] = n / seconds / scale
            wire[s.name] = nbytes / seconds / scale
            payload[s.name] = body / seconds / scale
    # 2. processing cost: the batches of production, back to back, in six segments, each
    # after a repetition of the calibration (so the two see the machine in the same state)
    say(f"simulating site {sp.name}: processing cost, in turns with the calibration")
    cpu_frac, cpu_s, segment = cpu_run_shape(sp, full_rate)
    cpu_act = _actual_fraction(sp, cpu_frac)
    doc = edge_pipeline(sp, cpu_frac, realtime=False, limit_s=cpu_s, probe=False,
                        sync="normal")
    paired = costs.paired(sp.site, sp.stages, sp.flows)
    run = CpuRun(doc, work / "cpu", segment, lambda _k: paired.turn(), CPU_TURNS)
    with one_cpu():  # both on the same CPU: they see the same neighbours
        paired.start(CPU_TURNS)
        try:
            run.run()
        finally:
            stage_costs = paired.finish()
    stage_cpu: dict[str, float] = {}
    spread: dict[str, float] = {}
    for sid, calls in run.samples.items():
        rate_us, spread[sid] = segment_rate(segment_costs(calls, START_TS, segment,
                                                         CPU_SEGMENTS), segment)
        stage_cpu[sid] = rate_us / cpu_act
    raw = _raw_wire(sp, seconds)
    # 3. realtime
    say(f"simulating site {sp.name}: real time")
    rt_frac = min(1.0, REALTIME_MAX_RATE / full_rate)
    doc = edge_pipeline(sp, rt_frac, realtime=True, limit_s=None, probe=True, sync="full")
    backlog = state_backlog(sp)
    engine, summary, cpu_total, wall, gen, elapsed = _realtime(
        doc, work / "realtime", REALTIME_WARM_S, REALTIME_S, backlog)
    elapsed += backlog  # seconds of data the outbox holds
    rt_act = _actual_fraction(sp, rt_frac)
    readings = int(summary["readings_in"])
    cores = max(0.0, cpu_total) / max(wall, 1e-3) / rt_act
    lat_alarm: list[np.ndarray] = []
    lat_probe = np.zeros(0)
    for sid, sink in engine.sinks.items():
        rec = getattr(sink, "latency", None)
        if rec is None:
            continue
        if sid == f"{PROBE}-sink":
            lat_probe = rec.values()
        else:
            lat_alarm.append(rec.values())
    alarms = np.concatenate(lat_alarm) if lat_alarm else np.zeros(0)
    if len(alarms) >= 200 or (len(alarms) and not len(lat_probe)):
        latency, lsrc = alarms, f"{len(alarms):,} alarms"
    elif len(lat_probe):
        latency = np.concatenate([alarms, lat_probe])
        lsrc = f"{len(alarms):,} alarms and {len(lat_probe):,} probe records"
    else:
        latency, lsrc = np.zeros(0), "none"
    stored = 0.0
    streams = summary["streams"]
    for s in sp.streams:
        st = streams.get(s.name)
        flow = sp.flows[s.origin]
        window = flow.windowed or 0.0
        if st is not None and st["records"] >= 20 and window < REALTIME_S / 2:
            stored += st["bytes_pending"] / elapsed / rt_act
        else:
            stored += payload.get(s.name, 0.0) * STORE_OVERHEAD
    return SiteMeasurement(
        sp.name, f_act, seconds, tp_readings, readings, wall, rt_act, stage_out, stage_cpu,
        recs, wire, payload, raw, stored, latency, lsrc, cores, gen, int(summary["late"]),
        cpu_s, segment, cpu_act, spread, stage_costs,
    )


def link_result(sp: SitePlan, stored: dict[str, float], outbox: int) -> LinkResult:
    link = sp.site.link
    loads = [StreamLoad(s.name, s.priority, s.compact, stored.get(s.name, 0.0))
             for s in sp.streams]
    kinds = {s.name: s.kind for s in sp.streams}
    return simulate_link(loads, kinds, link.uplink / 8 * DATA_SHARE, link.availability,
                         max(link.longest_outage, 0.0), outbox,
                         compare={"default": DEFAULT_OUTBOX, "none": 0})


def simulate(plan: Plan, progress: Callable[[str], None] | None = None,
             costs: Costs | None = None) -> tuple[Plan, dict[str, SiteMeasurement]]:
    """Measure every site type and return the plan with measured figures; with a
    `Calibrator`, the estimate is recalibrated beside the measurement."""
    say = progress or (lambda _m: None)
    costs = costs or Costs()
    sites: list[SitePlan] = []
    calibrations: dict[str, Calibration] = {}
    links: dict[str, LinkResult] = {}
    found: dict[str, SiteMeasurement] = {}
    sink_log = logging.getLogger("edgewise.sink")
    for sp in plan.sites:
        level = sink_log.level
        sink_log.setLevel(logging.WARNING)  # the stand-in local actions log every alarm
        try:
            with tempfile.TemporaryDirectory(prefix="edgewise-plan-") as tmp:
                m = measure_site(sp, Path(tmp), costs, say)
        finally:
            sink_log.setLevel(level)
        found[sp.name] = m
        if m.stage_costs is not None and costs.calibrated:
            sp = reestimate(plan.workload, sp, m.stage_costs, costs)
        sites.append(sp)
        est = sp.estimate.calibration
        lat = m.latency_s if len(m.latency_s) >= 20 else est.engine_latency_s
        notes = list(est.notes)
        if len(m.latency_s) < 20:
            notes.append(f"{sp.name}: too few latency samples in the realtime run; the "
                         "model's engine latency is kept")
        cpu = {sid: m.stage_cpu_us.get(sid, est.stage_cpu_us[sid]) for sid in est.stage_cpu_us}
        out = {sid: m.stage_out.get(sid, est.stage_out[sid]) for sid in est.stage_out}
        cal = Calibration("simulation", cpu, out, m.stream_wire, m.stream_records,
                          m.stream_payload, m.raw_wire, m.stored_per_s, lat, m.cores_total,
                          notes, MEASURED_METHOD.format(
                              segments=CPU_SEGMENTS - 1, seconds=m.realtime_wall_s))
        calibrations[sp.name] = cal
        say(f"simulating site {sp.name}: link model")
        total = sum(m.stream_payload.values()) or 1.0
        stored = {s.name: m.stored_per_s * m.stream_payload.get(s.name, 0.0) / total
                  for s in sp.streams}
        outbox = _outbox_for(sp, m.stored_per_s, plan)
        links[sp.name] = link_result(sp, stored, outbox)
    costs.save()
    return apply_measurement(replace(plan, sites=sites), calibrations, links), found


def _outbox_for(sp: SitePlan, stored: float, plan: Plan) -> int:
    from edgewise.plan.model import OUTBOX_HEADROOM

    outage = max(sp.site.link.longest_outage, plan.workload.requirements.offline_autonomy)
    return int(max(64 * 1024**2, math.ceil(stored * outage * OUTBOX_HEADROOM / 1024**2)
                   * 1024**2))

