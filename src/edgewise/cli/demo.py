"""`edgewise demo`: flags for the demo run (`edgewise.testbed.demo`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgewise.cli.common import fail, need_extra
from edgewise.errors import EdgewiseError


@click.command()
@click.option("--agents", type=click.IntRange(min=1, max=20), default=3, show_default=True,
              help="How many edge agents to run.")
@click.option("--cut-seconds", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="How long the link of one agent is cut (blackhole); 0: no cut.")
@click.option("--duration", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds of readings each agent's factory line produces (10,000/s).")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work in this (new or empty) directory and keep it: logs, data, stores.")
@click.option("--pipeline", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Another factory-line pipeline (default: "
              "examples/factory-line.yaml).")
@click.option("--open", "open_console", is_flag=True,
              help="Open the operator console in the browser (its address and a viewer "
              "token are printed either way).")
@click.option("--hold", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds the control plane (and its console) stays up after the agents "
              "stop.")
def demo(agents: int, cut_seconds: float, duration: float, keep: Path | None,
         pipeline: Path | None, open_console: bool, hold: float) -> None:
    """A control plane and agents on this machine: cut a link, check every record arrived
    exactly once, compare bytes on the wire with JSON over MQTT."""
    import asyncio

    from rich.console import Console

    need_extra("cloud", "edgewise demo (it runs a control plane)")
    from edgewise.testbed.demo import DemoOptions, run_demo  # not on every command's path

    console = Console()
    opts = DemoOptions(agents, cut_seconds, duration, keep, pipeline, open_console, hold)
    try:
        code = asyncio.run(run_demo(opts, console, Console(stderr=True)))
    except EdgewiseError as exc:
        fail(exc)
    sys.exit(code)
