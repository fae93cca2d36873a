"""The figures of one site type from one `Calibration`: latency, outbox, link and node sizing.

`compute_figures` turns a calibration (the model's or the simulation's) into `Figures`:
alarm latency by Monte Carlo over the LAN, link and engine distributions, the outbox that rides
out the longest outage and how fast it drains, and the node (`node_cpu_model` for the cores by
part at the real rate, RAM and disk with headroom) from the workload's hardware options.
"""

from __future__ import annotations

import math

import numpy as np

from edgewise.pipeline import registry
from edgewise.plan import flows as F
from edgewise.plan.cost_model import COMMIT_INTERVAL_S, TICK_S, StageCost, stage_gcs_per_s
from edgewise.plan.costs import Costs
from edgewise.plan.encoding import json_reading_bytes, mqtt_message_bytes
from edgewise.plan.gc_cost import full_per_s, promoted_per_s
from edgewise.plan.linksim import SecondRoute
from edgewise.plan.placement import Decision
from edgewise.plan.results import Calibration, Figures, Latency, SitePlan, Sizing, Stream
from edgewise.plan.workload import SiteSpec, StageSpec, Workload

# latency model (seconds)
ENGINE_LATENCY_BASE_S = 150e-6  # accept -> first stage: queue hand-over and scheduling
COMMIT_LATENCY_S = 1e-3  # group commit with fsync before a record may leave the node
CLOUD_INGEST_S = 2e-3  # cloud: decode, dedupe, durable commit
LATENCY_SAMPLES = 200_000
# outbox and link
STORE_OVERHEAD = 1.25  # stored (per-commit) chunks are smaller than uplink chunks
OUTBOX_HEADROOM = 1.25
DEFAULT_OUTBOX = 256 * 1024**2  # the engine's default max_bytes
DATA_SHARE = 0.8  # share of the uplink data may use; the rest is for control and others
# node sizing
OS_RAM = 512 * 1024**2
K3S_RAM = 768 * 1024**2
AGENT_RAM = 150 * 1024**2
BROKER_RAM = 64 * 1024**2
SQLITE_CACHE = 64 * 1024**2
RAM_HEADROOM = 1.5
OS_DISK = 8 * 1024**3
RELEASE_SLOT = 1024**3  # one A/B slot for a release
LOG_DISK = 2 * 1024**3
DISK_OVERHEAD = 1.5  # SQLite pages and WAL on top of outbox payload bytes
DISK_HEADROOM = 1.25


def lognormal(p50: float, p99: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of a lognormal distribution with the given median and 99th percentile."""
    sigma = max(0.0, (math.log(p99) - math.log(p50)) / 2.3263)
    return rng.lognormal(math.log(p50), sigma, n)


# -- one site type --------------------------------------------------------------------------------

def compute_figures(workload: Workload, site: SiteSpec, stages: list[StageSpec],
                    decisions: dict[str, Decision], streams: list[Stream],
                    cal: Calibration, node_cpu: dict[str, float]) -> Figures:
    link = site.link
    req = workload.requirements
    readings = sum(s.count * s.rate_hz for s in site.sources)
    naive = 0.0
    for s in site.sources:
        topic = len(f"{site.name}/{F.source_groups(s, site.name)[0][0]}/000")
        naive += s.count * s.rate_hz * mqtt_message_bytes(topic, json_reading_bytes(
            s, site.name))
    edge_wire = sum(cal.stream_wire.values())
    latency = _latency(site, req.max_alarm_latency, cal)
    outage = max(link.longest_outage, req.offline_autonomy)
    backlog = cal.stored_per_s * outage
    outbox = int(max(64 * 1024**2, math.ceil(backlog * OUTBOX_HEADROOM / 1024**2) * 1024**2))
    lost_default = max(0.0, backlog - DEFAULT_OUTBOX)
    lost_default_s = lost_default / cal.stored_per_s if cal.stored_per_s else 0.0
    capacity = link.uplink / 8 * DATA_SHARE
    spare = capacity - edge_wire
    drain = backlog / spare if spare > 0 else math.inf
    sizing = _size_node(workload, site, stages, decisions, cal, outbox, node_cpu)
    return Figures(cal, readings, naive, cal.raw_wire, edge_wire, latency, outage, outbox,
                   backlog, lost_default, lost_default_s, drain, sizing)


def lan_path(site: SiteSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of the way from a device to the node: the site LAN, once more for a
    gateway tier between them (a second hop of the same distribution)."""
    lan = lognormal(site.lan.p50, site.lan.p99, n, rng)
    if "gateway" in site.tiers:
        lan = lan + lognormal(site.lan.p50, site.lan.p99, n, rng)
    return lan


def second_route(site: SiteSpec) -> SecondRoute | None:
    """The site's second link as the link model uses it (`edgewise.plan.linksim`), or None."""
    sl = site.second_link
    if sl is None:
        return None
    start = 0.0
    if sl.window is not None:
        hh, mm = (int(x) for x in sl.window.start.split(":"))
        start = hh * 3600.0 + mm * 60.0
    return SecondRoute(sl.role, sl.uplink / 8 * DATA_SHARE, sl.availability, start,
                       sl.window.length if sl.window is not None else 0.0)


def failover_backlog_per_s(site: SiteSpec, stored_per_s: float) -> float:
    """Bytes per second the outbox grows by while the first link is down: all that is stored,
    less what a failover link carries (its expected rate)."""
    route = second_route(site)
    if route is None or route.role != "failover":
        return stored_per_s
    return max(0.0, stored_per_s - route.expected_per_s)


def _latency(site: SiteSpec, budget: float, cal: Calibration) -> Latency:
    rng = np.random.default_rng(3)
    n = LATENCY_SAMPLES
    eng = rng.choice(cal.engine_latency_s, n) if len(cal.engine_latency_s) else np.zeros(n)
    eng2 = rng.choice(cal.engine_latency_s, n) if len(cal.engine_latency_s) else np.zeros(n)
    lan = lan_path(site, n, rng)
    wan = lognormal(site.link.rtt.p50, site.link.rtt.p99, n, rng)
    linger = rng.uniform(0, max(F.LINGER_S[s.protocol] for s in site.sources), n)
    edge = lan + linger + eng
    cloud = lan + linger + eng + COMMIT_LATENCY_S + wan + CLOUD_INGEST_S + eng2
    avail = site.link.availability
    return Latency(
        float(np.percentile(edge, 50)), float(np.percentile(edge, 99)),
        float(np.percentile(cloud, 50)), float(np.percentile(cloud, 99)), edge, cloud, budget,
        float(np.mean(edge <= budget)), float(np.mean(cloud <= budget)) * avail,
    )


def _state_bytes(st: StageSpec, fin: F.Flow, fout: F.Flow) -> float:
    op = st.operator
    if st.memory:
        return float(st.memory)
    if op == "window":
        size = registry.resolve("operator", "window").Config.model_validate(st.params)
        open_ = 1 + round(float(size.size) / float(size.slide or size.size))
        return fout.keys * open_ * 200.0 * max(1, len(size.aggregates))
    if op == "fft":
        return fin.keys * int(st.params.get("samples", 1024)) * 8.0 * 2
    return fin.keys * 64.0


def ingest_cores(site: SiteSpec, costs: Costs) -> float:
    """Cores for decoding the sources' messages: per reading and per batch handed over (the
    source's wake-up), from the protocol's calibrated or static costs."""
    total = 0.0
    for s in site.sources:
        per_reading, per_batch = costs.ingest_us(s.protocol)
        total += s.count * s.rate_hz * per_reading + F.source_flow(s, site.name).calls * per_batch
    return total / 1e6


def source_batches(site: SiteSpec) -> float:
    """Batches per second the site's sources hand to the engine."""
    return sum(F.source_flow(s, site.name).calls for s in site.sources)


def batch_driven(batches: float, interval: float = COMMIT_INTERVAL_S) -> bool:
    """Whether every batch starts its own group commit (batches further apart than the commit
    interval), rather than the commit timer starting them."""
    return batches * interval <= 1.0


def commits_per_s(batches: float, interval: float = COMMIT_INTERVAL_S) -> float:
    """Group commits per second: one per batch, at most one per ``interval`` (a commit starts
    with the first batch after the interval, half a batch gap late on average)."""
    if batches <= 0:
        return 0.0
    if batch_driven(batches, interval):
        return batches
    return 1.0 / (interval + 0.5 / batches)


def checkpoint_bytes(sp: SitePlan, stage_costs: dict[str, StageCost] | None = None) -> float:
    """Packed bytes of the edge operators' state, written with every group commit."""
    sc = sp.stage_costs if stage_costs is None else stage_costs
    return sum(sc[st.id].snapshot_bytes for st in sp.stages
               if sp.where(st.id) in ("edge", "split") and st.id in sc)


def snapshot_us_per_commit(sp: SitePlan) -> float:
    """CPU microseconds of the edge operators' snapshots (packed) at one group commit."""
    sc = sp.stage_costs
    edge = [st.id for st in sp.stages if sp.where(st.id) in ("edge", "split")]
    if batch_driven(source_batches(sp.site)):  # every batch starts one, after a sleep
        return sum(sc[i].woken_snapshot_us() for i in edge)
    # cut by the commit timer between batches: the first snapshot runs cold
    return sum(sc[i].snapshot_us for i in edge) + max(
        (sc[i].cold_extra_us() for i in edge), default=0.0)


def node_cpu_model(sp: SitePlan, cal: Calibration, costs: Costs) -> dict[str, float]:
    """Cores the edge node needs at the real rate, by part (see plan/cost_model.py): protocol
    decoding, the edge stages, the engine per batch and record, the group commits (hand-over,
    every operator's snapshot, the writer's transaction with the checkpoint and one chunk per
    stream), the engine ticks and the garbage collector's full collections
    (`edgewise.plan.gc_cost`); each at the real pace, i.e. woken up for every batch."""
    site = sp.site
    eng = sp.engine_cost or costs.engine()
    edge = [st.id for st in sp.stages if sp.where(st.id) in ("edge", "split")]
    readings = sum(s.count * s.rate_hz for s in site.sources)
    batches = source_batches(site)
    commits = commits_per_s(batches)
    alone = sp.engine_site
    if alone is not None:
        commits = alone["commits_per_s"]
    sc = sp.stage_costs
    snapshots = snapshot_us_per_commit(sp)
    # the writer's CPU for the checkpoint's bytes; the engine's run at the site's pace wrote
    # ``checkpoint_bytes`` of them with every commit, in its cores already
    paid = alone.get("checkpoint_bytes", 0.0) if alone is not None else 0.0
    state = snapshots + eng.checkpoint_byte_us * (sum(sc[i].snapshot_bytes for i in edge) - paid)
    if batch_driven(batches):  # cut right after a batch, on a warm loop; woken to complete
        loop = eng.commit_cut_us + eng.commit_done_rt_us
    else:  # cut by the commit timer: the loop wakes up for it
        loop = eng.commit_loop_rt_us
    per_commit = loop + state + eng.writer_commit_us(commits)
    chunks_us = 0.0
    for s in sp.streams:
        flow = sp.flows[s.origin]
        chunks = min(commits, flow.calls)
        if chunks <= 0 or flow.rate <= 0:
            continue
        enc = costs.stream(flow, flow.rate / chunks)
        chunks_us += chunks * (enc.encode_us + eng.chunk_rt_us + eng.chunk_byte_us * enc.payload)
    stages = sum(cal.stage_cpu_us[i] + sp.flows_in(i).calls * sc[i].wake_us
                 for i in edge) / 1e6
    timers = sum(sc[i].timer_us for i in edge) / TICK_S / 1e6
    # the collector's full collections: those the snapshots, the stages' calls and the
    # engine trigger, each costing a full traversal of the process (`edgewise.plan.gc_cost`);
    # the objects promoted from the collections and what a middle one promoted on average
    by_id = {st.id: st for st in sp.stages}
    runs = commits * sum(sc[i].snapshot_gcs for i in edge) + sum(
        stage_gcs_per_s(by_id[i], sc[i], sp.flows_in(i), sp.flows[i]) for i in edge)
    if alone is not None:
        runs += alone.get("collections_per_s", 0.0)
    full_us, heap, per_middle = costs.gc_full(site, sp.stages)
    if per_middle is None:  # no middle collection seen: the count alone decides
        heap = 0.0
    promoted = promoted_per_s(runs, per_middle or 0.0)
    collector = full_per_s(runs, promoted, heap) * full_us / 1e6
    if alone is not None:  # batches, records, commits and ticks at the site's own pace
        return {
            "ingest": ingest_cores(site, costs), "stages": stages,
            "engine at the site's pace": alone["cores"],
            "commits: state and chunks": (commits * state + chunks_us) / 1e6,
            "ticks": timers, "garbage collector": collector,
        }
    parts = {
        "ingest": ingest_cores(site, costs), "stages": stages,
        "engine": (batches * eng.batch_rt_us + readings * eng.record_us) / 1e6,
        "commits": (commits * per_commit + chunks_us) / 1e6,
        "ticks": eng.tick_rt_us / TICK_S / 1e6 + timers,
    }
    if collector > 0:  # the static table has no collector figures
        parts["garbage collector"] = collector
    return parts


def _size_node(workload: Workload, site: SiteSpec, stages: list[StageSpec],
               decisions: dict[str, Decision], cal: Calibration, outbox: int,
               node_cpu: dict[str, float]) -> Sizing:
    req = workload.requirements
    edge_ids = [st.id for st in stages if decisions[st.id].where in ("edge", "split")]
    by_id = {st.id: st for st in stages}
    parts = dict(node_cpu)
    if cal.cores_total is not None:
        # measured at the real rate; the simulator's own work is not counted, protocol
        # decoding (which the simulator does not do) is the model's
        parts = {"ingest": node_cpu["ingest"], "engine (measured)": cal.cores_total}
    needed = sum(parts.values())
    required = needed / req.utilisation
    state = 0.0
    flows = _flows_of(site, stages)
    for sid in edge_ids:
        st = by_id[sid]
        state += _state_bytes(st, F.merge([flows[r] for r in st.inputs]), flows[sid])
    max_batch = max(F.batch_records(s.count * s.rate_hz, s.count, s.protocol) for s in site.sources)
    queue = 8 * max_batch * 120.0 * len(site.sources)
    broker = BROKER_RAM if any(s.protocol == "mqtt" for s in site.sources) or any(
        by_id[i].local is not None and by_id[i].local.mqtt_topic for i in edge_ids) else 0
    # models the edge stages run: loaded in memory, and kept in both release slots on disk
    models = {m.name: m for m in workload.body.models}
    used = [models[n] for n in {by_id[i].model for i in edge_ids} if n in models]
    model_bytes = float(sum(m.size for m in used))
    accel = max((m.accelerator_memory or 0 for m in used if m.accelerator != "none"), default=0)
    ram = (OS_RAM + K3S_RAM + AGENT_RAM + broker + SQLITE_CACHE + state + queue
           + model_bytes) * RAM_HEADROOM
    disk = (OS_DISK + 2 * (RELEASE_SLOT + model_bytes) + LOG_DISK
            + outbox * DISK_OVERHEAD) * DISK_HEADROOM
    gpu = any("gpu" in by_id[i].needs for i in edge_ids)
    options = sorted(workload.hardware, key=lambda h: h.price)
    for h in options:
        if h.cores >= required and h.ram >= ram and h.disk >= disk and (h.gpu or not gpu) \
                and (h.gpu_memory or 0) >= accel:
            return Sizing(needed, required, ram, disk, h, site.nodes, True, parts)
    biggest = max(options, key=lambda h: (h.cores, h.ram, h.disk))
    nodes = max(math.ceil(required / biggest.cores), math.ceil(ram / biggest.ram),
                math.ceil(disk / biggest.disk), 1)
    return Sizing(needed, required, ram, disk, biggest, max(nodes, site.nodes), False, parts)


def _flows_of(site: SiteSpec, stages: list[StageSpec]) -> dict[str, F.Flow]:
    flows = {s.id: F.source_flow(s, site.name) for s in site.sources}
    for st in stages:
        flows[st.id] = F.stage_flow(st, [flows[r] for r in st.inputs])
    return flows
