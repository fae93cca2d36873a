"""The plan: flows, placement and every estimate, per site type and for the fleet.

`build_plan(workload, costs)` builds the flow model, decides placement, works out the
edge-to-cloud streams, and computes the figures from a `Calibration` (the model's own numbers).
CPU comes from `costs`: the static table by default (then `build_plan` is pure), or a
`costs.Calibrator` that benchmarks each operator on this machine. `apply_measurement`
recomputes the figures from a `Calibration` that the simulation measured, keeping the model's
figures beside them for the document.

Units: bytes, seconds, records per second, cores; money in the workload's currency ($).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgewise.plan import flows as F
from edgewise.plan.cost_model import (
    COMMIT_INTERVAL_S,
    INGEST_US,
    TICK_S,
    EngineCost,
    StageCost,
    stage_cpu_us,
)
from edgewise.plan.costs import Costs
from edgewise.plan.placement import Decision, StageFacts, decide
from edgewise.plan.workload import HardwareOption, SiteSpec, StageSpec, Workload

MONTH_S = 30 * 86400
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
# control plane
HEARTBEAT_S = 30.0
SESSIONS_PER_REPLICA = 5_000
CHUNKS_PER_REPLICA = 5_000  # chunk ingests per second per replica (batched DB writes)
BYTES_PER_REPLICA = 50e6
PG_ROWS_PER_S = 50_000  # batched multi-row inserts one PostgreSQL primary sustains
SQLITE_MAX_NODES = 50
SQLITE_MAX_ROWS = 500
REPLICA_CORES = 2
REPLICA_RAM = 4 * 1024**3
HARD_SCALE = 10_000

ALARM_OPERATORS = {"threshold", "anomaly"}


@dataclass(frozen=True)
class Stream:
    """Records that cross from the edge to the cloud."""

    name: str
    origin: str  # stage or source id
    kind: str  # alarm | data | raw
    priority: str  # outbox priority name
    compact: bool


@dataclass
class Calibration:
    """The per-site numbers the figures rest on: the model's, or the simulation's."""

    source: str  # "model" | "simulation"
    stage_cpu_us: dict[str, float]  # thread-CPU microseconds per second, per stage
    stage_out: dict[str, float]  # records per second, per stage
    stream_wire: dict[str, float]  # bytes per second on the socket, per stream
    stream_records: dict[str, float]
    stream_payload: dict[str, float]
    raw_wire: float  # every reading through the codec (no edge processing), bytes/s
    stored_per_s: float  # outbox fill rate (payload bytes/s) while the link is down
    engine_latency_s: np.ndarray  # samples of accept -> local action at the edge
    cores_total: float | None = None  # measured at the real rate (realtime run)
    notes: list[str] = field(default_factory=list)
    method: str = ""  # how the CPU figures were obtained (stated in the document)


@dataclass
class Latency:
    edge_p50: float
    edge_p99: float
    cloud_p50: float
    cloud_p99: float
    edge_samples: np.ndarray
    cloud_samples: np.ndarray
    budget: float
    edge_within: float  # share of alarms within budget (node up)
    cloud_within: float  # share within budget, outages included


@dataclass
class Sizing:
    cores_needed: float  # at 100% utilisation
    cores_required: float  # with headroom
    ram: float
    disk: float
    option: HardwareOption
    nodes: int
    fits: bool
    parts: dict[str, float]


@dataclass
class Figures:
    """Everything quantified for one site type from one calibration."""

    calibration: Calibration
    readings_per_s: float
    naive_per_s: float  # one JSON message per reading over MQTT and TLS
    raw_wire_per_s: float
    edge_wire_per_s: float
    latency: Latency
    outage_s: float
    outbox_bytes: int  # recommended max_bytes
    backlog_bytes: float  # at the end of the longest outage
    lost_default_bytes: float  # what a default-sized outbox could not hold
    lost_default_s: float
    drain_s: float  # time to empty the backlog after the longest outage
    sizing: Sizing

    def gb_month(self, bps: float) -> float:
        return bps * MONTH_S / 1e9


@dataclass
class SitePlan:
    site: SiteSpec
    stages: list[StageSpec]
    flows: dict[str, F.Flow]
    facts: dict[str, StageFacts]
    decisions: dict[str, Decision]
    streams: list[Stream]
    estimate: Figures
    measured: Figures | None = None
    linksim: Any = None  # edgewise.plan.linksim.LinkResult when simulated
    stage_costs: dict[str, StageCost] = field(default_factory=dict)
    engine_cost: EngineCost | None = None
    node_cpu: dict[str, float] = field(default_factory=dict)  # modelled cores, by part

    @property
    def final(self) -> Figures:
        return self.measured or self.estimate

    @property
    def name(self) -> str:
        return self.site.name

    def where(self, stage_id: str) -> str:
        return self.decisions[stage_id].where

    def flows_in(self, stage_id: str) -> F.Flow:
        st = next(s for s in self.stages if s.id == stage_id)
        return F.merge([self.flows[r] for r in st.inputs])


@dataclass
class ControlPlane:
    nodes: int
    design_nodes: int
    heartbeats_per_s: float
    chunks_per_s: float
    ingest_bytes_per_s: float
    replicas: int
    store: str
    rows_per_s: float
    storage_bytes: float
    ok_at_scale: bool
    scale_note: str
    rows_per_s_at_scale: float
    replicas_at_scale: int


@dataclass
class Check:
    name: str
    met: bool
    detail: str


@dataclass
class Plan:
    workload: Workload
    sites: list[SitePlan]
    control: ControlPlane
    hard: list[Check]
    requirements: list[Check]
    infeasible: list[str]
    assumed: list[str]
    simulated: bool = False

    @property
    def unmet(self) -> list[str]:
        out = [f"{c.name}: {c.detail}" for c in self.hard + self.requirements if not c.met]
        return out + [x for x in self.infeasible if x not in out]


# -- building ------------------------------------------------------------------------------------

def site_stages(workload: Workload, site: SiteSpec) -> list[StageSpec]:
    """The stages that apply at a site (their inputs exist there), in dependency order."""
    have = {s.id for s in site.sources}
    remaining = list(workload.stages)
    ordered: list[StageSpec] = []
    progress = True
    while remaining and progress:
        progress = False
        for st in list(remaining):
            if all(r in have for r in st.inputs):
                ordered.append(st)
                have.add(st.id)
                remaining.remove(st)
                progress = True
    return ordered


def is_alarm(st: StageSpec) -> bool:
    if st.operator in ALARM_OPERATORS:
        return True
    if st.operator == "rate_of_change" and st.params.get("limit") is not None:
        return True
    return st.local is not None


def lognormal(p50: float, p99: float, n: int, rng: np.random.Generator) -> np.ndarray:
    sigma = max(0.0, (math.log(p99) - math.log(p50)) / 2.3263)
    return rng.lognormal(math.log(p50), sigma, n)


def build_plan(workload: Workload, costs: Costs | None = None) -> Plan:
    costs = costs or Costs()
    sites = [_plan_site(workload, site, costs) for site in workload.sites]
    costs.save()
    return _finish(workload, sites, simulated=False)


def _plan_site(workload: Workload, site: SiteSpec, costs: Costs) -> SitePlan:
    stages = site_stages(workload, site)
    flows: dict[str, F.Flow] = {s.id: F.source_flow(s, site.name) for s in site.sources}
    for st in stages:
        flows[st.id] = F.stage_flow(st, [flows[r] for r in st.inputs])
    stage_costs = costs.site(site, stages, flows)
    engine = costs.engine()
    cal = model_calibration(workload, site, stages, flows, stage_costs, engine)
    cal.method = costs.describe()
    facts, decisions = _place(workload, site, stages, flows, cal)
    streams = make_streams(site, stages, decisions)
    cal = _with_streams(site, flows, streams, cal)
    sp = SitePlan(site, stages, flows, facts, decisions, streams, None,  # type: ignore[arg-type]
                  stage_costs=stage_costs, engine_cost=engine)
    sp.node_cpu = node_cpu_model(sp, cal, costs)
    sp.estimate = compute_figures(workload, site, stages, decisions, streams, cal,
                                  sp.node_cpu)
    return sp


def reestimate(workload: Workload, sp: SitePlan, stage_costs: dict[str, StageCost],
               costs: Costs) -> SitePlan:
    """The site's estimate from new stage costs (a fresh calibration), placement kept."""
    engine = sp.engine_cost or costs.engine()
    cal = model_calibration(workload, sp.site, sp.stages, sp.flows, stage_costs, engine)
    cal.method = costs.describe()
    cal = _with_streams(sp.site, sp.flows, sp.streams, cal)
    new = replace(sp, stage_costs=stage_costs, engine_cost=engine)
    new.node_cpu = node_cpu_model(new, cal, costs)
    new.estimate = compute_figures(workload, sp.site, sp.stages, sp.decisions, sp.streams, cal,
                                   new.node_cpu)
    return new


def model_calibration(workload: Workload, site: SiteSpec, stages: list[StageSpec],
                      flows: dict[str, F.Flow], stage_costs: dict[str, StageCost],
                      engine: EngineCost) -> Calibration:
    cpu: dict[str, float] = {}
    out: dict[str, float] = {}
    for st in stages:
        fin = F.merge([flows[r] for r in st.inputs])
        cpu[st.id] = stage_cpu_us(st, stage_costs[st.id], fin, flows[st.id])
        out[st.id] = flows[st.id].rate
    raw = sum(F.encoded_bytes(flows[s.id], site.link.batch_interval).wire_per_s
              for s in site.sources)
    rng = np.random.default_rng(11)
    p50, p99 = _engine_latency_model(site, stages, cpu, engine)
    lat = lognormal(p50, p99, LATENCY_SAMPLES, rng)
    notes = sorted({a for f in flows.values() for a in f.assumed})
    return Calibration("model", cpu, out, {}, {}, {}, raw, 0.0, lat, None, notes)


def _engine_latency_model(site: SiteSpec, stages: list[StageSpec], cpu: dict[str, float],
                          engine: EngineCost) -> tuple[float, float]:
    batches = source_batches(site)
    per_batch = {st.id: cpu[st.id] / max(batches, 1e-9) * 1e-6 for st in stages}
    alarm_path = sum(v for sid, v in per_batch.items()
                     if is_alarm(next(s for s in stages if s.id == sid)))
    everything = sum(per_batch.values())
    p50 = ENGINE_LATENCY_BASE_S + engine.batch_us * 1e-6 + alarm_path
    p99 = p50 + everything + (engine.commit_loop_us + engine.commit_us) * 1e-6
    return p50, p99


def _with_streams(site: SiteSpec, flows: dict[str, F.Flow], streams: list[Stream],
                  cal: Calibration) -> Calibration:
    wire: dict[str, float] = {}
    recs: dict[str, float] = {}
    payload: dict[str, float] = {}
    for s in streams:
        b = F.encoded_bytes(flows[s.origin], site.link.batch_interval)
        wire[s.name] = b.wire_per_s
        recs[s.name] = flows[s.origin].rate
        payload[s.name] = b.payload_per_s
    stored = sum(payload.values()) * STORE_OVERHEAD
    return replace(cal, stream_wire=wire, stream_records=recs, stream_payload=payload,
                   stored_per_s=stored)


def _place(workload: Workload, site: SiteSpec, stages: list[StageSpec],
           flows: dict[str, F.Flow], cal: Calibration) -> tuple[dict[str, StageFacts],
                                                                dict[str, Decision]]:
    link = site.link
    rng = np.random.default_rng(5)
    lan = lognormal(site.lan.p50, site.lan.p99, 50_000, rng)
    wan = lognormal(link.rtt.p50, link.rtt.p99, 50_000, rng)
    eng = cal.engine_latency_s[:50_000]
    edge = lan + eng
    cloud = lan + eng + COMMIT_LATENCY_S + wan + CLOUD_INGEST_S + eng
    edge_p99 = float(np.percentile(edge, 99))
    cloud_p99 = float(np.percentile(cloud, 99))
    biggest = max(workload.hardware, key=lambda h: (h.cores, h.ram))
    gpu = any(h.gpu for h in workload.hardware)
    costs = workload.body.costs
    cheapest_per_core = min(h.price / h.cores for h in workload.hardware)
    edge_core_month = cheapest_per_core / costs.hardware_months
    cloud_core_month = costs.cloud_core_hour * 730
    personal = {s.id for s in site.sources if s.personal_data}
    facts: dict[str, StageFacts] = {}
    for st in stages:
        fin_bytes = sum(F.encoded_bytes(flows[r], link.batch_interval).wire_per_s
                        for r in st.inputs)
        fout_bytes = F.encoded_bytes(flows[st.id], link.batch_interval).wire_per_s \
            if st.to_cloud or _has_consumers(st.id, stages) else 0.0
        memory = float(st.memory or 0)
        facts[st.id] = StageFacts(
            id=st.id, inputs=tuple(st.inputs), operator=st.operator or "function",
            latency_budget_s=st.latency_budget, cloud_p99_s=cloud_p99, edge_p99_s=edge_p99,
            link_p99_rtt_s=link.rtt.p99, bytes_in_per_s=fin_bytes, bytes_out_per_s=fout_bytes,
            uplink_bytes_per_s=link.uplink / 8, cost_per_gb=link.cost_per_gb,
            cores=cal.stage_cpu_us[st.id] / 1e6, memory_bytes=memory, needs=tuple(st.needs),
            during_outage=st.during_outage, local_action=st.local is not None,
            personal_data_in=bool(personal & set(_all_upstream(st, stages))),
            largest_node_cores=biggest.cores, largest_node_ram=biggest.ram,
            gpu_available=gpu, edge_core_month=edge_core_month,
            cloud_core_month=cloud_core_month, pinned=st.placement,
        )
    return facts, decide(list(facts.values()))


def _has_consumers(stage_id: str, stages: list[StageSpec]) -> bool:
    return any(stage_id in s.inputs for s in stages)


def _all_upstream(st: StageSpec, stages: list[StageSpec]) -> list[str]:
    by_id = {s.id: s for s in stages}
    out: list[str] = []
    todo = list(st.inputs)
    while todo:
        x = todo.pop()
        out.append(x)
        if x in by_id:
            todo.extend(by_id[x].inputs)
    return out


def make_streams(site: SiteSpec, stages: list[StageSpec],
                 decisions: dict[str, Decision]) -> list[Stream]:
    """What crosses the uplink: outputs of edge stages the cloud needs, raw input of cloud
    stages that read sources directly."""
    streams: list[Stream] = []
    seen: set[str] = set()
    source_ids = {s.id for s in site.sources}
    for st in stages:
        where = decisions[st.id].where
        consumers = [c for c in stages if st.id in c.inputs]
        cloud_reads = any(decisions[c.id].where == "cloud" for c in consumers)
        if where == "split" or (where == "edge" and (st.to_cloud or cloud_reads)):
            name = f"{st.id}-partial" if where == "split" else st.id
            alarm = is_alarm(st)
            streams.append(Stream(name, st.id, "alarm" if alarm else "data",
                                  "alarm" if alarm else "normal", False))
        if where == "cloud":
            for ref in st.inputs:
                if ref in source_ids and ref not in seen:
                    seen.add(ref)
                    streams.append(Stream(f"{ref}-raw", ref, "raw", "low", True))
    return streams


# -- figures -------------------------------------------------------------------------------------

def compute_figures(workload: Workload, site: SiteSpec, stages: list[StageSpec],
                    decisions: dict[str, Decision], streams: list[Stream],
                    cal: Calibration, node_cpu: dict[str, float]) -> Figures:
    link = site.link
    req = workload.requirements
    readings = sum(s.count * s.rate_hz for s in site.sources)
    naive = 0.0
    for s in site.sources:
        topic = len(f"{site.name}/{F.source_groups(s, site.name)[0][0]}/000")
        naive += s.count * s.rate_hz * F.mqtt_message_bytes(topic, F.json_reading_bytes(
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


def _latency(site: SiteSpec, budget: float, cal: Calibration) -> Latency:
    rng = np.random.default_rng(3)
    n = LATENCY_SAMPLES
    eng = rng.choice(cal.engine_latency_s, n) if len(cal.engine_latency_s) else np.zeros(n)
    eng2 = rng.choice(cal.engine_latency_s, n) if len(cal.engine_latency_s) else np.zeros(n)
    lan = lognormal(site.lan.p50, site.lan.p99, n, rng)
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
        size = F.registry.resolve("operator", "window").Config.model_validate(st.params)
        open_ = 1 + round(float(size.size) / float(size.slide or size.size))
        return fout.keys * open_ * 200.0 * max(1, len(size.aggregates))
    if op == "fft":
        return fin.keys * int(st.params.get("samples", 1024)) * 8.0 * 2
    return fin.keys * 64.0


def source_batches(site: SiteSpec) -> float:
    """Batches per second the site's sources hand to the engine."""
    return sum(F.source_flow(s, site.name).calls for s in site.sources)


def commits_per_s(batches: float, interval: float = COMMIT_INTERVAL_S) -> float:
    """Group commits per second: one per batch, at most one per ``interval`` (a commit starts
    with the first batch after the interval, half a batch gap late on average)."""
    if batches <= 0:
        return 0.0
    if batches * interval <= 1.0:
        return batches
    return 1.0 / (interval + 0.5 / batches)


def node_cpu_model(sp: SitePlan, cal: Calibration, costs: Costs) -> dict[str, float]:
    """Cores the edge node needs at the real rate, by part (see plan/cost_model.py): protocol
    decoding, the edge stages, the engine per batch and record, the group commits (hand-over,
    every operator's snapshot, the writer's transaction with the checkpoint and one chunk per
    stream) and the engine ticks; each at the real pace, i.e. woken up for every batch."""
    site = sp.site
    eng = sp.engine_cost or costs.engine()
    edge = [st.id for st in sp.stages if sp.where(st.id) in ("edge", "split")]
    readings = sum(s.count * s.rate_hz for s in site.sources)
    batches = source_batches(site)
    commits = commits_per_s(batches)
    sc = sp.stage_costs
    # the snapshots of one commit run one after the other: the first pays for the wake-up
    snapshots = sum(sc[i].snapshot_us for i in edge) + max(
        (sc[i].snapshot_rt_us - sc[i].snapshot_us for i in edge), default=0.0)
    per_commit = eng.commit_loop_rt_us + snapshots + eng.commit_rt_us + \
        eng.checkpoint_byte_us * sum(sc[i].snapshot_bytes for i in edge)
    chunks_us = 0.0
    for s in sp.streams:
        flow = sp.flows[s.origin]
        chunks = min(commits, flow.calls)
        if chunks <= 0 or flow.rate <= 0:
            continue
        enc = costs.stream(flow, flow.rate / chunks)
        chunks_us += chunks * (enc.encode_us + eng.chunk_rt_us + eng.chunk_byte_us * enc.payload)
    return {
        "ingest": sum(s.count * s.rate_hz * INGEST_US[s.protocol] for s in site.sources) / 1e6,
        "stages": sum(cal.stage_cpu_us[i] + sp.flows_in(i).calls * sc[i].wake_us
                      for i in edge) / 1e6,
        "engine": (batches * eng.batch_rt_us + readings * eng.record_us) / 1e6,
        "commits": (commits * per_commit + chunks_us) / 1e6,
        "ticks": (eng.tick_rt_us + sum(sc[i].timer_us for i in edge)) / TICK_S / 1e6,
    }


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
    ram = (OS_RAM + K3S_RAM + AGENT_RAM + broker + SQLITE_CACHE + state + queue) * RAM_HEADROOM
    disk = (OS_DISK + 2 * RELEASE_SLOT + LOG_DISK + outbox * DISK_OVERHEAD) * DISK_HEADROOM
    gpu = any("gpu" in by_id[i].needs for i in edge_ids)
    options = sorted(workload.hardware, key=lambda h: h.price)
    for h in options:
        if h.cores >= required and h.ram >= ram and h.disk >= disk and (h.gpu or not gpu):
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


# -- fleet ---------------------------------------------------------------------------------------

def control_plane(workload: Workload, sites: list[SitePlan]) -> ControlPlane:
    nodes = workload.fleet_size
    design = max(nodes, HARD_SCALE)
    per_node_chunks = 0.0
    per_node_bytes = 0.0
    payload = 0.0
    total_nodes = 0
    for sp in sites:
        fig = sp.final
        cal = fig.calibration
        n = sp.site.count * max(sp.site.nodes, fig.sizing.nodes)
        total_nodes += n
        chunks = 0.0
        for s in sp.streams:
            recs = cal.stream_records.get(s.name, 0.0)
            interval = sp.site.link.batch_interval
            lam = recs * interval
            chunks += (1 - math.exp(-lam)) / interval if lam < 50 else 1 / interval
        per_node_chunks += chunks * sp.site.count
        per_node_bytes += fig.edge_wire_per_s * sp.site.count
        payload += sum(cal.stream_payload.values()) * sp.site.count
    sites_total = sum(sp.site.count for sp in sites) or 1
    chunk_rate = per_node_chunks * nodes / sites_total
    byte_rate = per_node_bytes * nodes / sites_total
    hb = nodes / HEARTBEAT_S

    def replicas_for(n: int, chunks: float, bytes_: float) -> int:
        need = max(n / SESSIONS_PER_REPLICA, chunks / CHUNKS_PER_REPLICA,
                   bytes_ / BYTES_PER_REPLICA)
        return max(2, math.ceil(need) + 1)

    rows = chunk_rate + hb
    store = "SQLite (embedded)" if nodes <= SQLITE_MAX_NODES and rows <= SQLITE_MAX_ROWS \
        else "PostgreSQL"
    scale = design / nodes
    rows_scale = rows * scale
    ok = rows_scale <= PG_ROWS_PER_S
    if ok:
        note = (f"at {design:,} nodes: {rows_scale:,.0f} rows/s of {PG_ROWS_PER_S:,} a "
                f"PostgreSQL primary takes in batches")
    else:
        factor = math.ceil(rows_scale / PG_ROWS_PER_S)
        note = (f"at {design:,} nodes: {rows_scale:,.0f} rows/s exceed {PG_ROWS_PER_S:,}; "
                f"send chunks {factor}x less often or partition the store by node")
    storage = payload * nodes / sites_total * workload.requirements.retention * 1.2
    # an embedded SQLite store is one process; replicas share PostgreSQL (DESIGN principle 9)
    replicas = 1 if store.startswith("SQLite") else replicas_for(nodes, chunk_rate, byte_rate)
    return ControlPlane(
        nodes, design, hb, chunk_rate, byte_rate, replicas,
        store, rows, storage, ok, note, rows_scale,
        replicas_for(design, chunk_rate * scale, byte_rate * scale),
    )


def _finish(workload: Workload, sites: list[SitePlan], simulated: bool) -> Plan:
    control = control_plane(workload, sites)
    infeasible: list[str] = []
    assumed: list[str] = []
    for sp in sites:
        for d in sp.decisions.values():
            infeasible.extend(f"{sp.name}: {x}" for x in d.infeasible)
        assumed.extend(sp.estimate.calibration.notes)
    hard = hard_constraints(workload, sites, control)
    reqs = requirement_checks(workload, sites)
    return Plan(workload, sites, control, hard, reqs, infeasible, sorted(set(assumed)), simulated)


def apply_measurement(plan: Plan, measured: dict[str, Calibration],
                      linksims: dict[str, Any]) -> Plan:
    """Recompute every figure from measured calibrations (per site name)."""
    sites = []
    for sp in plan.sites:
        cal = measured.get(sp.name)
        if cal is None:
            sites.append(sp)
            continue
        fig = compute_figures(plan.workload, sp.site, sp.stages, sp.decisions, sp.streams, cal,
                              sp.node_cpu)
        sites.append(replace(sp, measured=fig, linksim=linksims.get(sp.name)))
    return _finish(plan.workload, sites, simulated=True)


def hard_constraints(workload: Workload, sites: list[SitePlan],
                     control: ControlPlane) -> list[Check]:
    checks: list[Check] = []
    # 1. autonomy during partitions
    problems = []
    for sp in sites:
        for st in sp.stages:
            if (st.during_outage or st.local is not None or is_alarm(st)) and \
                    sp.where(st.id) == "cloud":
                problems.append(f"{sp.name}: {st.id} runs in the cloud")
        fig = sp.final
        if not fig.sizing.fits:
            problems.append(f"{sp.name}: no node option holds the outbox and the stages")
        if sp.linksim is not None and sp.linksim.lost_bytes.get("alarm", 0) > 0:
            problems.append(f"{sp.name}: alarms lost in the link simulation")
    checks.append(Check(
        "nodes autonomous during partitions", not problems,
        "; ".join(problems) if problems else
        "every alarm, local action and outage-critical stage runs at the edge; the outbox "
        "rides out the longest outage on the chosen node"))
    # 2. atomic updates with rollback
    bad = [sp.name for sp in sites if sp.final.sizing.disk > sp.final.sizing.option.disk]
    checks.append(Check(
        "atomic updates with rollback", not bad,
        f"no room for two release slots on {', '.join(bad)}" if bad else
        f"A/B release slots ({RELEASE_SLOT // 1024**3} GiB each) fit on every node; the rollout "
        "plan gates each wave on health and rolls back automatically"))
    # 3. encryption
    detail = ("all edge-cloud traffic uses one mutual-TLS 1.3 session per node; the bandwidth "
              "figures include the TLS record overhead")
    if not workload.requirements.encryption:
        detail += " (the workload asked for none; Edgewise encrypts regardless)"
    checks.append(Check("all edge-cloud traffic encrypted", True, detail))
    # 4. scale
    checks.append(Check("management scales to 10,000+ nodes", control.ok_at_scale,
                        f"{control.replicas_at_scale} control-plane replicas; "
                        + control.scale_note))
    return checks


def requirement_checks(workload: Workload, sites: list[SitePlan]) -> list[Check]:
    req = workload.requirements
    out: list[Check] = []
    for sp in sites:
        fig = sp.final
        alarms = [st for st in sp.stages if is_alarm(st)]
        if alarms:
            where = {sp.where(st.id) for st in alarms}
            p99 = fig.latency.edge_p99 if where <= {"edge", "split"} else fig.latency.cloud_p99
            ok = p99 <= req.max_alarm_latency
            out.append(Check(
                f"{sp.name}: alarm latency", ok,
                f"p99 {p99 * 1000:,.2f} ms against the maximum of "
                f"{req.max_alarm_latency * 1000:,.0f} ms" + ("" if ok else
                                                              " - no placement meets it")))
        for st in sp.stages:
            if st.latency_budget is None:
                continue
            w = sp.where(st.id)
            p99 = fig.latency.edge_p99 if w in ("edge", "split") else fig.latency.cloud_p99
            if p99 > st.latency_budget:
                out.append(Check(
                    f"{sp.name}: {st.id} latency budget", False,
                    f"p99 {p99 * 1000:,.2f} ms at the {w} exceeds the budget of "
                    f"{st.latency_budget * 1000:,.1f} ms; no placement meets it"
                    if w != "cloud" else f"p99 {p99 * 1000:,.1f} ms exceeds the budget"))
        capacity = sp.site.link.uplink / 8 * DATA_SHARE
        out.append(Check(
            f"{sp.name}: uplink capacity", fig.edge_wire_per_s < capacity,
            f"{fig.edge_wire_per_s * 8 / 1e3:,.1f} kbit/s of {capacity * 8 / 1e3:,.0f} kbit/s "
            "usable for data"))
        out.append(Check(
            f"{sp.name}: offline autonomy", fig.sizing.fits and math.isfinite(fig.drain_s),
            f"outbox of {fig.outbox_bytes / 1024**2:,.0f} MiB holds "
            f"{fig.outage_s / 3600:,.1f} h of output; drains in "
            f"{_dur(fig.drain_s)} after the longest outage"))
    return out


def _dur(s: float) -> str:
    if not math.isfinite(s):
        return "never (the uplink is too small)"
    if s < 120:
        return f"{s:,.0f} s"
    if s < 7200:
        return f"{s / 60:,.0f} min"
    return f"{s / 3600:,.1f} h"
