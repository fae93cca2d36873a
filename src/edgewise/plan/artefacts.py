"""The deployable output of a plan: pipelines, agent configurations and a rollout plan.

* ``pipelines/<site>.yaml``: one Pipeline per site type, every stage with its ``placement``;
  loads with `edgewise.pipeline.spec.load_pipeline`, the agent's own loader. A split window
  becomes ``<id>-partial`` (a `partial` on the edge) and ``<id>`` (a `combine` in the cloud)
  when its aggregates merge exactly (`_split_window`), else a window over the partial results.
  ``edgewise plan apply`` (`edgewise.plan.deploy`) installs them: the edge part on the site's
  nodes, the cloud part as a cloud pipeline.
* ``agents/<site>.yaml``: ``kind: AgentConfig``, what the agent on each node of that site runs
  with (node size, outbox, uplink, identity, autonomy, updates).
* ``rollout.yaml``: ``kind: RolloutPlan``, the waves in which a release reaches the fleet, with
  health gates and automatic rollback.

Nothing reads ``agents/`` or ``rollout.yaml`` yet: `plan apply` installs pipelines only, and
``edgewise rollout`` takes its own spec (`cloud.rollouts.spec`); the architecture document
quotes the rollout's waves. Every file the planner writes is validated with these loaders
before the run ends.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgewise.errors import ConfigError, SpecError
from edgewise.pipeline.spec import load_pipeline
from edgewise.pipeline.units import ByteSize, Duration
from edgewise.plan import flows as F
from edgewise.plan.workload import ID_PATTERN, SourceSpec, StageSpec
from edgewise.specfile import problems_from
from edgewise.specfile.marks import line_of, load_with_lines

API_VERSION = "edgewise.io/v1"
CLOUD_ENDPOINT = "https://edgewise-cloud.example.net:8443"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metadata(_Strict):
    name: str = Field(pattern=ID_PATTERN)
    labels: dict[str, str] = {}


# -- AgentConfig ---------------------------------------------------------------------------------

class NodeSpec(_Strict):
    hardware: str
    cores: int = Field(ge=1)
    ram: ByteSize
    disk: ByteSize
    gpu: bool = False


class AgentOutbox(_Strict):
    path: str = "/var/lib/edgewise/outbox.db"
    max_bytes: ByteSize
    sync: Literal["full", "normal"] = "full"


class Tls(_Strict):
    min_version: Literal["1.3"] = "1.3"
    mutual: Literal[True] = True
    ca_file: str = "/etc/edgewise/pki/ca.pem"
    cert_file: str = "/var/lib/edgewise/pki/node.pem"
    key_file: str = "/var/lib/edgewise/pki/node.key"


class Uplink(_Strict):
    endpoint: str = Field(pattern=r"^https://")
    batch_interval: Duration = Field(gt=0)
    max_share: float = Field(gt=0, le=1)
    """Share of the uplink data batches may use; control messages always go first."""
    tls: Tls = Tls()


class Identity(_Strict):
    attestation: Literal["tpm", "none"] = "tpm"
    cert_lifetime: Duration = 86400.0
    enrolment: Literal["token"] = "token"


class Autonomy(_Strict):
    offline_for: Duration = Field(ge=0)
    """The longest outage the node must ride out with nothing lost."""
    restart_offline: Literal[True] = True


class Updates(_Strict):
    strategy: Literal["ab-slots"] = "ab-slots"
    slot_size: ByteSize
    health_gate: Duration = 600.0
    rollback: Literal["automatic"] = "automatic"
    verify: Literal["tuf"] = "tuf"


class LocalBroker(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)


class AgentBody(_Strict):
    site: str = Field(pattern=ID_PATTERN)
    sites: int = Field(ge=1)
    nodes_per_site: int = Field(ge=1)
    node: NodeSpec
    pipelines: list[str] = Field(min_length=1)
    outbox: AgentOutbox
    uplink: Uplink
    identity: Identity = Identity()
    autonomy: Autonomy
    updates: Updates
    heartbeat: Duration = 30.0
    local_broker: LocalBroker | None = None


class AgentConfig(_Strict):
    apiVersion: Literal["edgewise.io/v1"]  # the YAML key
    kind: Literal["AgentConfig"]
    metadata: Metadata
    spec: AgentBody


# -- RolloutPlan ---------------------------------------------------------------------------------

class Gate(_Strict):
    soak: Duration = Field(gt=0)
    max_error_rate: float = Field(ge=0, le=1)
    max_restarts: int = Field(ge=0)
    max_alarm_latency: Duration = Field(gt=0)


class Wave(_Strict):
    name: str = Field(pattern=ID_PATTERN)
    nodes: int = Field(ge=1)
    percent: float = Field(gt=0, le=100)
    gate: Gate


class Rollback(_Strict):
    automatic: Literal[True] = True
    on: list[Literal["gate-failed", "crash-loop", "heartbeat-lost", "config-rejected"]] = [
        "gate-failed", "crash-loop", "heartbeat-lost", "config-rejected"]


class RolloutBody(_Strict):
    release: str = Field(min_length=1)
    fleet: int = Field(ge=1)
    expires_after: Duration = Field(gt=0)
    """A node that was offline longer than this never applies a stale step (principle 8 of
    docs/architecture.md)."""
    max_unavailable: int = Field(ge=1)
    waves: list[Wave] = Field(min_length=1)
    rollback: Rollback = Rollback()

    @model_validator(mode="after")
    def _waves(self) -> RolloutBody:
        if sum(w.nodes for w in self.waves) != self.fleet:
            raise ValueError(f"the waves hold {sum(w.nodes for w in self.waves)} nodes but the "
                             f"fleet has {self.fleet}")
        return self


class RolloutPlan(_Strict):
    apiVersion: Literal["edgewise.io/v1"]
    kind: Literal["RolloutPlan"]
    metadata: Metadata
    spec: RolloutBody


KINDS: dict[str, type[BaseModel]] = {"AgentConfig": AgentConfig, "RolloutPlan": RolloutPlan}


def parse_artefact(text: str, source: str = "<artefact>") -> AgentConfig | RolloutPlan:
    """Validate an AgentConfig or RolloutPlan document; raises `SpecError` with file:line."""
    try:
        data, lines = load_with_lines(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError(source, [(mark.line + 1 if mark else None, "",
                                  f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [(1, "", "expected a mapping with apiVersion, kind, metadata "
                                         "and spec")])
    kind = data.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise SpecError(source, [(line_of(lines, ("kind",)), "kind",
                                  f"expected one of {', '.join(KINDS)}, got {kind!r}")])
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        raise SpecError(source, problems_from(exc, (), lines)) from None


def load_artefact(path: str | Path) -> AgentConfig | RolloutPlan:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_artefact(text, str(path))


# -- generation ----------------------------------------------------------------------------------

def _source_entry(src: SourceSpec, site: str) -> dict[str, Any]:
    groups = F.source_groups(src, site)
    names = [f"{p}/{i:03d}" for p, c, _ in groups for i in range(c)]
    base: dict[str, Any]
    if src.protocol == "mqtt":
        base = {"topics": [f"{site}/{src.id}/#"], "host": "127.0.0.1", "qos": 1}
    elif src.protocol == "http":
        base = {"host": "0.0.0.0", "port": 8080, "path": f"/ingest/{src.id}"}
    elif src.protocol == "modbus":
        base = {"host": "192.0.2.10", "interval": round(1.0 / src.rate_hz, 6),
                "registers": [{"name": n, "address": i % 65536, "type": "float32"}
                              for i, n in enumerate(names)]}
    elif src.protocol == "opcua":
        base = {"endpoint": "opc.tcp://192.0.2.20:4840",
                "publishing_interval": round(max(0.01, 1.0 / src.rate_hz), 6),
                "nodes": [{"node_id": f"ns=2;s={n}", "sensor": n} for n in names]}
    elif src.protocol == "file":
        base = {"path": f"data/{src.id}.ndjson"}
    else:
        base = {"profile": "custom", "rate_hz": src.rate_hz, "groups": [
            {"prefix": p, "count": c, "base_low": s.low, "base_high": s.high,
             "drift": s.drift, "noise": s.noise, "spike_prob": s.spike_prob,
             "spike_value": s.spike_value, "decimals": src.decimals} for p, c, s in groups]}
    base.update(src.connection)
    return {"id": src.id, "type": src.protocol, "placement": "edge", **base}


_COMBINE = {"count": "sum(count)", "sum": "sum(sum)", "min": "min(min)", "max": "max(max)",
            "mean": "mean(mean)"}
_MERGEABLE = ("count", "sum", "mean", "min", "max", "stddev", "rms", "p50", "p95", "p99")


def _split_window(st: StageSpec) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A split window as `partial` (edge) and `combine` (cloud) when its aggregates merge
    (count, sum, mean, min, max, stddev, rms exactly; p50/p95/p99 through a sketch) and read
    one field; None otherwise."""
    params = dict(st.params)
    field = params.get("field", "value")
    aggs = []
    for a in params.get("aggregates", ["count", "mean", "min", "max"]):
        name, _, fld = a.strip().partition("(")
        if (fld and fld.rstrip(")").strip() != field) or name not in _MERGEABLE:
            return None
        aggs.append(name)
    if params.get("slide") is not None:
        return None
    sketch = any(a.startswith("p") for a in aggs)
    common = {k: params[k] for k in ("size", "key_by", "allowed_lateness", "idle_timeout")
              if k in params}
    partial = {"type": "partial", **common, "field": field, "sketch": sketch}
    if "key_by" not in params:
        partial["key_by"] = ["sensor"]
    combine = {"type": "combine", **common, "key_by": partial["key_by"], "aggregates": aggs}
    return partial, combine


def _combine_params(st: StageSpec) -> dict[str, Any]:
    """Cloud half of a split window that `_split_window` cannot merge exactly: a window over
    the sites' partial results (approximate: e.g. a mean of means)."""
    params = dict(st.params)
    aggs = []
    for a in params.get("aggregates", ["count", "mean", "min", "max"]):
        name = a.strip()
        if "(" in name:
            fn, _, fld = name.partition("(")
            out = f"{fn}_{fld.rstrip(')')}"
            aggs.append(f"{'sum' if fn == 'count' else fn}({out})")
        else:
            aggs.append(_COMBINE.get(name, f"{name}({name})"))
    params["aggregates"] = aggs
    params.pop("field", None)
    params["key_by"] = []
    return params


def pipeline_document(plan_site: Any, workload_name: str) -> dict[str, Any]:
    """One pipeline for a site type, every component placed."""
    sp = plan_site
    sources = [_source_entry(s, sp.name) for s in sp.site.sources]
    stages: list[dict[str, Any]] = []
    sinks: list[dict[str, Any]] = []
    renamed: dict[str, str] = {}
    for st in sp.stages:
        where = sp.where(st.id)
        inputs = [renamed.get(r, r) for r in st.inputs]
        kind: dict[str, Any] = ({"type": st.operator, **st.params} if st.operator else
                                {"type": "python", "class": st.function,
                                 "options": dict(st.params)})
        halves = _split_window(st) if where == "split" and st.operator == "window" else None
        if halves is not None:
            stages.append({"id": f"{st.id}-partial", "inputs": inputs, "placement": "edge",
                           **halves[0]})
            stages.append({"id": st.id, "inputs": [f"{st.id}-partial"], "placement": "cloud",
                           **halves[1]})
        elif where == "split":
            stages.append({"id": f"{st.id}-partial", "inputs": inputs, "placement": "edge",
                           **kind})
            cloud = {"type": "window", **_combine_params(st)}
            stages.append({"id": st.id, "inputs": [f"{st.id}-partial"], "placement": "cloud",
                           **cloud})
        else:
            stages.append({"id": st.id, "inputs": inputs, "placement": where, **kind})
        if st.local is not None:
            if st.local.mqtt_topic:
                sinks.append({"id": f"{st.id}-local", "type": "mqtt", "inputs": [st.id],
                              "placement": "edge", "host": "127.0.0.1",
                              "topic": st.local.mqtt_topic, "qos": 1})
            if st.local.webhook_url:
                sinks.append({"id": f"{st.id}-hook", "type": "webhook", "inputs": [st.id],
                              "placement": "edge", "url": st.local.webhook_url})
        if where == "cloud" or (where == "split" and st.to_cloud):
            sinks.append({"id": f"{st.id}-store", "type": "outbox", "inputs": [st.id],
                          "placement": "cloud", "stream": st.id, "priority": "normal"})
    for s in sp.streams:
        sinks.append({"id": f"{s.name}-out", "type": "outbox",
                      "inputs": [f"{s.origin}-partial" if sp.where(s.origin) == "split"
                                 else s.origin] if s.origin in sp.decisions else [s.origin],
                      "placement": "edge", "stream": s.name, "priority": s.priority,
                      "compact": s.compact})
    fig = sp.final
    return {
        "apiVersion": API_VERSION, "kind": "Pipeline",
        "metadata": {"name": f"{workload_name}-{sp.name}"[:63].strip("-"),
                     "labels": {"edgewise.io/site": sp.name, "edgewise.io/planned": "true"},
                     "description": f"planned by edgewise plan for site type {sp.name}"},
        "spec": {"sources": sources, "stages": stages, "sinks": sinks,
                 "outbox": {"max_bytes": fig.outbox_bytes, "sync": "full"}},
    }


def agent_document(plan_site: Any, workload: Any, pipeline_file: str) -> dict[str, Any]:
    sp = plan_site
    fig = sp.final
    size = fig.sizing
    h = size.option
    local = any(st.local is not None and st.local.mqtt_topic for st in sp.stages) or any(
        s.protocol == "mqtt" for s in sp.site.sources)
    body: dict[str, Any] = {
        "site": sp.name, "sites": sp.site.count, "nodes_per_site": size.nodes,
        "node": {"hardware": h.name, "cores": h.cores, "ram": h.ram, "disk": h.disk,
                 "gpu": h.gpu},
        "pipelines": [pipeline_file],
        "outbox": {"max_bytes": fig.outbox_bytes, "sync": "full"},
        "uplink": {"endpoint": CLOUD_ENDPOINT, "batch_interval": sp.site.link.batch_interval,
                   "max_share": 0.8},
        "identity": {"attestation": "tpm" if h.tpm else "none"},
        "autonomy": {"offline_for": fig.outage_s},
        "updates": {"slot_size": 1024**3},
    }
    if local:
        body["local_broker"] = {"host": "127.0.0.1", "port": 1883}
    return {"apiVersion": API_VERSION, "kind": "AgentConfig",
            "metadata": {"name": f"{sp.name}-agent",
                         "labels": {"edgewise.io/workload": workload.name}},
            "spec": body}


def rollout_waves(fleet: int) -> list[tuple[str, int, float]]:
    """(name, nodes, percent): canary 1% (at least one node), then 10%, 50% and the rest."""
    waves: list[tuple[str, int, float]] = []
    left = fleet
    for name, share in (("canary", 0.01), ("early", 0.10), ("half", 0.50)):
        n = min(left, max(1, math.ceil(fleet * share)) - (fleet - left))
        if n <= 0 or left - n <= 0:
            continue
        waves.append((name, n, 100.0 * n / fleet))
        left -= n
    waves.append(("all", left, 100.0 * left / fleet))
    return waves


def rollout_document(plan: Any) -> dict[str, Any]:
    fleet = sum(sp.site.count * sp.final.sizing.nodes for sp in plan.sites)
    req = plan.workload.requirements
    longest = max(sp.site.link.longest_outage for sp in plan.sites)
    waves = []
    for i, (name, n, pct) in enumerate(rollout_waves(fleet)):
        soak = 3600.0 if i == 0 else 1800.0
        waves.append({"name": name, "nodes": n, "percent": round(pct, 2), "gate": {
            "soak": soak, "max_error_rate": 0.001, "max_restarts": 0,
            "max_alarm_latency": req.max_alarm_latency}})
    return {"apiVersion": API_VERSION, "kind": "RolloutPlan",
            "metadata": {"name": f"{plan.workload.name}-rollout"[:63]},
            "spec": {"release": f"{plan.workload.name}-planned", "fleet": fleet,
                     "expires_after": max(7 * 86400.0, 2 * longest),
                     "max_unavailable": max(1, fleet // 20), "waves": waves}}


def write_artefacts(plan: Any, out: Path) -> list[Path]:
    """Write pipelines, agent configurations and the rollout plan; validate each one."""
    written: list[Path] = []
    (out / "pipelines").mkdir(parents=True, exist_ok=True)
    (out / "agents").mkdir(parents=True, exist_ok=True)
    for sp in plan.sites:
        pfile = out / "pipelines" / f"{sp.name}.yaml"
        _dump(pfile, pipeline_document(sp, plan.workload.name))
        load_pipeline(pfile)
        written.append(pfile)
        afile = out / "agents" / f"{sp.name}.yaml"
        _dump(afile, agent_document(sp, plan.workload, f"../pipelines/{sp.name}.yaml"))
        load_artefact(afile)
        written.append(afile)
    rfile = out / "rollout.yaml"
    _dump(rfile, rollout_document(plan))
    load_artefact(rfile)
    written.append(rfile)
    return written


def _dump(path: Path, doc: dict[str, Any]) -> None:
    header = "# Written by `edgewise plan`; edit the workload and plan again rather than this.\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8")
