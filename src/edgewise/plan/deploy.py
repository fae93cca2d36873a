"""What `edgewise plan apply OUT_DIR` installs: each planned pipeline split by placement (pure).

A planned pipeline (``OUT_DIR/pipelines/<site>.yaml``) places every component on the edge or
in the cloud. `split` turns it into

* the **edge pipeline**: its edge components, as the nodes of the site run it (desired state
  for every node whose site label is the site's name);
* the **cloud pipeline** (None when nothing is placed in the cloud): its cloud stages and
  sinks, with one ``stream`` source per edge component a cloud stage reads, named like that
  component so the stages read unchanged. The source reads the stream the edge pipeline sends
  that component's output under (its outbox sink; one is added when there is none) from every
  node of the site.

`read_plan` reads and splits every planned pipeline and validates both halves with the
pipeline loader (the control plane checks the cloud half's own rules again when it is set).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgewise.errors import ConfigError
from edgewise.pipeline.spec import parse_pipeline
from edgewise.specfile import load_document, read_text

SITE_LABEL = "edgewise.io/site"  # the planned pipeline's metadata label naming its site
HEADER = "# Written by `edgewise plan apply` from {source}; plan again rather than edit this.\n"


@dataclass(frozen=True)
class SitePlan:
    site: str
    name: str  # the pipeline's name, on the nodes and in the control plane
    selector: dict[str, str]  # the nodes of the site
    edge_text: str
    cloud_text: str | None
    source: Path


def _placed(c: dict[str, Any], where: str) -> bool:
    return c.get("placement", "edge") == where


def split(doc: dict[str, Any], selector: dict[str, str]) -> tuple[dict[str, Any],
                                                                  dict[str, Any] | None]:
    """(edge document, cloud document or None) of a placed pipeline document."""
    spec = doc["spec"]
    edge_ids = {c["id"] for k in ("sources", "stages") for c in spec.get(k, [])
                if _placed(c, "edge")}
    edge = copy.deepcopy(doc)
    e = edge["spec"]
    for k in ("sources", "stages", "sinks"):
        e[k] = [c for c in e.get(k, []) if _placed(c, "edge")]
    cloud_stages = [copy.deepcopy(c) for c in spec.get("stages", []) if _placed(c, "cloud")]
    cloud_sinks = [copy.deepcopy(c) for c in spec.get("sinks", []) if _placed(c, "cloud")]
    if not cloud_stages and not cloud_sinks:
        return edge, None
    streams = {}  # edge component (with port) -> the stream its output goes to the cloud as
    for s in e["sinks"]:
        if s.get("type") == "outbox" and len(s.get("inputs", [])) == 1:
            streams.setdefault(s["inputs"][0], s.get("stream") or s["id"])
    sources: dict[str, dict[str, Any]] = {}
    for c in cloud_stages + cloud_sinks:
        for ref in c.get("inputs", []):
            if ref.partition(".")[0] not in edge_ids or ref in sources:
                continue
            if ref not in streams:  # the edge does not send it yet: it must
                sid = f"{ref.replace('.', '-')}-to-cloud"
                e["sinks"].append({"id": sid, "type": "outbox", "inputs": [ref],
                                   "placement": "edge", "stream": sid})
                streams[ref] = sid
            sources[ref] = {"id": ref.replace(".", "-"), "type": "stream", "placement": "cloud",
                            "stream": streams[ref], "nodes": dict(selector)}
    for c in cloud_stages + cloud_sinks:
        c["inputs"] = [sources[r]["id"] if r in sources else r for r in c.get("inputs", [])]
    cloud = {"apiVersion": doc["apiVersion"], "kind": "Pipeline",
             "metadata": copy.deepcopy(doc["metadata"]),
             "spec": {"sources": list(sources.values()), "stages": cloud_stages,
                      "sinks": [s for s in cloud_sinks if s.get("type") == "outbox"]}}
    if "outbox" in spec:
        cloud["spec"]["outbox"] = copy.deepcopy(spec["outbox"])
    return edge, cloud


def dump(doc: dict[str, Any], source: str) -> str:
    return HEADER.format(source=source) + yaml.safe_dump(doc, sort_keys=False, width=100)


def read_plan(out_dir: Path, site_label: str = "site") -> list[SitePlan]:
    """Every planned pipeline of ``OUT_DIR/pipelines/`` split (`split`) and validated.
    Raises `ConfigError` / `SpecError` (file:line)."""
    folder = Path(out_dir) / "pipelines"
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise ConfigError(f"{folder}: no planned pipelines; run `edgewise plan WORKLOAD -o "
                          f"{out_dir}` first")
    plans = []
    for f in files:
        text = read_text(f)
        parse_pipeline(text, str(f), base_dir=f.parent, load_code=False)
        doc, _ = load_document(text, str(f))
        site = doc["metadata"].get("labels", {}).get(SITE_LABEL) or f.stem
        selector = {site_label: site}
        edge, cloud = split(doc, selector)
        edge_text = dump(edge, f.name)
        parse_pipeline(edge_text, f"{f} (edge part)", load_code=False)
        cloud_text = None
        if cloud is not None:
            cloud_text = dump(cloud, f.name)
            parse_pipeline(cloud_text, f"{f} (cloud part)", load_code=False)
        plans.append(SitePlan(site, doc["metadata"]["name"], selector, edge_text, cloud_text, f))
    return plans
