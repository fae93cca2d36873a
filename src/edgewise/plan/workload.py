"""The workload description: YAML in the shape of a Kubernetes object, validated with pydantic.

    apiVersion: edgewise.io/v1
    kind: Workload
    metadata: {name: factory-line}
    spec:
      use_case: "alarms and 1 s aggregates for a production line"     required
      sites:                       where the data is born, and how many such sites
        - name: plant
          count: 1
          nodes: 2                 with ha: active-standby | active-active
          tiers: [device, gateway, site, region]
          sources: [{id, count, rate_hz, bytes_per_sample, resolution, compliance,
                     fields, groups, duty_cycle, ...}]                           required
          link: {uplink, downlink, rtt: {p50, p99}, availability, longest_outage, cost_per_gb}
          second_link: {..., role: failover | offload, window}
      stages: [{id, operator | function, inputs, params, latency_budget, needs, model, ...}]
      models: [{name, size, accelerator, accelerator_memory}]
      code: {path}                 the user functions' package folder
      hardware: [{name, cores, ram, disk, price, gpu, gpu_memory}]
      requirements: {max_alarm_latency, offline_autonomy, encryption, fleet_size, retention}
                                   max_alarm_latency and offline_autonomy are required

The newer parts and their cross-field checks are `edgewise.plan.workload_format`.

Only the use case, the sources (counts and rates) and the latency and offline requirements are
required; everything else gets a stated default (`Workload.inferred` lists each one with its
value), so the planner can be asked a question before every detail is known.

`load_workload` returns a `Workload` or raises `SpecError` listing every problem as
``file:line: field: message``, exactly like the pipeline loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from edgewise.errors import ConfigError, SpecError
from edgewise.pipeline import registry
from edgewise.pipeline.units import ByteSize, Duration
from edgewise.plan.workload_format import (
    Bandwidth,
    CodeLocation,
    Compliance,
    DutyCycle,
    HaMode,
    ModelArtefact,
    OffloadWindow,
    Rtt,
    Signal,
    Tier,
    ValueField,
    check_extensions,
    complete_extensions,
    decimals_of_resolution,
    field_problems,
)
from edgewise.plan.workload_format import (
    fmt_seconds as _fmt_s,
)
from edgewise.plan.workload_format import (
    parse_bandwidth as parse_bandwidth,  # re-exported
)
from edgewise.specfile import Problem, find_cycle, load_document, problems_from, read_text
from edgewise.specfile.marks import Path as KeyPath
from edgewise.specfile.marks import line_of

ID_PATTERN = r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$"
NEEDS = ("global_context", "gpu", "large_model", "privacy")

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Strict):
    name: str = Field(pattern=ID_PATTERN)
    labels: dict[str, str] = {}
    description: str = ""


class SourceGroup(_Strict):
    """A named group of the source's sensors (keys are ``{prefix}/{i:03d}``)."""

    prefix: str = Field(min_length=1)
    count: int = Field(ge=1, le=1_000_000)
    signal: Signal | None = None
    rate_hz: float | None = Field(default=None, gt=0, le=1_000_000)
    """This group's rate if it differs from the source's (the source is then planned as one
    source per rate: ``<id>``, ``<id>-r2``, ...; stages reading it read all of them)."""


class AlarmLimits(_Strict):
    high: float | None = None
    low: float | None = None


class SourceSpec(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    kind: str = "sensor"
    protocol: Literal["mqtt", "http", "modbus", "opcua", "file", "simulator"] = "mqtt"
    count: int = Field(ge=1, le=1_000_000)
    rate_hz: float = Field(gt=0, le=1_000_000)
    bytes_per_sample: int | None = Field(default=None, ge=1, le=64 * 1024 * 1024)
    resolution: float = Field(default=0.01, gt=0, le=1000)
    personal_data: bool = False
    compliance: list[Compliance] = []
    signal: Signal = Signal()
    fields: list[ValueField] = []
    groups: list[SourceGroup] = []
    alarm: AlarmLimits | None = None
    duty_cycle: DutyCycle | None = None
    frame_bytes: ByteSize | None = Field(default=None, ge=1, le=64 * 1024 * 1024)
    """A binary frame (image, waveform block) each reading carries, bytes; see flows."""
    peak_rate_hz: float | None = None
    """Set by the loader for a duty-cycled source: the declared rate while it reports."""
    connection: dict[str, Any] = {}

    @property
    def tags(self) -> frozenset[str]:
        """Compliance tags; ``personal_data: true`` counts as ``personal``."""
        return frozenset(self.compliance) | ({"personal"} if self.personal_data else set())

    @property
    def value_fields(self) -> list[str]:
        """The value columns of a reading: the fields' names, or ``value``."""
        return [f.name for f in self.fields] or ["value"]

    @model_validator(mode="after")
    def _groups(self) -> SourceSpec:
        if self.groups and sum(g.count for g in self.groups) != self.count:
            raise ValueError(
                f"the groups hold {sum(g.count for g in self.groups)} sensors but count is "
                f"{self.count}; make them agree"
            )
        return self

    @property
    def decimals(self) -> int:
        """Decimal places of a reading at this resolution (0 for whole units)."""
        return decimals_of_resolution(self.resolution)


class LinkSpec(_Strict):
    kind: str = "broadband"
    uplink: Bandwidth = 20e6
    downlink: Bandwidth = 50e6
    rtt: Rtt = Rtt(p50=0.030, p99=0.080)
    availability: float = Field(default=0.995, gt=0, le=1)
    longest_outage: Duration = Field(default=3600.0, ge=0)
    cost_per_gb: float = Field(default=0.09, ge=0)
    batch_interval: Duration = Field(default=1.0, gt=0, le=3600)
    """How often the uplink sends one chunk per stream (seconds)."""


class SecondLink(LinkSpec):
    """A second link: ``failover`` carries everything while the first is down; ``offload``
    carries bulk data only in its daily ``window``."""

    role: Literal["failover", "offload"] = "failover"
    window: OffloadWindow | None = None


class SiteSpec(_Strict):
    name: str = Field(pattern=ID_PATTERN)
    count: int = Field(default=1, ge=1, le=1_000_000)
    nodes: int = Field(default=1, ge=1, le=64)
    ha: HaMode | None = None
    """How the nodes of a site share the work: one active and the rest standing by, or all
    active; every node is sized to carry the whole site (what a failover needs)."""
    tiers: list[Tier] = []
    """The tiers the data passes from its birth to the cloud, e.g. [device, gateway, site]."""
    region: str | None = None
    sources: list[SourceSpec] = Field(min_length=1)
    link: LinkSpec = LinkSpec()
    second_link: SecondLink | None = None
    lan: Rtt = Rtt(p50=0.0005, p99=0.002)


class LocalAction(_Strict):
    mqtt_topic: str | None = None
    webhook_url: str | None = None

    @model_validator(mode="after")
    def _one(self) -> LocalAction:
        if not self.mqtt_topic and not self.webhook_url:
            raise ValueError("give mqtt_topic or webhook_url")
        return self


class StageSpec(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    operator: str | None = None
    function: str | None = None
    inputs: list[str] = Field(min_length=1)
    params: dict[str, Any] = {}
    cpu_us_per_record: float | None = Field(default=None, gt=0)
    cpu_us_per_call: float = Field(default=0.0, ge=0)
    """A user function's own CPU per call (per batch), beside its cost per record."""
    reduction: float | None = Field(default=None, ge=0)
    output_bytes_per_record: float | None = Field(default=None, gt=0)
    memory: ByteSize | None = None
    latency_budget: Duration | None = Field(default=None, gt=0)
    needs: list[Literal["global_context", "gpu", "large_model", "privacy"]] = []
    during_outage: bool = False
    to_cloud: bool = True
    local: LocalAction | None = None
    placement: Literal["auto", "edge", "cloud"] = "auto"
    model: str | None = None
    """The name of a model in ``spec.models`` this stage runs."""

    @model_validator(mode="after")
    def _kind(self) -> StageSpec:
        if (self.operator is None) == (self.function is None):
            raise ValueError("set exactly one of operator (a built-in) or function (pkg.mod:Class)")
        if self.function is not None and ":" not in self.function:
            raise ValueError("function must be an import path such as 'mypkg.models:Counter'")
        return self


class HardwareOption(_Strict):
    name: str = Field(min_length=1)
    cores: int = Field(ge=1, le=1024)
    ram: ByteSize
    disk: ByteSize
    price: float = Field(ge=0)
    gpu: bool = False
    gpu_memory: ByteSize | None = None
    tpm: bool = True


class Requirements(_Strict):
    max_alarm_latency: Duration = Field(gt=0)
    offline_autonomy: Duration = Field(ge=0)
    encryption: bool = True
    fleet_size: int | None = Field(default=None, ge=1)
    retention: Duration = Field(default=90 * 86400.0, gt=0)
    utilisation: float = Field(default=0.5, gt=0, le=1)
    """Highest planned CPU utilisation of a node; the rest is headroom."""


class Costs(_Strict):
    cloud_core_hour: float = Field(default=0.04, ge=0)
    cloud_storage_gb_month: float = Field(default=0.023, ge=0)
    hardware_months: int = Field(default=36, ge=1)
    """Months over which edge hardware is written off."""


class Body(_Strict):
    use_case: str = Field(min_length=3)
    sites: list[SiteSpec] = Field(min_length=1)
    stages: list[StageSpec] = []
    hardware: list[HardwareOption] = []
    requirements: Requirements
    costs: Costs = Costs()
    models: list[ModelArtefact] = []
    code: CodeLocation | None = None


class Document(_Strict):
    apiVersion: Literal["edgewise.io/v1"]
    kind: Literal["Workload"]
    metadata: Metadata
    spec: Body


# -- defaults that the planner states when it fills them in -------------------------------------

DEFAULT_HARDWARE: tuple[HardwareOption, ...] = (
    HardwareOption(name="k3s-small", cores=2, ram=4 * 1024**3, disk=64 * 1024**3, price=350.0),
    HardwareOption(name="k3s-standard", cores=4, ram=8 * 1024**3, disk=256 * 1024**3, price=700.0),
    HardwareOption(name="k3s-large", cores=8, ram=32 * 1024**3, disk=1024**4, price=1600.0),
    HardwareOption(
        name="k3s-gpu", cores=8, ram=32 * 1024**3, disk=1024**4, price=2900.0, gpu=True
    ),
)

ARCHITECTURE_DEFAULTS = (
    ("edge nodes", "K3s-class nodes running the Edgewise agent as a container workload"),
    ("consistency", "hybrid edge-cloud with eventual consistency: the edge owns what happened, "
     "the cloud owns intent; shared keys merge by hybrid-logical-clock last-writer-wins"),
    ("security", "zero trust with device attestation: mutual TLS 1.3 with short-lived node "
     "certificates, TPM-backed identity, no trust in network addresses"),
)


@dataclass(frozen=True)
class Inferred:
    """A value the planner filled in because the workload did not give it."""

    field: str
    value: str
    why: str


@dataclass(frozen=True)
class Workload:
    path: Path
    document: Document
    stages: list[StageSpec]
    hardware: list[HardwareOption]
    inferred: list[Inferred] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.document.metadata.name

    @property
    def body(self) -> Body:
        return self.document.spec

    @property
    def sites(self) -> list[SiteSpec]:
        return self.document.spec.sites

    @property
    def requirements(self) -> Requirements:
        return self.document.spec.requirements

    @property
    def total_nodes(self) -> int:
        return sum(s.count * s.nodes for s in self.sites)

    @property
    def code_dir(self) -> Path | None:
        """The folder of the user functions' package (``spec.code.path``), if given."""
        code = self.document.spec.code
        return (self.path.parent / code.path).resolve() if code is not None else None

    @property
    def fleet_size(self) -> int:
        return max(self.requirements.fleet_size or 0, self.total_nodes)


# -- loading -----------------------------------------------------------------------------------

def load_workload(path: str | Path) -> Workload:
    """Read and validate a workload file. Raises `SpecError` (or `ConfigError` if unreadable)."""
    return parse_workload(read_text(path), str(path))


def parse_workload(text: str, source: str = "<workload>") -> Workload:
    data, lines = load_document(text, source)
    try:
        doc = Document.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, problems_from(exc, (), lines)) from None

    problems: list[Problem] = []
    body = doc.spec
    source_ids: dict[str, KeyPath] = {}
    site_names: set[str] = set()
    for i, site in enumerate(body.sites):
        if site.name in site_names:
            problems.append((line_of(lines, ("spec", "sites", i, "name")),
                             f"spec.sites.{i}.name", f"duplicate site name {site.name!r}"))
        site_names.add(site.name)
        for j, src in enumerate(site.sources):
            where = ("spec", "sites", i, "sources", j, "id")
            if src.id in source_ids and source_ids[src.id][2] == i:
                problems.append((line_of(lines, where), ".".join(map(str, where)),
                                 f"duplicate source id {src.id!r} in site {site.name!r}"))
            source_ids.setdefault(src.id, where)
    stage_ids: dict[str, int] = {}
    for i, st in enumerate(body.stages):
        where: KeyPath = ("spec", "stages", i)
        if st.id in stage_ids or st.id in source_ids:
            problems.append((line_of(lines, (*where, "id")), f"spec.stages.{i}.id",
                             f"duplicate id {st.id!r}; stage and source ids must be unique"))
        stage_ids.setdefault(st.id, i)
        if st.operator is not None:
            if st.operator == "python":
                problems.append((line_of(lines, (*where, "operator")), f"spec.stages.{i}.operator",
                                 "write user code as function: 'pkg.mod:Class'"))
                continue
            try:
                cls = registry.resolve("operator", st.operator)
            except KeyError:
                problems.append((
                    line_of(lines, (*where, "operator")), f"spec.stages.{i}.operator",
                    f"unknown operator {st.operator!r}; known: "
                    f"{', '.join(n for n in registry.known('operator') if n != 'python')}",
                ))
                continue
            except ConfigError as exc:
                problems.append((line_of(lines, (*where, "operator")),
                                 f"spec.stages.{i}.operator", str(exc)))
                continue
            try:
                cls.Config.model_validate(st.params)
            except ValidationError as exc:
                problems.extend(problems_from(exc, (*where, "params"), lines))
                continue
            problems.extend(field_problems(st, cls, body, (*where, "params"), lines))
    for i, st in enumerate(body.stages):
        for j, ref in enumerate(st.inputs):
            if ref not in source_ids and ref not in stage_ids:
                known = ", ".join([*source_ids, *stage_ids])
                problems.append((line_of(lines, ("spec", "stages", i, "inputs", j)),
                                 f"spec.stages.{i}.inputs.{j}",
                                 f"{ref!r} is not the id of a source or stage; known: {known}"))
            elif ref == st.id:
                problems.append((line_of(lines, ("spec", "stages", i, "inputs", j)),
                                 f"spec.stages.{i}.inputs.{j}",
                                 "a stage cannot read its own output"))
    if not problems:
        cycle = find_cycle({s.id: list(s.inputs) for s in body.stages})
        if cycle:
            problems.append((line_of(lines, ("spec", "stages")), "spec.stages",
                             f"stages form a cycle: {' -> '.join(cycle)}; break it"))
    problems.extend(check_extensions(body, lines, Path(source).parent))
    if problems:
        raise SpecError(source, problems)
    return _complete(doc, Path(source))


def _complete(doc: Document, path: Path) -> Workload:
    """Fill in the defaults and say which ones were used."""
    body, notes = complete_extensions(doc.spec)
    doc = doc.model_copy(update={"spec": body})
    inferred = [Inferred(n.field, n.value, n.why) for n in notes]
    for i, site in enumerate(body.sites):
        if "link" not in site.model_fields_set:
            ln = site.link
            inferred.append(Inferred(
                f"sites.{i}.link", f"{ln.kind}: {ln.uplink / 1e6:g} Mbit/s up, "
                f"{ln.downlink / 1e6:g} Mbit/s down, RTT p50 {_fmt_s(ln.rtt.p50)} / p99 "
                f"{_fmt_s(ln.rtt.p99)}, availability {ln.availability:.1%}, longest outage "
                f"{_fmt_s(ln.longest_outage)}, ${ln.cost_per_gb:g}/GB",
                "no link given: a business broadband line is assumed"))
        for j, src in enumerate(site.sources):
            if src.bytes_per_sample is None:
                inferred.append(Inferred(
                    f"sites.{i}.sources.{j}.bytes_per_sample", "JSON size of a reading",
                    "not given: the naive baseline sends one JSON object per reading"))
    stages = list(body.stages)
    if not stages:
        stages = default_stages(body, inferred)
    hardware = list(body.hardware)
    if not hardware:
        hardware = list(DEFAULT_HARDWARE)
        inferred.append(Inferred(
            "hardware", ", ".join(f"{h.name} ({h.cores} cores, {h.ram // 1024**3} GiB, "
                                  f"${h.price:g})" for h in hardware),
            "no hardware options given: K3s-class edge nodes for container workloads"))
    if body.requirements.fleet_size is None:
        total = sum(s.count * s.nodes for s in body.sites)
        inferred.append(Inferred("requirements.fleet_size", str(total),
                                 "not given: the sites times their nodes"))
    for name, value in ARCHITECTURE_DEFAULTS:
        inferred.append(Inferred(f"architecture.{name}", value, "Edgewise default"))
    return Workload(path, doc, stages, hardware, inferred)


def default_stages(body: Body, inferred: list[Inferred]) -> list[StageSpec]:
    """Per source: aggregates towards the cloud, and alarms if the source gives limits."""
    out: list[StageSpec] = []
    seen: set[str] = set()
    for site in body.sites:
        for src in site.sources:
            if src.id in seen:
                continue
            seen.add(src.id)
            size = "1s" if src.rate_hz >= 1 else "60s"
            params = {"size": size, "aggregates": ["count", "mean", "min", "max"]}
            if src.fields:
                params["field"] = src.fields[0].name
            out.append(StageSpec(
                id=f"{src.id}-aggregates", operator="window", inputs=[src.id], params=params,
            ))
            inferred.append(Inferred(f"stages.{src.id}-aggregates",
                                     f"window {size}: count, mean, min, max per sensor",
                                     "no stages given: aggregates per sensor go to the cloud"))
            if src.alarm is not None and (src.alarm.high is not None or src.alarm.low is not None):
                params: dict[str, Any] = {}
                if src.alarm.high is not None:
                    params["high"] = src.alarm.high
                if src.alarm.low is not None:
                    params["low"] = src.alarm.low
                out.append(StageSpec(
                    id=f"{src.id}-alarms", operator="threshold", inputs=[src.id], params=params,
                    latency_budget=body.requirements.max_alarm_latency, during_outage=True,
                ))
                inferred.append(Inferred(f"stages.{src.id}-alarms", f"threshold {params}",
                                         "the source gives alarm limits: alarms at once"))
    return out

