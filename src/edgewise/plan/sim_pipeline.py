"""What `--simulate` runs: the edge part of a site's pipeline with simulator sources, and the
shape of each run (event seconds, the sample of sensors, the processing-cost run's segments).

`edge_pipeline` writes the pipeline document the engine runs (`edgewise.plan.sim_runs`); the
functions below it decide how long a run must be for every window to close a few times, how
many sensors a large workload is sampled down to, and how much state the realtime run starts
with. `edgewise.plan.simulate` measures and puts the figures together.
"""

from __future__ import annotations

import math
from typing import Any

from edgewise.pipeline.units import parse_duration
from edgewise.plan import flows as F
from edgewise.plan.results import SitePlan
from edgewise.plan.site_figures import source_batches
from edgewise.plan.source import value_columns
from edgewise.plan.workload import SourceSpec

START_TS = 1_764_547_200.0  # 2025-12-01T00:00:00Z, a multiple of every common window size
SEED = 42
MAX_BACKLOG_S = 600.0  # seconds of readings the realtime run may start with
MIN_DURATION_S = 10.0
CPU_RUN_S = 1.5  # thread CPU the processing-cost run may take (by the estimate)
CPU_SEGMENTS = 13  # the first is warm-up
CPU_MIN_EVENT_S = 3.0  # event seconds at least, else the workload is sampled
CPU_MAX_EVENT_S = 6 * 3600.0
PROBE_PER_S = 2_000.0  # latency probe samples per second
PROBE = "latency-probe"


# -- the pipeline ----------------------------------------------------------------------------------

def sensor_groups(src: SourceSpec, site: str, fraction: float, boost: float = 1.0) -> list[dict]:
    """The simulator groups of a source (those of its first value column)."""
    return value_columns(src, site, fraction, boost)[0][1]


def simulator_entry(src: SourceSpec, site: str, fraction: float) -> dict[str, Any]:
    """The parts of a simulator source entry that describe the sensors and their values."""
    cols = value_columns(src, site, fraction)
    entry: dict[str, Any] = {"groups": cols[0][1]}
    if src.fields:
        entry["fields"] = [{"name": n, "groups": g} for n, g in cols]
    return entry


def edge_pipeline(sp: SitePlan, fraction: float, *, realtime: bool, limit_s: float | None,
                  probe: bool, sync: str, big_batches: bool = False) -> dict[str, Any]:
    """The edge part of a site's pipeline with simulator sources (a Pipeline document)."""
    sources = []
    for src in sp.site.sources:
        groups = sensor_groups(src, sp.name, fraction)
        n = sum(g["count"] for g in groups)
        entry: dict[str, Any] = {
            "id": src.id, "type": "simulator", "profile": "custom", "seed": SEED,
            "rate_hz": src.rate_hz, **simulator_entry(src, sp.name, fraction),
            "realtime": realtime,
            "start": START_TS if not realtime else "now",
            # the batch the engine gets in production: one tick of all sensors, or what
            # arrives within the linger time (see flows.batch_records)
            # big batches: at most a second of readings each, so that a slow source's batch
            # does not run far ahead in event time of the others feeding the same window
            "batch": max(n, min(F.MAX_BATCH, round(n * src.rate_hz))) if big_batches
            else F.batch_records(src.count * src.rate_hz, src.count, src.protocol),
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
        if st.function is not None:  # imported and run as the engine runs it
            stages.append({"id": st.id, "type": "python", "class": st.function,
                           "inputs": list(st.inputs), "options": dict(st.params)})
        else:
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

# -- durations and sampling ----------------------------------------------------------------------

def needed_duration(sp: SitePlan) -> float:
    """Event-time seconds for every windowed stage to emit at least three times."""
    need = MIN_DURATION_S
    for st in sp.stages:
        if sp.where(st.id) not in ("edge", "split"):
            continue
        p = st.params
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


def sample_fraction(rate: float, seconds: float, budget: float) -> float:
    return min(1.0, budget / max(rate * seconds, 1.0))


def upstream_fraction(sp: SitePlan, node: str, fraction: float, by_rate: bool = False) -> float:
    """The share of a stage's (or source's) input that a sampled run carries: its upstream
    sources' sampled sensors over all of them (``by_rate``: weighted by their rates). Sources
    round differently (2 of 24 sensors, 1 of 12), so each stage is scaled by its own."""
    by_id = {s.id: s for s in sp.site.sources}
    inputs = {st.id: st.inputs for st in sp.stages}
    seen: set[str] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(inputs.get(n, []))
    ups = [by_id[n] for n in seen if n in by_id]
    if not ups:
        return actual_fraction(sp, fraction)
    w = [s.rate_hz if by_rate else 1.0 for s in ups]
    got = sum(sum(g["count"] for g in sensor_groups(s, sp.name, fraction)) * x
              for s, x in zip(ups, w, strict=True))
    return got / sum(s.count * x for s, x in zip(ups, w, strict=True))


def actual_fraction(sp: SitePlan, fraction: float) -> float:
    full = sum(s.count * s.rate_hz for s in sp.site.sources)
    got = sum(sum(g["count"] for g in sensor_groups(s, sp.name, fraction)) * s.rate_hz
              for s in sp.site.sources)
    return got / full

def cpu_run_shape(sp: SitePlan, full_rate: float) -> tuple[float, float, float]:
    """(sample fraction, event seconds, segment seconds) of the processing-cost run: about
    CPU_RUN_S of thread CPU by the estimate, segments of whole windows when they fit."""
    est = sp.estimate.calibration
    per_s = sum(est.stage_cpu_us[st.id] for st in sp.stages if sp.where(st.id) != "cloud")
    eng = sp.engine_cost
    per_s += source_batches(sp.site) * (eng.batch_us if eng else 20.0) + full_rate * 0.5
    per_s = max(per_s, 1.0) * 1e-6  # CPU seconds per event second
    fraction = min(1.0, CPU_RUN_S / (per_s * CPU_MIN_EVENT_S))
    event_s = min(CPU_MAX_EVENT_S, max(CPU_MIN_EVENT_S, CPU_RUN_S / (per_s * fraction)))
    segment = event_s / CPU_SEGMENTS
    period = longest_period(sp)
    if period and segment >= period:
        segment = math.floor(segment / period) * period
    return fraction, segment * CPU_SEGMENTS, segment


def state_window(sp: SitePlan) -> float:
    """The longest edge window whose state grows with it (values kept for percentiles),
    seconds; 0 if none."""
    need = 0.0
    for st in sp.stages:
        if sp.where(st.id) in ("edge", "split") and st.operator == "window" and any(
                str(a).strip().startswith("p") for a in st.params.get("aggregates", [])):
            need = max(need, parse_duration(st.params["size"]))
    return need


def state_backlog(sp: SitePlan) -> float:
    """Seconds of readings the realtime run starts with, so that window state that grows with
    the window (values kept for percentiles) has its steady size: a window's length, at most
    MAX_BACKLOG_S; 0 if no edge stage keeps such state. The run places its measurement in the
    middle of that window (`edgewise.plan.sim_runs.anchor_start`)."""
    return min(state_window(sp), MAX_BACKLOG_S)


def longest_period(sp: SitePlan) -> float:
    """The longest emission period of the edge stages (window slide, downsample interval, FFT
    block), seconds; 0 if none."""
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
