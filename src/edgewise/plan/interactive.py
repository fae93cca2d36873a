"""`edgewise plan --interactive`: ask for the required inputs in the terminal, show the
defaults inferred for the rest, write the workload file. No network, no external service.

Besides the sources and the latency and autonomy requirements it asks for each source's
compliance tags (privacy), the site's link (uplink, price per GB, longest outage) and its high
availability (nodes per site, the HA mode). Durations and bandwidths need a unit: a bare
"120" is refused with a hint ("120ms"? "120s"? "120kbit/s"?) and asked again."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import yaml

from edgewise.pipeline.units import parse_duration
from edgewise.plan.workload import parse_bandwidth, parse_workload
from edgewise.plan.workload_format import COMPLIANCE

_ID = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
_BARE = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*$")


def _ident(prompt: str, default: str) -> str:
    while True:
        value = click.prompt(prompt, default=default).strip().lower()
        if _ID.match(value):
            return value
        click.echo("  use lower-case letters, digits, '-' and '_' (e.g. plant-1)")


def _duration(prompt: str, default: str) -> str:
    while True:
        value = click.prompt(prompt, default=default).strip()
        if _BARE.match(value):
            click.echo(f"  {value!r} has no unit; write e.g. '{value}ms', '{value}s', "
                       f"'{value}m' or '{value}h'")
            continue
        try:
            parse_duration(value)
        except ValueError as exc:
            click.echo(f"  {exc}")
            continue
        return value


def _bandwidth(prompt: str, default: str) -> str:
    while True:
        value = click.prompt(prompt, default=default).strip()
        if _BARE.match(value):
            click.echo(f"  {value!r} has no unit; write e.g. '{value}kbit/s' or "
                       f"'{value}Mbit/s'")
            continue
        try:
            parse_bandwidth(value)
        except ValueError as exc:
            click.echo(f"  {exc}")
            continue
        return value


def _tags(prompt: str) -> list[str]:
    while True:
        value = click.prompt(prompt, default="", show_default=False)
        tags = [t.strip().lower() for t in value.split(",") if t.strip()]
        bad = [t for t in tags if t not in COMPLIANCE]
        if not bad:
            return tags
        click.echo(f"  unknown tag(s) {', '.join(bad)}; use {', '.join(COMPLIANCE)}")


def ask_workload(path: Path) -> Path:
    """Ask, validate, show the inferred defaults, write ``path``; returns it."""
    click.echo("Describe the workload; press Enter to accept a default.")
    name = _ident("Workload name", "my-workload")
    use_case = click.prompt("Use case (one line)", default="monitoring and alarms at the edge")
    site = _ident("Site type name", "site")
    sites = click.prompt("Number of such sites", type=click.IntRange(1, 1_000_000), default=1)
    sources: list[dict[str, Any]] = []
    while True:
        click.echo(f"Data source {len(sources) + 1}:")
        sid = _ident("  source id", f"sensors{len(sources) + 1 if sources else ''}")
        count = click.prompt("  how many sensors", type=click.IntRange(1, 1_000_000),
                             default=100)
        rate = click.prompt("  readings per second per sensor (Hz)",
                            type=click.FloatRange(min=0.0001, max=1_000_000), default=1.0)
        high = click.prompt("  alarm when a reading is above (blank: no alarm)", default="",
                            show_default=False)
        src: dict[str, Any] = {"id": sid, "count": count, "rate_hz": rate}
        if high.strip():
            try:
                src["alarm"] = {"high": float(high)}
            except ValueError:
                click.echo("  not a number; no alarm for this source")
        tags = _tags(f"  personal or regulated data? tags ({', '.join(COMPLIANCE)}; "
                     "comma-separated, blank: none)")
        if tags:
            src["compliance"] = tags
        sources.append(src)
        if not click.confirm("Another data source?", default=False):
            break
    latency = _duration("Maximum alarm latency", "100ms")
    autonomy = _duration("Offline autonomy (how long the site must run without the link)", "4h")
    click.echo("The site's link:")
    link = {"uplink": _bandwidth("  uplink bandwidth", "20Mbit/s"),
            "cost_per_gb": click.prompt("  price per GB sent (0 if not metered)",
                                        type=click.FloatRange(min=0.0), default=0.09),
            "longest_outage": _duration("  longest outage to expect", "1h")}
    nodes = click.prompt("Nodes per site (2 or more for high availability)",
                         type=click.IntRange(1, 64), default=1)
    site_doc: dict[str, Any] = {"name": site, "count": sites, "nodes": nodes}
    if nodes >= 2:
        site_doc["ha"] = click.prompt("  HA mode", type=click.Choice(
            ["active-standby", "active-active"]), default="active-standby")
    site_doc.update(sources=sources, link=link)
    doc = {
        "apiVersion": "edgewise.io/v1", "kind": "Workload", "metadata": {"name": name},
        "spec": {"use_case": use_case,
                 "sites": [site_doc],
                 "requirements": {"max_alarm_latency": latency, "offline_autonomy": autonomy}},
    }
    text = yaml.safe_dump(doc, sort_keys=False)
    workload = parse_workload(text, str(path))
    click.echo("Inferred for everything else:")
    for inf in workload.inferred:
        click.echo(f"  {inf.field}: {inf.value} ({inf.why})")
    path.write_text("# Written by `edgewise plan --interactive`\n" + text, encoding="utf-8")
    click.echo(f"Wrote {path}")
    return path
