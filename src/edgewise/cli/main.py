"""The one command line: ``edgewise ...``.

Reads flags and the environment here and nowhere else, turns `EdgewiseError`s into one-line
messages with exit codes (2: the user's input is wrong; 1: the run failed), and shows progress on
stderr so ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgewise import __version__
from edgewise.cli.common import (
    Cli,
    LazyGroup,
    err_console,
    fail,
    fmt,
    stderr_console,
)
from edgewise.cli.logs import FORMATS, configure_logging
from edgewise.cli.output import Output, output_options
from edgewise.cli.startup import loading
from edgewise.errors import ConfigError, EdgewiseError

if TYPE_CHECKING:
    from rich.table import Table

    from edgewise.pipeline.summary import EngineSummary

SUBCOMMANDS = {
    "plan": "edgewise.cli.plan:plan",
    "cloud": "edgewise.cli.cloud:cloud",
    "agent": "edgewise.cli.agent:agent",
    "node": "edgewise.cli.operator:node",
    "config": "edgewise.cli.operator:config",
    "data": "edgewise.cli.data:data",
    "demo": "edgewise.cli.demo:demo",
    "release": "edgewise.cli.release:release",
    "rollout": "edgewise.cli.rollout:rollout",
    "token": "edgewise.cli.tokens:token",
    "audit": "edgewise.cli.tokens:audit",
}
"""Command groups in their own modules, imported when used (cli/common.py, `LazyGroup`)."""


@click.group(cls=Cli, lazy=SUBCOMMANDS)
@click.version_option(__version__, prog_name="edgewise")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              envvar="EDGEWISE_LOG_FORMAT", show_envvar=True,
              help="Log lines on stderr: text with UTC timestamps, or one JSON object a line.")
def main(verbose: int, log_format: str) -> None:
    """Edgewise: edge pipelines that keep working offline and sync exactly once."""
    # gmqtt logs a traceback for every lost connection (kept at ERROR below -vv): our sources
    # and sinks say it in a line
    configure_logging(verbose, log_format)


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@output_options()
def validate(pipeline: Path, out: Output) -> None:
    """Check a pipeline file and print what it wires together (json/yaml: also when the file
    is refused, with the problems)."""
    from edgewise.errors import SpecError
    from edgewise.pipeline.spec import load_pipeline

    try:
        spec = load_pipeline(pipeline)
    except EdgewiseError as exc:
        if out.data:
            problems = ([{"line": line, "field": field, "message": message}
                         for line, field, message in exc.problems]
                        if isinstance(exc, SpecError) else [{"line": None, "field": "",
                                                             "message": str(exc)}])
            out.emit({"file": str(pipeline), "ok": False, "problems": problems})
        fail(exc)
    if out.data:
        out.emit({
            "file": str(pipeline), "ok": True, "pipeline": spec.name,
            "sources": [c.id for c in spec.sources], "stages": [c.id for c in spec.stages],
            "sinks": [c.id for c in spec.sinks]})
        return
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
@click.option("--flush/--no-flush", default=False, help="Emit open windows when stopped early.")
@output_options()
def run(pipeline: Path, duration: float | None, data_dir: Path | None, out: Output,
        flush: bool) -> None:
    """Run a pipeline standalone until its sources end, --duration passes, or Ctrl-C."""
    try:
        with contextlib.ExitStack() as stack:
            with loading():  # the garbage collector is off, then frozen (cli/startup.py)
                import asyncio

                from edgewise.outbox import Outbox, outbox_file
                from edgewise.outbox.quarantine import open_outbox
                from edgewise.pipeline.engine import Engine
                from edgewise.pipeline.spec import load_pipeline

                spec = load_pipeline(pipeline)
                if duration is not None and duration <= 0:
                    raise ConfigError("--duration must be a positive number of seconds")
                data = data_dir or Path(".edgewise") / spec.name
                body = spec.body.outbox
                outbox = Outbox(outbox_file(data), body.max_bytes, body.sync)
                quarantined = open_outbox(outbox)  # a damaged file is moved aside (as agents)
                if quarantined is not None:
                    err_console.print(f"[yellow]warning:[/] {quarantined.describe()}")
                stack.callback(outbox.close)
                engine = Engine(spec, data, duration=duration, flush_on_stop=flush,
                                outbox=outbox)
            summary = asyncio.run(
                _run_with_status(engine, live=not out.data or sys.stderr.isatty()))
    except EdgewiseError as exc:
        fail(exc)
    if out.data:
        out.emit(summary)
    else:
        out.console().print(summary_table(summary))


async def _run_with_status(engine: Any, live: bool) -> EngineSummary:
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, engine.stop)
    if not live:
        return await engine.run()
    from rich.live import Live

    with Live(status_table(None), console=stderr_console(), refresh_per_second=4,
              transient=True) as lv:
        return await engine.run(on_status=lambda s: lv.update(status_table(s)))


def status_table(s: EngineSummary | None) -> Table:
    """The live view of `edgewise run` (None: not started yet)."""
    from rich.table import Table

    t = Table(title=f"edgewise run: {s['pipeline'] if s else '...'}", show_header=False,
              box=None)
    if not s:
        t.add_row("starting", "")
        return t
    rate = s["readings_in"] / s["elapsed_s"] if s["elapsed_s"] else 0
    t.add_row("elapsed", f"{s['elapsed_s']:.1f} s")
    t.add_row("readings in", f"{s['readings_in']:,} ({rate:,.0f}/s)")
    t.add_row("alarms", fmt(s["alarms"]))
    t.add_row("late / dead-lettered", f"{s['late']:,} / {s['dead_lettered']:,}")
    t.add_row("outbox", f"{s['outbox']['depth_records']:,} records, {s['outbox']['bytes']:,} B")
    return t


def summary_table(s: EngineSummary) -> Table:
    from rich.table import Table

    t = Table(title=f"Summary of pipeline {s['pipeline']!r} ({s['elapsed_s']:.1f} s)")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("readings in", fmt(s["readings_in"]))
    t.add_row("alarms", fmt(s["alarms"]))
    t.add_row("late (side output)", fmt(s["late"]))
    t.add_row("dead-lettered", fmt(s["dead_lettered"]))
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


@main.group(cls=LazyGroup, lazy={"fleet": "edgewise.cli.fleet:fleet"})
def sim() -> None:
    """Simulated data."""


@sim.command("factory-line")
@click.option("--count", type=int, default=1_000_000, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@output_options()
def sim_factory_line(count: int, seed: int, output: Path, out: Output) -> None:
    """Write factory-line readings as NDJSON (deterministic for a seed)."""
    from edgewise.sim.signals import write_ndjson

    folder = output.parent
    if not folder.is_dir():
        fail(ConfigError(f"-o {output}: folder {folder} does not exist; create it first "
                         "(mkdir -p) or write somewhere else"))
    if count < 0:
        fail(ConfigError(f"--count {count}: give a number of readings, 0 or more"))
    try:
        above = write_ndjson(str(output), count, seed)
    except OSError as exc:
        fail(ConfigError(f"-o {output}: cannot write it: {exc.strerror or exc}"))
    if out.data:
        out.emit({"output": str(output), "readings": count, "seed": seed, "above_100": above})
    else:
        click.echo(f"wrote {count:,} readings to {output} ({above:,} above 100.0)")



@main.command("dead-letters")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--limit", type=int, default=20, show_default=True)
@output_options()
def dead_letters(data_dir: Path, limit: int, out: Output) -> None:
    """Show the newest dead letters: input that could not be used, and why."""
    from rich.table import Table

    from edgewise.outbox import Outbox, outbox_file

    path = outbox_file(data_dir)
    if not path.exists():
        # an agent keeps its engine's outbox one level down (DATA/engine)
        below = sorted(p.parent for p in data_dir.glob(f"*/{path.name}")) \
            if data_dir.is_dir() else []
        hint = (f"; the outbox is in {below[0]}: pass --data {below[0]}" if below else
                "; pass the --data directory of `edgewise run` (or DATA/engine of an agent)")
        fail(ConfigError(f"{path}: no outbox here{hint}"))
    with Outbox(path) as ob:
        rows = ob.dead_letters(limit)
    if out.data:
        for r in rows:
            r["payload"] = (r["payload"] or b"")[:200].decode("utf-8", "replace")
        out.emit(rows)
        return
    t = Table(title=f"dead letters in {path}")
    for c in ("id", "source", "size", "reason"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["id"]), r["source"], f"{r['size']:,}", r["reason"])
    out.console().print(t)


@main.command()
@click.argument("type_name", metavar="[TYPE]", required=False)
@click.option("--kind", type=click.Choice(["source", "operator", "sink"]), default=None,
              help="Only this kind (for a TYPE that is both a source and a sink: mqtt, file).")
@click.option("--markdown", is_flag=True, help="Print the Markdown used in docs/pipeline-spec.md.")
@output_options()
def components(type_name: str | None, kind: str | None, markdown: bool, out: Output) -> None:
    """List every source, operator and sink with its parameters; TYPE: one, with an example."""
    from rich.markdown import Markdown

    from edgewise.pipeline import reference, registry

    if type_name is None:
        pairs = [(k, n) for k, table in registry.KINDS.items() if kind in (None, k)
                 for n in table]
    else:
        kinds = [k for k in reference.kinds_of(type_name) if kind in (None, k)]
        if not kinds:
            names = ", ".join(sorted({n for t in registry.KINDS.values() for n in t}))
            what = f"{kind} " if kind else ""
            fail(ConfigError(f"no {what}component {type_name!r}; the built-in ones: {names}"))
        pairs = [(k, type_name) for k in kinds]
    if out.data:
        out.emit([reference.component(k, n) for k, n in pairs])
        return
    if type_name is None and kind is None:
        text = reference.markdown()
    else:
        text = "\n".join(f"## {k}\n\n" + reference.describe(k, n, example=type_name is not None)
                         for k, n in pairs)
    if markdown:
        click.echo(text, nl=False)
    else:
        out.console().print(Markdown(text))


if __name__ == "__main__":
    main()
