"""Placement: for every stage, edge, cloud or split, with a decision matrix. Pure functions.

Each criterion gives a `Score`: a number (positive favours the edge, negative the cloud), or a
hard verdict ("must be at the edge" / "must be in the cloud"), and one line saying why:

* latency      the stage's budget against the cloud path's p99 (link p99 RTT plus processing)
* bandwidth    uplink bytes the stage saves when it runs at the edge (input minus output)
* cost         link cost saved against the edge compute it takes, per month
* compute      whether the stage fits on the largest node option (cores, RAM, GPU)
* privacy      data that must stay on site
* offline      the stage is needed while the link is down (alarms, local actions)
* context      the stage needs fleet-wide context, which only the cloud has

Hard verdicts win; if a stage must be in both places it is split (the edge computes a site-local
partial result, the cloud combines them) when its operator allows it (windows), otherwise the
conflict is reported as infeasible. Soft scores are summed; a tie goes to the edge (autonomy is
the default). Data flows only upwards: a stage at the edge pulls its inputs to the edge, and a
stage reading from a cloud stage is in the cloud too (a conflict with a hard verdict is
reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Where = Literal["edge", "cloud", "split"]
MUST_EDGE = "must-edge"
MUST_CLOUD = "must-cloud"
SPLITTABLE = {"window"}


@dataclass(frozen=True)
class Score:
    criterion: str
    value: float | str  # a number, MUST_EDGE or MUST_CLOUD
    why: str

    @property
    def verdict(self) -> str:
        if self.value == MUST_EDGE:
            return "edge (required)"
        if self.value == MUST_CLOUD:
            return "cloud (required)"
        v = float(self.value)
        if v > 0:
            return f"edge +{v:g}"
        if v < 0:
            return f"cloud {v:g}"
        return "neutral"


@dataclass(frozen=True)
class StageFacts:
    """What the placement of one stage at one site type depends on (all numbers per site)."""

    id: str
    inputs: tuple[str, ...]  # ids of sources and stages
    operator: str
    latency_budget_s: float | None
    cloud_p99_s: float  # alarm/processing path through the cloud, p99
    edge_p99_s: float  # the same at the edge, p99
    link_p99_rtt_s: float
    bytes_in_per_s: float  # what the uplink carries if the stage runs in the cloud
    bytes_out_per_s: float  # what it carries if the stage runs at the edge
    uplink_bytes_per_s: float
    cost_per_gb: float
    cores: float  # CPU the stage takes
    memory_bytes: float
    needs: tuple[str, ...]
    during_outage: bool
    local_action: bool
    personal_data_in: bool  # an input carries personal data
    largest_node_cores: int
    largest_node_ram: int
    gpu_available: bool
    edge_core_month: float  # $ per core-month at the edge (hardware written off)
    cloud_core_month: float
    pinned: str = "auto"


@dataclass
class Decision:
    stage: str
    where: Where
    scores: list[Score]
    reason: str
    infeasible: list[str] = field(default_factory=list)
    forced_by: str | None = None


def score_stage(f: StageFacts) -> list[Score]:
    s: list[Score] = []
    # latency
    if f.latency_budget_s is None:
        s.append(Score("latency", 0, "no latency budget"))
    elif f.latency_budget_s < f.link_p99_rtt_s or f.latency_budget_s < f.cloud_p99_s:
        s.append(Score("latency", MUST_EDGE,
                       f"budget {_ms(f.latency_budget_s)} < cloud path p99 {_ms(f.cloud_p99_s)} "
                       f"(link p99 RTT {_ms(f.link_p99_rtt_s)})"))
    else:
        s.append(Score("latency", 0, f"budget {_ms(f.latency_budget_s)} also met via the cloud "
                                     f"(p99 {_ms(f.cloud_p99_s)})"))
    # bandwidth
    saved = f.bytes_in_per_s - f.bytes_out_per_s
    share = saved / f.uplink_bytes_per_s if f.uplink_bytes_per_s else 0.0
    if saved > 0:
        ratio = f.bytes_in_per_s / max(f.bytes_out_per_s, 1.0)
        val = 2 if ratio >= 10 or share >= 0.1 else 1
        s.append(Score("bandwidth", val, f"saves {_rate(saved)} uplink ({ratio:,.1f}x less, "
                                         f"{share:.1%} of the link)"))
    elif saved < 0:
        s.append(Score("bandwidth", -1, f"output is larger than input by {_rate(-saved)}"))
    else:
        s.append(Score("bandwidth", 0, "same bytes either way"))
    # cost
    link_saving = saved * 2_592_000 / 1e9 * f.cost_per_gb
    compute_delta = f.cores * (f.edge_core_month - f.cloud_core_month)
    net = link_saving - compute_delta
    if abs(net) < 0.01:
        s.append(Score("cost", 0, f"under $0.01/month either way (link {_usd(link_saving)}, "
                                  f"compute {_usd(compute_delta)})"))
    else:
        s.append(Score("cost", 1 if net > 0 else -1,
                       f"edge {'saves' if net > 0 else 'costs'} {_usd(abs(net))}/month (link "
                       f"{_usd(link_saving)}, compute {_usd(compute_delta)})"))
    # compute fit
    if "gpu" in f.needs and not f.gpu_available:
        s.append(Score("compute", MUST_CLOUD, "needs a GPU and no edge node option has one"))
    elif f.memory_bytes > 0.5 * f.largest_node_ram or (
        "large_model" in f.needs and f.memory_bytes == 0
    ):
        s.append(Score("compute", MUST_CLOUD,
                       f"needs {_gib(f.memory_bytes) if f.memory_bytes else 'a large model'}; the "
                       f"largest node has {_gib(f.largest_node_ram)}"))
    elif f.cores > 0.5 * f.largest_node_cores:
        s.append(Score("compute", MUST_CLOUD, f"{f.cores:.2f} cores exceed half of the largest "
                                              f"node ({f.largest_node_cores} cores)"))
    else:
        s.append(Score("compute", 1 if f.cores < 0.1 * f.largest_node_cores else 0,
                       f"{f.cores:.3f} cores of {f.largest_node_cores} on the largest node"))
    # privacy
    if "privacy" in f.needs:
        s.append(Score("privacy", MUST_EDGE, "its data must stay on site"))
    elif f.personal_data_in:
        s.append(Score("privacy", 1, "reads personal data: keeping it on site is safer"))
    else:
        s.append(Score("privacy", 0, "no personal data"))
    # offline
    if f.during_outage or f.local_action:
        what = "local action" if f.local_action else "needed during outages"
        s.append(Score("offline", MUST_EDGE, f"{what}: must work while the link is down"))
    else:
        s.append(Score("offline", 0, "can wait for the link"))
    # global context
    if "global_context" in f.needs:
        s.append(Score("context", MUST_CLOUD, "needs fleet-wide context"))
    else:
        s.append(Score("context", 0, "site-local data is enough"))
    return s


def decide_one(f: StageFacts) -> Decision:
    scores = score_stage(f)
    edge_musts = [x for x in scores if x.value == MUST_EDGE]
    cloud_musts = [x for x in scores if x.value == MUST_CLOUD]
    if f.pinned in ("edge", "cloud"):
        d = Decision(f.id, f.pinned, scores, f"pinned to the {f.pinned} by the workload")  # type: ignore[arg-type]
        against = cloud_musts if f.pinned == "edge" else edge_musts
        if against:
            d.infeasible.append(f"stage {f.id!r} is pinned to the {f.pinned} but "
                                f"{against[0].criterion}: {against[0].why}")
        return d
    if edge_musts and cloud_musts:
        why = (f"{edge_musts[0].criterion} needs the edge, {cloud_musts[0].criterion} needs the "
               "cloud")
        if f.operator in SPLITTABLE:
            return Decision(f.id, "split", scores, f"split: {why}; the edge computes a site-local "
                            "partial result, the cloud combines them")
        return Decision(f.id, "edge", scores, f"conflict: {why}", infeasible=[
            f"stage {f.id!r}: {edge_musts[0].criterion} ({edge_musts[0].why}) and "
            f"{cloud_musts[0].criterion} ({cloud_musts[0].why}); no placement meets both - "
            "split it into a site-local part and a fleet-wide part"])
    if edge_musts:
        return Decision(f.id, "edge", scores, f"edge: {edge_musts[0].criterion} requires it")
    if cloud_musts:
        return Decision(f.id, "cloud", scores, f"cloud: {cloud_musts[0].criterion} requires it")
    total = sum(float(x.value) for x in scores)
    if total >= 0:
        return Decision(f.id, "edge", scores, f"edge: score {total:+g}" +
                        (" (a tie goes to the edge: autonomy first)" if total == 0 else ""))
    return Decision(f.id, "cloud", scores, f"cloud: score {total:+g}")


def decide(facts: list[StageFacts]) -> dict[str, Decision]:
    """Decide every stage, then make the data flow consistent (it only goes upwards)."""
    out = {f.id: decide_one(f) for f in facts}
    by_id = {f.id: f for f in facts}
    hard = {sid for sid, d in out.items() if any(
        isinstance(s.value, str) for s in d.scores) or by_id[sid].pinned != "auto"}
    forced_edge: set[str] = set()
    changed = True
    while changed:
        changed = False
        for f in facts:
            d = out[f.id]
            if d.where in ("edge", "split"):  # inputs must be at the edge
                for ref in f.inputs:
                    up = out.get(ref)
                    if up is None or up.where != "cloud":
                        continue
                    if ref in hard and any(s.value == MUST_CLOUD for s in up.scores):
                        msg = (f"stage {f.id!r} must run at the edge but reads {ref!r}, which "
                               "must run in the cloud")
                        if msg not in d.infeasible:
                            d.infeasible.append(msg)
                        continue
                    up.where = "edge"
                    up.forced_by = f.id
                    forced_edge.add(ref)
                    up.reason = f"edge: feeds {f.id!r}, which runs at the edge"
                    changed = True
            if d.where == "edge":  # an edge stage cannot read a cloud result
                for ref in f.inputs:
                    up = out.get(ref)
                    if up is None or up.where not in ("cloud", "split"):
                        continue
                    if f.id in forced_edge or (
                        f.id in hard and any(s.value == MUST_EDGE for s in d.scores)
                    ):
                        msg = (f"stage {f.id!r} must run at the edge but reads {ref!r}, whose "
                               "result only exists in the cloud")
                        if msg not in d.infeasible:
                            d.infeasible.append(msg)
                        continue
                    d.where = "cloud"
                    d.forced_by = ref
                    d.reason = f"cloud: reads {ref!r}, whose result is in the cloud"
                    changed = True
    return out


def _ms(s: float) -> str:
    return f"{s * 1000:,.1f} ms" if s < 10 else f"{s:,.0f} s"


def _rate(bps: float) -> str:
    if bps >= 1e6:
        return f"{bps / 1e6:,.2f} MB/s"
    if bps >= 1e3:
        return f"{bps / 1e3:,.1f} kB/s"
    return f"{bps:,.0f} B/s"


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def _gib(b: float) -> str:
    return f"{b / 1024**3:,.1f} GiB"
