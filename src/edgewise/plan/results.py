"""What a plan is made of: per site type a `SitePlan` (its `Stream`s and the `Figures` from a
`Calibration`: `Latency`, `Sizing`), for the fleet a `ControlPlane` and `Check`s, all in a `Plan`.

`edgewise.plan.model` builds them, `edgewise.plan.site_figures` computes the figures of a site
type, `edgewise.plan.fleet` the control plane and the checks. Units: bytes, seconds, records per
second, cores; money in the workload's currency ($).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgewise.plan import flows as F
from edgewise.plan.cost_model import EngineCost, StageCost
from edgewise.plan.placement import Decision, StageFacts
from edgewise.plan.workload import HardwareOption, SiteSpec, StageSpec, Workload

MONTH_S = 30 * 86400
ALARM_OPERATORS = {"threshold", "anomaly"}


def is_alarm(st: StageSpec) -> bool:
    """Whether a stage's output is alarms: a threshold or anomaly stage, a rate of change with a
    limit, or any stage with a local action."""
    if st.operator in ALARM_OPERATORS:
        return True
    if st.operator == "rate_of_change" and st.params.get("limit") is not None:
        return True
    return st.local is not None


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
    # the engine with the site's sources alone at the real pace (costs.site_engine), or None
    engine_site: dict[str, Any] | None = None

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


@dataclass(frozen=True)
class Finding:
    """A stage the simulation disagrees with in kind, e.g. a path that emitted nothing in the
    simulation although the estimate expects records from it (``kind: dead-path``)."""

    site: str
    stage: str
    kind: str
    estimated_per_s: float
    measured_per_s: float
    expected_in_run: float  # records the estimate expected during the simulated span
    message: str


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
    findings: list[Finding] = field(default_factory=list)
    """What the simulation found that the estimate did not expect (`edgewise.plan.simulate`)."""

    @property
    def unmet(self) -> list[str]:
        out = [f"{c.name}: {c.detail}" for c in self.hard + self.requirements if not c.met]
        return out + [x for x in self.infeasible if x not in out]

