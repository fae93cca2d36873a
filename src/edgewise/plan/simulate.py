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
   that rare alarms still give a distribution), and the outbox fill rate. It is made in
   ``rounds`` (REALTIME_ROUNDS by default), each a fresh run, with a run of the engine alone
   at the site's pace before the first and after every one (`Costs.site_engine_around`); the
   node's cores measured are the median of the rounds' (`median_round`: over a few seconds on
   a shared machine one run's figure moves by up to a fifth), the other figures that round's.

Large workloads are sampled: fewer sensors per group (the same fraction everywhere) and the
results scaled back; the fraction is reported. Then the link model runs against the outbox
(`edgewise.plan.linksim`).

This module measures and puts the figures together; the pipeline document and the shape of each
run are `edgewise.plan.sim_pipeline`, the engine runs themselves `edgewise.plan.sim_runs`.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.outbox import Outbox, outbox_file
from edgewise.pipeline.batch import Batch
from edgewise.plan.cost_model import StageCost
from edgewise.plan.costs import Costs
from edgewise.plan.encoding import wire_overhead
from edgewise.plan.linksim import LinkResult, StreamLoad, simulate_link
from edgewise.plan.model import apply_measurement, reestimate
from edgewise.plan.results import Calibration, Finding, Plan, SitePlan
from edgewise.plan.sim_pipeline import (
    CPU_SEGMENTS,
    PROBE,
    SEED,
    START_TS,
    actual_fraction,
    cpu_run_shape,
    edge_pipeline,
    needed_duration,
    sample_fraction,
    state_backlog,
    state_window,
    upstream_fraction,
)
from edgewise.plan.sim_runs import (
    CpuRun,
    one_cpu,
    realtime_run,
    run_engine,
    segment_costs,
    segment_rate,
)
from edgewise.plan.site_figures import (
    DATA_SHARE,
    DEFAULT_OUTBOX,
    OUTBOX_HEADROOM,
    STORE_OVERHEAD,
    checkpoint_bytes,
    second_route,
)
from edgewise.plan.source import value_columns
from edgewise.sim.signals import SignalGroup, SignalSet

log = logging.getLogger(__name__)

THROUGHPUT_BUDGET = 4_000_000  # readings in the throughput run
REALTIME_S = 3.0  # measured span of the realtime run, at least
REALTIME_MAX_S = 10.0  # ... and at most: a small site is measured longer
REALTIME_CPU_S = 0.12  # process CPU the measured span should hold (by the estimate)
REALTIME_WARM_S = 0.5  # not measured: start-up, first commits
REALTIME_GC_CYCLES = 4.0  # full collections the measured span should hold (by the estimate)
REALTIME_GC_MAX_S = 10.0  # ... in at most this long
REALTIME_GC_SHARE = 0.05  # ... where they are at least this share of the node's cores
REALTIME_ROUNDS = 3  # realtime runs, each between two runs of the engine alone (median cores)
REALTIME_MAX_RATE = 250_000.0  # readings/s in the realtime run
CPU_TURNS = 48  # the calibration's turns during the processing-cost run
DEAD_MIN_RECORDS = 5.0  # expected records in the throughput run for "emitted nothing" to count


MEASURED_METHOD = (
    "thread CPU of every operator call in the engine on synthetic data, in the batches of "
    "production, back to back over {segments} segments after a warm-up, the calibration taking "
    "turns with them on the same CPU; node cores from the process CPU of {seconds:.1f} s at "
    "the real rate, the simulator's own work left out, the median of {rounds} such run(s)")


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
    engine_site: dict[str, Any] | None = None  # calibrated around the realtime runs
    cores_rounds: list[float] | None = None  # node cores of every realtime run (median taken)


# -- measuring -----------------------------------------------------------------------------------

def _stream_bytes(cols: dict[str, np.ndarray], interval: float, scale: float = 1.0,
                  frame_bytes: float = 0.0) -> tuple[int, float, float]:
    """(chunks, wire bytes, codec bytes) for records sent one chunk per ``interval`` of event
    time, for the full site when the run carried ``scale`` of its sensors: each chunk's records
    grow by 1/scale; its header (the encoding of no records) and its framing, TLS and TCP/IP
    overhead are paid once per chunk. ``frame_bytes``: the frame each record of a source
    carries (the simulator makes none), added per record."""
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
    fixed = len(codec.encode(batch.take(np.zeros(0, dtype=np.int64)).columns)) if n else 0
    for g in groups:
        payload = len(codec.encode(batch.take(np.sort(g)).columns))
        if scale < 1.0:  # the chunk's own header (columns, names) is not per sensor
            payload = fixed + (payload - fixed) / scale
        payload += len(g) / scale * frame_bytes
        total += payload + wire_overhead(int(payload))
        body += payload
    return len(groups), total, body


def _raw_wire(sp: SitePlan, seconds: float) -> float:
    """Every reading through the codec, one chunk per uplink interval (bytes/s, full site)."""
    from edgewise.sync import codec

    interval = sp.site.link.batch_interval
    total = 0.0
    for src in sp.site.sources:
        cols = value_columns(src, sp.name, 1.0)
        sets = [(name, SignalSet(tuple(SignalGroup(**g) for g in groups), SEED + k,
                                 src.rate_hz)) for k, (name, groups) in enumerate(cols)]
        sig = sets[0][1]
        # a source slower than one reading per interval: a chunk per tick, at most
        span = max(interval, 1.0 / src.rate_hz)
        per_chunk = max(1, round(span * src.rate_hz)) * sig.n_sensors
        chunks = max(1, min(int(seconds / span), 200_000 // max(per_chunk, 1), 10))
        nbytes = 0.0
        first = 0
        for _ in range(chunks):
            m = min(per_chunk, 200_000)
            s, ticks, _values = sig.readings(first, m)
            chunk = {"sensor": sig.names[s], "ts": np.round(START_TS + ticks / src.rate_hz, 6)}
            for name, ss in sets:
                chunk[name] = ss.readings(first, m)[2]
            payload = len(codec.encode(chunk)) * (per_chunk / m)
            nbytes += payload + wire_overhead(int(payload))
            first += per_chunk
        total += nbytes / (chunks * span)
    return total



def median_round(cores: list[float]) -> int:
    """The round whose node cores are the median of all rounds' (the lower middle of an even
    count): one round disturbed by the shared machine moves it no further than the next."""
    if not cores:
        raise ValueError("no rounds")
    order = sorted(range(len(cores)), key=lambda k: (cores[k], k))
    return order[(len(cores) - 1) // 2]


def measure_site(sp: SitePlan, work: Path, costs: Costs,
                 say: Callable[[str], None] | None = None,
                 rounds: int = REALTIME_ROUNDS) -> SiteMeasurement:
    say = say or (lambda _m: None)
    full_rate = sum(s.count * s.rate_hz for s in sp.site.sources)
    interval = sp.site.link.batch_interval
    # 1. throughput: big batches, every window closes a few times -> records and bytes
    say(f"simulating site {sp.name}: throughput run")
    seconds = needed_duration(sp)
    frac = sample_fraction(full_rate, seconds, THROUGHPUT_BUDGET)
    f_act = actual_fraction(sp, frac)
    doc = edge_pipeline(sp, frac, realtime=False, limit_s=seconds, probe=False, sync="normal",
                        big_batches=True)
    engine, summary = run_engine(doc, work / "throughput")
    tp_readings = int(summary["readings_in"])
    stage_out: dict[str, float] = {}
    for st in sp.stages:
        if st.id not in engine.stages:
            continue
        scale = upstream_fraction(sp, st.id, frac) if sp.flows[st.id].scales_with_keys else 1.0
        stage_out[st.id] = engine.counters.out.get(st.id, 0) / seconds / scale
    recs: dict[str, float] = {}
    wire: dict[str, float] = {}
    payload: dict[str, float] = {}
    with Outbox(outbox_file(work / "throughput")) as ob:
        for s in sp.streams:
            cols = ob.read_stream(s.name)
            n = len(next(iter(cols.values()))) if cols else 0
            scale = upstream_fraction(sp, s.origin, frac) \
                if sp.flows[s.origin].scales_with_keys else 1.0
            _chunks, nbytes, body = _stream_bytes(cols, interval, scale,
                                                  sp.flows[s.origin].frame_bytes)
            recs[s.name] = n / seconds / scale
            wire[s.name] = nbytes / seconds
            payload[s.name] = body / seconds
    # 2. processing cost: the batches of production, back to back, in six segments, each
    # after a repetition of the calibration (so the two see the machine in the same state)
    say(f"simulating site {sp.name}: processing cost, in turns with the calibration")
    cpu_frac, cpu_s, segment = cpu_run_shape(sp, full_rate)
    cpu_act = actual_fraction(sp, cpu_frac)
    stage_costs, stage_cpu, spread = _processing_cost(sp, work, costs, cpu_frac, cpu_s,
                                                      segment)
    raw = _raw_wire(sp, seconds)
    # the runs above are let go: what the realtime runs measure (the process CPU, the
    # collector's full collections that traverse every object alive) is the node's
    del engine
    # 3. realtime
    say(f"simulating site {sp.name}: real time, in {rounds} round(s)")
    rt_frac = min(1.0, REALTIME_MAX_RATE / full_rate)
    doc = edge_pipeline(sp, rt_frac, realtime=True, limit_s=None, probe=True, sync="full")
    backlog = state_backlog(sp)
    # the engine with the site's sources alone at the real pace, calibrated again in halves,
    # just before and just after every run that measures the whole (a shared machine's speed
    # drifts from one minute to the next: the two then see it alike)
    span = realtime_span(sp, costs.gc_full(sp.site, sp.stages)[0])
    rt_act = actual_fraction(sp, rt_frac)

    def one_round(k: int) -> tuple[Any, ...]:
        if rounds > 1:
            say(f"simulating site {sp.name}: real time, round {k + 1} of {rounds} "
                f"({span:.1f} s measured)")
        gc.collect()  # the previous round's engine; before the warm-up, not measured
        engine, *rest = realtime_run(doc, work / f"realtime-{k}", REALTIME_WARM_S, span,
                                     backlog, state_window(sp))
        # the latencies only: the engine and its state are let go, so that every round
        # starts with the same heap (the collector's full collections traverse all of it)
        return (*_latencies(engine), *rest)

    engine_site, runs = costs.site_engine_around(
        sp.site, span, checkpoint_bytes(sp, stage_costs), one_round, rounds)
    cores_rounds = [max(0.0, r[3]) / max(r[4], 1e-3) / rt_act for r in runs]
    pick = median_round(cores_rounds)
    alarms, lat_probe, summary, _cpu, wall, gen, elapsed = runs[pick]
    cores = cores_rounds[pick]
    elapsed += backlog  # seconds of data the outbox holds
    readings = int(summary["readings_in"])
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
        if st is not None and st["records"] >= 20 and window < REALTIME_S / 2 and \
                not flow.frame_bytes:  # the simulator's readings carry no frames
            stored += st["bytes_pending"] / elapsed / rt_act
        else:
            stored += payload.get(s.name, 0.0) * STORE_OVERHEAD
    return SiteMeasurement(
        sp.name, f_act, seconds, tp_readings, readings, wall, rt_act, stage_out, stage_cpu,
        recs, wire, payload, raw, stored, latency, lsrc, cores, gen, int(summary["late"]),
        cpu_s, segment, cpu_act, spread, stage_costs, engine_site, cores_rounds,
    )


def _processing_cost(sp: SitePlan, work: Path, costs: Costs, cpu_frac: float, cpu_s: float,
                     segment: float) -> tuple[dict[str, StageCost], dict[str, float],
                                              dict[str, float]]:
    """The processing-cost run in turns with the paired calibration: the stage costs
    calibrated beside it, each stage's measured us/s and spread over the segments."""
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
        stage_cpu[sid] = rate_us / upstream_fraction(sp, sid, cpu_frac, by_rate=True)
    return stage_costs, stage_cpu, spread


def _latencies(engine: Any) -> tuple[np.ndarray, np.ndarray]:
    """Accept-to-action latencies a realtime run recorded: the alarm sinks', the probe's."""
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
    return (np.concatenate(lat_alarm) if lat_alarm else np.zeros(0)), lat_probe


def realtime_span(sp: SitePlan, full_gc_us: float = 0.0) -> float:
    """Seconds the realtime run measures: REALTIME_S, longer for a small site (whose few
    milliseconds of CPU a second a shared machine's noise moves by a fifth in 2 s, and the
    water station's 0.011-0.014 cores between runs of 5 s at a load of 4-5), so that the span
    holds about REALTIME_CPU_S of CPU by the estimate, at most REALTIME_MAX_S; and
    long enough for REALTIME_GC_CYCLES of the garbage collector's full collections by the
    estimate where they are at least REALTIME_GC_SHARE of it (one of ``full_gc_us`` every
    1.5 s on the wind farm: a 2 s span caught one or two, 10-20 ms/s apart), at most
    REALTIME_GC_MAX_S."""
    cores = sum(v for k, v in sp.node_cpu.items() if k != "ingest")
    span = min(REALTIME_MAX_S, max(REALTIME_S, REALTIME_CPU_S / max(cores, 1e-6)))
    collector = sp.node_cpu.get("garbage collector", 0.0)
    full_per_s = collector / max(full_gc_us * 1e-6, 1e-9)
    if full_per_s > 0 and collector >= REALTIME_GC_SHARE * cores:
        span = max(span, min(REALTIME_GC_MAX_S, REALTIME_GC_CYCLES / full_per_s))
    return span


def link_result(sp: SitePlan, stored: dict[str, float], outbox: int) -> LinkResult:
    link = sp.site.link
    loads = [StreamLoad(s.name, s.priority, s.compact, stored.get(s.name, 0.0))
             for s in sp.streams]
    kinds = {s.name: s.kind for s in sp.streams}
    return simulate_link(loads, kinds, link.uplink / 8 * DATA_SHARE, link.availability,
                         max(link.longest_outage, 0.0), outbox,
                         compare={"default": DEFAULT_OUTBOX, "none": 0},
                         second=second_route(sp.site))


def simulate(plan: Plan, progress: Callable[[str], None] | None = None,
             costs: Costs | None = None, rounds: int = REALTIME_ROUNDS
             ) -> tuple[Plan, dict[str, SiteMeasurement]]:
    """Measure every site type and return the plan with measured figures; with a
    `Calibrator`, the estimate is recalibrated beside the measurement. ``rounds``: realtime
    runs per site (node cores: their median)."""
    say = progress or (lambda _m: None)
    costs = costs or Costs()
    code = plan.workload.code_dir
    if code is not None and str(code) not in sys.path:  # the user functions' package
        sys.path.insert(0, str(code))
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
                m = measure_site(sp, Path(tmp), costs, say, max(1, rounds))
        finally:
            sink_log.setLevel(level)
        found[sp.name] = m
        if m.stage_costs is not None and costs.calibrated:
            if m.engine_site is not None:
                sp = replace(sp, engine_site=m.engine_site)
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
                              segments=CPU_SEGMENTS - 1, seconds=m.realtime_wall_s,
                              rounds=len(m.cores_rounds or [0.0])))
        calibrations[sp.name] = cal
        say(f"simulating site {sp.name}: link model")
        total = sum(m.stream_payload.values()) or 1.0
        stored = {s.name: m.stored_per_s * m.stream_payload.get(s.name, 0.0) / total
                  for s in sp.streams}
        outbox = _outbox_for(sp, m.stored_per_s, plan)
        links[sp.name] = link_result(sp, stored, outbox)
    costs.save()
    findings = [f for sp in sites for f in dead_paths(sp, found[sp.name])]
    done = apply_measurement(replace(plan, sites=sites), calibrations, links)
    return replace(done, findings=findings), found


def dead_paths(sp: SitePlan, m: SiteMeasurement) -> list[Finding]:
    """Edge stages that emitted nothing in the throughput run although the estimate expected
    at least DEAD_MIN_RECORDS from them in its span (an alarm path whose threshold the
    simulated signal never crosses, a filter that drops everything, a function that returns
    nothing): the estimate and the simulation disagree in kind, not in degree."""
    out = []
    for st in sp.stages:
        if sp.where(st.id) not in ("edge", "split") or st.id not in m.stage_out:
            continue
        est = sp.estimate.calibration.stage_out.get(st.id, 0.0)
        scale = m.sample_fraction if sp.flows[st.id].scales_with_keys else 1.0
        expected = est * m.throughput_s * scale
        if expected >= DEAD_MIN_RECORDS and m.stage_out[st.id] == 0.0:
            out.append(Finding(
                sp.name, st.id, "dead-path", est, 0.0, expected,
                f"{sp.name}: stage {st.id!r} emitted nothing in {m.throughput_s:g} s of "
                f"simulated data where the estimate expects {est:.3g} records/s "
                f"({expected:.0f} in that span): its path is dead in the simulation"))
    return out


def _outbox_for(sp: SitePlan, stored: float, plan: Plan) -> int:
    outage = max(sp.site.link.longest_outage, plan.workload.requirements.offline_autonomy)
    return int(max(64 * 1024**2, math.ceil(stored * outage * OUTBOX_HEADROOM / 1024**2)
                   * 1024**2))
