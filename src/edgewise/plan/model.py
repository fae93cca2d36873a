"""The plan: flows, placement and every estimate, per site type and for the fleet.

`build_plan(workload, costs)` builds the flow model, decides placement, works out the
edge-to-cloud streams, and computes the figures from a `Calibration` (the model's own numbers;
`edgewise.plan.site_figures`), then the control plane and the checks (`edgewise.plan.fleet`).
CPU comes from `costs`: the static table by default (then `build_plan` is pure), or a
`costs.Calibrator` that benchmarks each operator on this machine. `apply_measurement`
recomputes the figures from a `Calibration` that the simulation measured, keeping the model's
figures beside them for the document. What a plan holds is in `edgewise.plan.results`.

Units: bytes, seconds, records per second, cores; money in the workload's currency ($).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from edgewise.plan import flows as F
from edgewise.plan.cost_model import EngineCost, StageCost, stage_cpu_us
from edgewise.plan.costs import Costs
from edgewise.plan.encoding import encoded_bytes
from edgewise.plan.fleet import control_plane, hard_constraints, requirement_checks
from edgewise.plan.placement import Decision, StageFacts, decide
from edgewise.plan.results import Calibration, Plan, SitePlan, Stream, is_alarm
from edgewise.plan.site_figures import (
    CLOUD_INGEST_S,
    COMMIT_LATENCY_S,
    ENGINE_LATENCY_BASE_S,
    LATENCY_SAMPLES,
    STORE_OVERHEAD,
    checkpoint_bytes,
    compute_figures,
    lan_path,
    lognormal,
    node_cpu_model,
    source_batches,
)
from edgewise.plan.workload import SiteSpec, StageSpec, Workload

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
    sp.engine_site = costs.site_engine(site, checkpoint_bytes(sp))
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
    raw = sum(encoded_bytes(flows[s.id], site.link.batch_interval).wire_per_s
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
        b = encoded_bytes(flows[s.origin], site.link.batch_interval)
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
    lan = lan_path(site, 50_000, rng)
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
    personal = {s.id for s in site.sources if s.tags}  # any compliance tag keeps it close
    facts: dict[str, StageFacts] = {}
    for st in stages:
        fin_bytes = sum(encoded_bytes(flows[r], link.batch_interval).wire_per_s
                        for r in st.inputs)
        fout_bytes = encoded_bytes(flows[st.id], link.batch_interval).wire_per_s \
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
