"""`edgewise plan --interactive`: ask for the required inputs in the terminal, show the
defaults inferred for the rest, write the workload file. No network, no external service."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import yaml

from edgewise.pipeline.units import parse_duration
from edgewise.plan.workload import parse_workload

_ID = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")


def _ident(prompt: str, default: str) -> str:
    while True:
        value = click.prompt(prompt, default=default).strip().lower()
        if _ID.match(value):
            return value
        click.echo("  use lower-case letters, digits, '-' and '_' (e.g. plant-1)")


def _duration(prompt: str, default: str) -> str:
    while True:
        value = click.prompt(prompt, default=default).strip()
        try:
            parse_duration(value)
        except ValueError as exc:
            click.echo(f"  {exc}")
            continue
        return value


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
        sources.append(src)
        if not click.confirm("Another data source?", default=False):
            break
    latency = _duration("Maximum alarm latency", "100ms")
    autonomy = _duration("Offline autonomy (how long the site must run without the link)", "4h")
    doc = {
        "apiVersion": "edgewise.io/v1", "kind": "Workload", "metadata": {"name": name},
        "spec": {"use_case": use_case,
                 "sites": [{"name": site, "count": sites, "sources": sources}],
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
