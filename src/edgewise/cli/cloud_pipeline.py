"""`edgewise cloud pipeline list|show|set|delete`: pipelines the control plane runs over what
nodes sent (docs/cloud-pipelines.md), over the operator API (``/v1/cloud/pipelines``).

    edgewise cloud pipeline list
    edgewise cloud pipeline show NAME            its YAML, version, state, per-node watermarks
    edgewise cloud pipeline set FILE             validated with file:line errors (exit 2)
    edgewise cloud pipeline delete NAME          its stored results stay
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgewise.cli.common import escape
from edgewise.cli.operator import _out, _when, api_command
from edgewise.errors import ConfigError

BASE = "/v1/cloud/pipelines"


@click.group("pipeline")
def pipeline() -> None:
    """Pipelines the control plane runs over ingested streams."""


@pipeline.command("list")
@api_command
def pipeline_list(client: Any) -> Any:
    """Every cloud pipeline, its version and state."""
    from rich.table import Table

    from edgewise.cloud.pipelines.models import CloudPipelineList

    res = client.call("GET", BASE, CloudPipelineList)

    def render() -> None:
        t = Table(title=f"{len(res.pipelines)} cloud pipeline(s)")
        for c in ("name", "version", "state", "results node", "updated by"):
            t.add_column(c)
        for p in res.pipelines:
            t.add_row(escape(p.name), str(p.version), escape(p.state + (
                f": {p.error}" if p.error else "")), escape(p.results_node),
                escape(p.updated_by))
        _out().print(t)

    return res, render


@pipeline.command("show")
@click.argument("name")
@api_command
def pipeline_show(client: Any, name: str) -> Any:
    """One cloud pipeline: its YAML, version, state and figures."""
    import json

    from edgewise.cloud.pipelines.models import CloudPipelineDetail

    res = client.call("GET", f"{BASE}/{_seg(name)}", CloudPipelineDetail)

    def render() -> None:
        click.echo(f"{res.name}  version {res.version}  {res.state}"
                   + (f": {res.error}" if res.error else ""))
        click.echo(f"results: edgewise data query --node {res.results_node} --stream STREAM")
        click.echo(f"updated {_when(res.updated)} by {res.updated_by}")
        click.echo(f"runs on {res.runner} (term {res.term})" if res.runner else
                   "runs on no replica now")
        if res.status:
            click.echo(json.dumps(res.status, indent=2, default=str))
        click.echo("---")
        click.echo(res.text.rstrip("\n"))

    return res, render


@pipeline.command("set")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@api_command
def pipeline_set(client: Any, file: Path) -> Any:
    """Set a cloud pipeline from FILE (its metadata.name is its name); checked here first."""
    from edgewise.cloud.pipelines.models import CloudPipelineSet, CloudPipelineSetResponse
    from edgewise.cloud.pipelines.spec import parse_cloud_pipeline

    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    spec = parse_cloud_pipeline(text, str(file))
    res = client.call("PUT", f"{BASE}/{_seg(spec.name)}", CloudPipelineSetResponse,
                      body=CloudPipelineSet(text=text))

    def render() -> None:
        click.echo(f"cloud pipeline {res.name}: version {res.version}"
                   + ("" if res.changed else " (unchanged)"))

    return res, render


@pipeline.command("delete")
@click.argument("name")
@api_command
def pipeline_delete(client: Any, name: str) -> Any:
    """Stop and remove a cloud pipeline; its stored results stay."""
    from edgewise.cloud.pipelines.models import CloudPipelineDeleteResponse

    res = client.call("DELETE", f"{BASE}/{_seg(name)}", CloudPipelineDeleteResponse)
    return res, lambda: click.echo(f"cloud pipeline {res.name} deleted")


def _seg(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
