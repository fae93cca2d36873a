"""`edgewise plan apply OUT_DIR --cloud URL [--dry-run]`: deploy what `edgewise plan` wrote.

For every planned pipeline (``OUT_DIR/pipelines/<site>.yaml``; `edgewise.plan.deploy`):

* its **edge part** becomes the desired pipelines of every node whose ``--site-label`` (default
  ``site``) is the site's name (``edgewise config set --selector site=NAME``): as desired state,
  not as a release - a release carries the agent's code and plugins, a pipeline is
  configuration the node applies without restarting;
* its **cloud part** (the stages placed in the cloud, reading the streams the edge part sends)
  becomes a cloud pipeline of the same name (``edgewise cloud pipeline set``).

It prints what changes (new, changed, unchanged; per site, how many nodes); ``--dry-run`` only
prints it. Nothing is changed for a part that is already as planned. The operator token needs
the operator role; each change is audited by the control plane.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from edgewise.cli.operator import api_command


@click.command("apply")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--cloud", "cloud_url", default=None,
              help="The control plane's URL (default: the one in the CLI config).")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--site-label", default="site", show_default=True,
              help="The node label whose value is the site's name.")
@api_command
def apply(client: Any, out_dir: Path, cloud_url: str | None, dry_run: bool,
          site_label: str) -> Any:
    """Install a plan: edge pipelines on each site's nodes, cloud pipelines on the control
    plane."""
    from edgewise.cloud.client import OperatorClient
    from edgewise.cloud.openapi import ConfigSetRequest
    from edgewise.cloud.pipelines.models import (
        CloudPipelineDetail,
        CloudPipelineSet,
        CloudPipelineSetResponse,
    )
    from edgewise.errors import NotFound
    from edgewise.plan.deploy import read_plan

    plans = read_plan(out_dir, site_label)
    if cloud_url and cloud_url.rstrip("/") != client.url.rstrip("/"):
        client = OperatorClient(dataclasses.replace(client.config, url=cloud_url.rstrip("/")))
    changes: list[dict[str, Any]] = []
    for p in plans:
        selector = ",".join(f"{k}={v}" for k, v in p.selector.items())
        nodes = client.list_nodes(selector)
        differ = [n.id for n in nodes if _pipelines(client, n.id) != {p.name: p.edge_text}]
        edge = {"part": "edge", "site": p.site, "pipeline": p.name, "selector": selector,
                "nodes": len(nodes), "to_change": len(differ),
                "action": "unchanged" if not differ else "set"}
        if differ and not dry_run:
            res = client.set_config(ConfigSetRequest(selector=selector,
                                                     pipelines={p.name: p.edge_text}))
            edge["versions"] = getattr(res, "model_dump", lambda: {})()
        changes.append(edge)
        if p.cloud_text is None:
            continue
        try:
            current: str | None = client.call("GET", f"/v1/cloud/pipelines/{p.name}",
                                              CloudPipelineDetail).text
        except NotFound:
            current = None
        action = "new" if current is None else ("unchanged" if current == p.cloud_text
                                                else "changed")
        cloud = {"part": "cloud", "site": p.site, "pipeline": p.name, "action": action}
        if action != "unchanged" and not dry_run:
            r = client.call("PUT", f"/v1/cloud/pipelines/{p.name}", CloudPipelineSetResponse,
                            body=CloudPipelineSet(text=p.cloud_text))
            cloud["version"] = r.version
        changes.append(cloud)
    result = {"dry_run": dry_run, "changes": changes}

    def render() -> None:
        verb = "would" if dry_run else "did"
        for c in changes:
            if c["part"] == "edge":
                what = ("already as planned" if c["action"] == "unchanged" else
                        f"{verb} set on {c['to_change']} of {c['nodes']} node(s)")
                click.echo(f"edge  {c['pipeline']}: nodes {c['selector']}: {what}")
            else:
                what = {"new": f"{verb} create", "changed": f"{verb} replace",
                        "unchanged": "already as planned"}[c["action"]]
                ver = f" (version {c['version']})" if "version" in c else ""
                click.echo(f"cloud {c['pipeline']}: {what}{ver}")
        if not any(c["nodes"] for c in changes if c["part"] == "edge"):
            click.echo(f"note: no node has the label {site_label}=<site> yet; label them "
                       "(edgewise node label) and apply again")

    return result, render


def _pipelines(client: Any, node_id: str) -> dict[str, str] | None:
    got = client.get_config(node_id)
    return None if got.desired is None else got.desired.pipelines
