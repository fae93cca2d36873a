"""The deployable output of a plan: one placed pipeline per site type, and the rollout command.

* ``pipelines/<site>.yaml``: one Pipeline per site type, every stage with its ``placement``;
  loads with `edgewise.pipeline.spec.load_pipeline`, the agent's own loader. A split window
  becomes ``<id>-partial`` (a `partial` on the edge) and ``<id>`` (a `combine` in the cloud)
  when its aggregates merge exactly (`_split_window`), else a window over the partial results.
  ``edgewise plan apply`` (`edgewise.plan.deploy`) installs them: the edge part on the site's
  nodes, the cloud part as a cloud pipeline. They are the only files of a plan anything reads.
* the **rollout** of a release to each site type is not a file: `rollout_command` writes the
  ``edgewise rollout create`` command (canary, waves, bake, per-site budget, gates, intent
  lifetime) that the architecture document prints for the operator to run once a release is
  published. A plan has no release to roll out, so ``plan apply`` does not start one.

Every pipeline the planner writes is validated with the pipeline loader before the run ends.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import yaml

from edgewise.pipeline.spec import load_pipeline
from edgewise.plan import flows as F
from edgewise.plan.workload import SourceSpec, StageSpec

API_VERSION = "edgewise.io/v1"
HEADER = "# Written by `edgewise plan`; edit the workload and plan again rather than this.\n"


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


def rollout_fleet(plan: Any) -> int:
    return sum(sp.site.count * sp.final.sizing.nodes for sp in plan.sites)


def rollout_settings(plan: Any, sp: Any) -> dict[str, Any]:
    """What `rollout_command` asks for a site type: the canary and cumulative waves of
    `rollout_waves` (1%, 10%, 50%, all), a 30-minute bake after each wave, at most
    ``nodes - 1`` nodes of a site updating at once (one, for single-node sites), gates on
    dead letters and dropped records, and intents that live longer than the longest outage
    of any site (at least a week: a node back after a long outage applies no stale step)."""
    nodes = sp.site.count * sp.final.sizing.nodes
    planned = rollout_waves(nodes)
    cumulative, done = [], planned[0][1]  # waves count the canary's nodes too
    for _name, n, _pct in planned[1:]:
        done += n
        cumulative.append(100 if done >= nodes else math.ceil(100 * done / nodes))
    longest = max(s.site.link.longest_outage for s in plan.sites)
    return {"nodes": nodes, "canary": "1%", "waves": cumulative or [100], "bake": "30m",
            "max_unavailable_per_site": max(1, sp.final.sizing.nodes - 1),
            "gates": ["error_rate<=0.001", "dropped==0"],
            "intent_ttl": f"{math.ceil(max(7 * 86400.0, 2 * longest) / 3600)}h"}


def rollout_command(plan: Any, sp: Any, site_label: str = "site") -> str:
    """The ``edgewise rollout create`` command for the nodes of one site type."""
    r = rollout_settings(plan, sp)
    waves = ",".join(f"{w}%" for w in r["waves"])
    gates = " ".join(f"--gate '{g}'" for g in r["gates"])
    return (f"edgewise rollout create --release VERSION --selector {site_label}={sp.name} "
            f"--canary {r['canary']} --waves {waves} --bake {r['bake']} "
            f"--max-unavailable-per-site {r['max_unavailable_per_site']} {gates} "
            f"--intent-ttl {r['intent_ttl']}")


def write_artefacts(plan: Any, out: Path) -> list[Path]:
    """Write one placed pipeline per site type (validated with the pipeline loader). Files an
    older planner wrote that nothing reads (``agents/``, ``rollout.yaml``) are removed."""
    written: list[Path] = []
    (out / "pipelines").mkdir(parents=True, exist_ok=True)
    for sp in plan.sites:
        pfile = out / "pipelines" / f"{sp.name}.yaml"
        _dump(pfile, pipeline_document(sp, plan.workload.name))
        load_pipeline(pfile)
        written.append(pfile)
    for stale in [out / "rollout.yaml", *(out / "agents" / f"{sp.name}.yaml"
                                          for sp in plan.sites)]:
        try:
            if stale.read_text(encoding="utf-8").startswith(HEADER):
                stale.unlink()
        except (OSError, UnicodeDecodeError):
            pass
    with contextlib.suppress(OSError):  # only when empty
        (out / "agents").rmdir()
    return written


def _dump(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(HEADER + yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8")
