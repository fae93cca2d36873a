"""`--simulate`: run the real engine on synthetic data and measure what the model estimated.

For each site type the edge part of the placed pipeline is generated with one `simulator`
source per workload source (same sensors, rates, resolution and signal statistics) and run
twice with `Engine(...).run()`:

1. a *throughput* run (``realtime: false``, finite): long enough for every window to close a
   few times; gives the records each stage emits and, read back from the outbox and encoded
   with the wire codec one chunk per stream per uplink interval, the bytes the uplink carries;
2. a *realtime* run at the workload's real rate for a few seconds: gives the CPU each stage
   takes (thread CPU around the operator calls), the total CPU of the process
   (``time.process_time``, minus the cost of generating the synthetic data), the accept-to-
   local-action latency of alarms (and of a cheap probe stage beside them, so that rare alarms
   still give a distribution), and the outbox fill rate.

Large workloads are sampled: fewer sensors per group (the same fraction everywhere) and the
results scaled back; the fraction is reported. Then the link model runs against the outbox
(`edgewise.plan.linksim`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from edgewise.plan.linksim import LinkResult, StreamLoad, simulate_link
from edgewise.plan.model import (
    DATA_SHARE,
    DEFAULT_OUTBOX,
    STORE_OVERHEAD,
    Calibration,
    Plan,
    SitePlan,
    apply_measurement,
)
from edgewise.plan.workload import SourceSpec
from edgewise.sim.signals import SignalGroup, SignalSet

log = logging.getLogger(__name__)

START_TS = 1_764_547_200.0  # 2025-12-01T00:00:00Z, a multiple of every common window size
SEED = 42
THROUGHPUT_BUDGET = 2_500_000  # readings in the throughput run
REALTIME_S = 2.5
REALTIME_MAX_RATE = 250_000.0  # readings/s in the realtime run
MIN_DURATION_S = 10.0
CPU_BATCHES = 6_000  # batches in the processing-cost run
CPU_BUDGET = 1_500_000  # readings in the processing-cost run
MIN_CPU_S = 2.0
PROBE_PER_S = 2_000.0  # latency probe samples per second
PROBE = "latency-probe"


@dataclass
class SiteMeasurement:
    site: str
    sample_fraction: float
    throughput_s: float  # event-time seconds in the throughput run
    throughput_readings: int
    realtime_readings: int
    realtime_wall_s: float
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


def _timed(op: Any, acc: dict[str, float], sid: str) -> None:
    for name in ("process", "on_timer", "flush"):
        fn = getattr(op, name)

        def wrapper(*args: Any, _fn: Callable[..., Any] = fn, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return _fn(*args, **kw)
            finally:
                acc[sid] += time.thread_time() - t0

        setattr(op, name, wrapper)


def _run_engine(doc: dict[str, Any], data: Path, duration: float | None) -> tuple[
        Engine, dict[str, Any], dict[str, float], float, float]:
    spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False), f"<{doc['metadata']['name']}>")
    engine = Engine(spec, data, duration=duration)
    cpu = {sid: 0.0 for sid in engine.stages}
    for sid, op in engine.stages.items():
        _timed(op, cpu, sid)
    c0, w0 = time.process_time(), time.perf_counter()
    summary = asyncio.run(engine.run())
    return engine, summary, cpu, time.process_time() - c0, time.perf_counter() - w0


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


def _generation_cpu(sp: SitePlan, fraction: float, readings: int) -> float:
    """CPU seconds the simulator spends making ``readings`` readings (subtracted)."""
    c0 = time.process_time()
    done = 0
    for src in sp.site.sources:
        groups = _groups(src, sp.name, fraction)
        sig = SignalSet(tuple(SignalGroup(**g) for g in groups), SEED, src.rate_hz)
        share = sig.n_sensors * src.rate_hz / max(1.0, sum(
            sum(g["count"] for g in _groups(s, sp.name, fraction)) * s.rate_hz
            for s in sp.site.sources))
        want = int(readings * share)
        batch = F.batch_records(src.count * src.rate_hz, src.count, src.protocol)
        pos = 0
        while pos < want:
            s, ticks, values = sig.readings(pos, batch)
            Batch({"sensor": sig.names[s], "ts": np.round(START_TS + ticks / src.rate_hz, 6),
                   "value": values}, len(s))
            pos += batch
        done += want
    return time.process_time() - c0


def measure_site(sp: SitePlan, work: Path) -> SiteMeasurement:
    full_rate = sum(s.count * s.rate_hz for s in sp.site.sources)
    interval = sp.site.link.batch_interval
    # 1. throughput: big batches, every window closes a few times -> records and bytes
    seconds = needed_duration(sp)
    frac = _fraction(full_rate, seconds, THROUGHPUT_BUDGET)
    f_act = _actual_fraction(sp, frac)
    doc = edge_pipeline(sp, frac, realtime=False, limit_s=seconds, probe=False, sync="normal",
                        big_batches=True)
    engine, summary, _cpu, _c, _w = _run_engine(doc, work / "throughput", None)
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
    # 2. processing cost: the batches of production, as fast as the engine goes
    batches = sum(s.count * s.rate_hz / F.batch_records(s.count * s.rate_hz, s.count, s.protocol)
                  for s in sp.site.sources)
    cpu_s = max(MIN_CPU_S, min(CPU_BATCHES / max(batches, 1e-9), CPU_BUDGET / full_rate))
    cpu_frac = _fraction(full_rate, cpu_s, CPU_BUDGET)
    cpu_act = _actual_fraction(sp, cpu_frac)
    doc = edge_pipeline(sp, cpu_frac, realtime=False, limit_s=cpu_s, probe=False,
                        sync="normal")
    _e, _s, cpu_run, _c, _w = _run_engine(doc, work / "cpu", None)
    stage_cpu = {sid: cpu_run[sid] * 1e6 / cpu_s / cpu_act for sid in cpu_run}
    raw = _raw_wire(sp, seconds)
    # 2. realtime
    rt_frac = min(1.0, REALTIME_MAX_RATE / full_rate)
    doc = edge_pipeline(sp, rt_frac, realtime=True, limit_s=None, probe=True, sync="full")
    engine, summary, cpu, cpu_total, wall = _run_engine(doc, work / "realtime", REALTIME_S)
    rt_act = _actual_fraction(sp, rt_frac)
    readings = int(summary["readings_in"])
    elapsed = max(wall, 1e-3)
    probe_cpu = cpu.get(PROBE, 0.0)
    gen = _generation_cpu(sp, rt_frac, readings)
    cores = max(0.0, cpu_total - gen - probe_cpu) / elapsed / rt_act
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
        sp.name, f_act, seconds, tp_readings, readings, elapsed, rt_act, stage_out, stage_cpu,
        recs, wire, payload, raw, stored, latency, lsrc, cores, gen, int(summary["late"]),
    )


def link_result(sp: SitePlan, stored: dict[str, float], outbox: int) -> LinkResult:
    link = sp.site.link
    loads = [StreamLoad(s.name, s.priority, s.compact, stored.get(s.name, 0.0))
             for s in sp.streams]
    kinds = {s.name: s.kind for s in sp.streams}
    return simulate_link(loads, kinds, link.uplink / 8 * DATA_SHARE, link.availability,
                         max(link.longest_outage, 0.0), outbox,
                         compare={"default": DEFAULT_OUTBOX, "none": 0})


def simulate(plan: Plan, progress: Callable[[str], None] | None = None) -> tuple[
        Plan, dict[str, SiteMeasurement]]:
    """Measure every site type and return the plan with measured figures."""
    say = progress or (lambda _m: None)
    calibrations: dict[str, Calibration] = {}
    links: dict[str, LinkResult] = {}
    found: dict[str, SiteMeasurement] = {}
    sink_log = logging.getLogger("edgewise.sink")
    for sp in plan.sites:
        say(f"simulating site {sp.name}: engine runs")
        level = sink_log.level
        sink_log.setLevel(logging.WARNING)  # the stand-in local actions log every alarm
        try:
            with tempfile.TemporaryDirectory(prefix="edgewise-plan-") as tmp:
                m = measure_site(sp, Path(tmp))
        finally:
            sink_log.setLevel(level)
        found[sp.name] = m
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
                          notes)
        calibrations[sp.name] = cal
        say(f"simulating site {sp.name}: link model")
        total = sum(m.stream_payload.values()) or 1.0
        stored = {s.name: m.stored_per_s * m.stream_payload.get(s.name, 0.0) / total
                  for s in sp.streams}
        outbox = _outbox_for(sp, m.stored_per_s, plan)
        links[sp.name] = link_result(sp, stored, outbox)
    return apply_measurement(plan, calibrations, links), found


def _outbox_for(sp: SitePlan, stored: float, plan: Plan) -> int:
    from edgewise.plan.model import OUTBOX_HEADROOM

    outage = max(sp.site.link.longest_outage, plan.workload.requirements.offline_autonomy)
    return int(max(64 * 1024**2, math.ceil(stored * outage * OUTBOX_HEADROOM / 1024**2)
                   * 1024**2))

