"""The one command line: ``edgewise ...``.

Reads flags and the environment here and nowhere else, turns `EdgewiseError`s into one-line
messages with exit codes (2: the user's input is wrong; 1: the run failed), and shows progress on
stderr so ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from edgewise import __version__
from edgewise.errors import ConfigError, EdgewiseError

err_console = Console(stderr=True)


def _fail(exc: EdgewiseError) -> None:
    code = 2 if isinstance(exc, ConfigError) else 1
    err_console.print(
        f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True
    )
    sys.exit(code)


@click.group()
@click.version_option(__version__, prog_name="edgewise")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Edgewise: edge pipelines that keep working offline and sync exactly once."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )
    # gmqtt logs a traceback for every lost connection; our sources and sinks say it in a line
    logging.getLogger("gmqtt").setLevel(logging.ERROR if verbose < 2 else logging.DEBUG)


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
def validate(pipeline: Path) -> None:
    """Check a pipeline file and print what it wires together."""
    from edgewise.pipeline.spec import load_pipeline

    try:
        spec = load_pipeline(pipeline)
    except EdgewiseError as exc:
        _fail(exc)
    click.echo(
        f"{pipeline}: ok - pipeline {spec.name!r}: {len(spec.sources)} source(s), "
        f"{len(spec.stages)} stage(s), {len(spec.sinks)} sink(s)"
    )


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the outbox and checkpoint live (default: .edgewise/<pipeline name>).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--flush/--no-flush", default=False, help="Emit open windows when stopped early.")
def run(pipeline: Path, duration: float | None, data_dir: Path | None, as_json: bool,
        flush: bool) -> None:
    """Run a pipeline standalone until its sources end, --duration passes, or Ctrl-C."""
    from edgewise.pipeline.engine import Engine
    from edgewise.pipeline.spec import load_pipeline

    try:
        spec = load_pipeline(pipeline)
        if duration is not None and duration <= 0:
            raise ConfigError("--duration must be a positive number of seconds")
        data = data_dir or Path(".edgewise") / spec.name
        engine = Engine(spec, data, duration=duration, flush_on_stop=flush)
        summary = asyncio.run(_run_with_status(engine, live=not as_json or err_console.is_terminal))
    except EdgewiseError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        Console().print(summary_table(summary))


async def _run_with_status(engine: Any, live: bool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, engine.stop)
    if not live:
        return await engine.run()
    with Live(status_table({}), console=err_console, refresh_per_second=4, transient=True) as lv:
        return await engine.run(on_status=lambda s: lv.update(status_table(s)))


def _fmt(n: Any) -> str:
    if isinstance(n, float):
        return f"{n:,.3f}"
    if isinstance(n, int):
        return f"{n:,}"
    return "-" if n is None else str(n)


def status_table(s: dict[str, Any]) -> Table:
    t = Table(title=f"edgewise run: {s.get('pipeline', '...')}", show_header=False, box=None)
    if not s:
        t.add_row("starting", "")
        return t
    rate = s["readings_in"] / s["elapsed_s"] if s.get("elapsed_s") else 0
    t.add_row("elapsed", f"{s['elapsed_s']:.1f} s")
    t.add_row("readings in", f"{s['readings_in']:,} ({rate:,.0f}/s)")
    t.add_row("alarms", _fmt(s["alarms"]))
    t.add_row("late / dead-lettered", f"{s['late']:,} / {s['dead_lettered']:,}")
    t.add_row("outbox", f"{s['outbox']['depth_records']:,} records, {s['outbox']['bytes']:,} B")
    return t


def summary_table(s: dict[str, Any]) -> Table:
    t = Table(title=f"Summary of pipeline {s['pipeline']!r} ({s['elapsed_s']:.1f} s)")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("readings in", _fmt(s["readings_in"]))
    t.add_row("alarms", _fmt(s["alarms"]))
    t.add_row("late (side output)", _fmt(s["late"]))
    t.add_row("dead-lettered", _fmt(s["dead_lettered"]))
    for name, st in s["streams"].items():
        extra = ""
        if st["dropped"] or st["compacted"]:
            extra = f" (dropped {st['dropped']:,}, compacted {st['compacted']:,})"
        t.add_row(f"stream {name} (priority {st['priority']})", f"{st['records']:,}{extra}")
    for name, st in s["sinks"].items():
        lat = st.get("latency") or {}
        p99 = lat.get("p99_ms")
        tail = f", p99 {p99:.2f} ms" if p99 is not None else ""
        t.add_row(f"sink {name}", f"{st['written']:,}{tail}")
    ob = s["outbox"]
    t.add_row("outbox depth", f"{ob['depth_records']:,} records, {ob['bytes']:,} bytes")
    t.add_row("outbox file", ob["path"])
    return t


@main.group()
def sim() -> None:
    """Simulated data."""


@sim.command("factory-line")
@click.option("--count", type=int, default=1_000_000, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def sim_factory_line(count: int, seed: int, output: Path) -> None:
    """Write factory-line readings as NDJSON (deterministic for a seed)."""
    from edgewise.sim.signals import write_ndjson

    above = write_ndjson(str(output), count, seed)
    click.echo(f"wrote {count:,} readings to {output} ({above:,} above 100.0)")


@main.command("dead-letters")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dead_letters(data_dir: Path, limit: int, as_json: bool) -> None:
    """Show the newest dead letters: input that could not be used, and why."""
    from edgewise.edge.outbox import Outbox

    path = data_dir / "outbox.db"
    if not path.exists():
        _fail(ConfigError(f"{path}: no outbox here; pass the --data directory of a run"))
    with Outbox(path) as ob:
        rows = ob.dead_letters(limit)
    if as_json:
        for r in rows:
            r["payload"] = (r["payload"] or b"")[:200].decode("utf-8", "replace")
        click.echo(json.dumps(rows))
        return
    t = Table(title=f"dead letters in {path}")
    for c in ("id", "source", "size", "reason"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["id"]), r["source"], f"{r['size']:,}", r["reason"])
    Console().print(t)


@main.command()
@click.option("--markdown", is_flag=True, help="Print the Markdown used in docs/pipeline-spec.md.")
def components(markdown: bool) -> None:
    """List every source, operator and sink with its parameters."""
    from rich.markdown import Markdown

    from edgewise.pipeline.reference import markdown as reference

    text = reference()
    if markdown:
        click.echo(text, nl=False)
    else:
        Console().print(Markdown(text))


def _register_subcommands() -> None:
    from edgewise.cloud.cli import cloud
    from edgewise.cloud.operator_cli import config, data, node
    from edgewise.demo import demo
    from edgewise.edge.cli import agent
    from edgewise.plan.cli import plan

    for command in (plan, cloud, agent, node, config, data, demo):
        main.add_command(command)


_register_subcommands()

if __name__ == "__main__":
    main()
