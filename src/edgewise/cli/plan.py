"""`edgewise plan`: from a workload file to a placed, sized, quantified and deployable design.

    edgewise plan WORKLOAD.yaml [--simulate] [--no-calibrate] -o DIR
    edgewise plan --interactive -o DIR        (or no WORKLOAD: asks for the required inputs)
    edgewise plan apply DIR --cloud URL [--dry-run]   deploy it (`cli.plan_apply`)

CPU coefficients are calibrated on this machine (`edgewise.plan.costs`) and cached in
``$EDGEWISE_CACHE_DIR`` or ``$XDG_CACHE_HOME/edgewise`` (default ``~/.cache/edgewise``);
``--no-calibrate`` uses the static table instead.

Writes into DIR: ``architecture.md`` and ``architecture.html``, the figures next to them,
``pipelines/`` (what ``plan apply`` installs) and ``plan.json`` with the key figures.
Heavy modules (numpy work, matplotlib) are imported inside the command only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from edgewise.cli.common import fail
from edgewise.cli.output import Output, output_options
from edgewise.errors import ConstraintsUnmet, EdgewiseError


class PlanCommand(click.Command):
    """`edgewise plan WORKLOAD` and, with ``apply`` first, `edgewise plan apply OUT_DIR`
    (`cli.plan_apply`; a workload file named ``apply`` is ``./apply``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] == "apply":
            ctx.meta["edgewise.plan.apply"] = args[1:]
            return []
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        rest = ctx.meta.get("edgewise.plan.apply")
        if rest is None:
            return super().invoke(ctx)
        from edgewise.cli.plan_apply import apply

        return apply.main(rest, prog_name=f"{ctx.command_path} apply")


@click.command(cls=PlanCommand)
@click.argument("workload", required=False,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where to write the document and artefacts "
                                 "(default: plan-<workload name>).")
@click.option("--simulate", is_flag=True,
              help="Run the real engine on synthetic data and use the measured figures.")
@click.option("--rounds", type=click.IntRange(1, 9), default=None,
              help="With --simulate: realtime runs per site; node cores are their median "
                   "(default 3; 1 is faster and noisier).")
@click.option("--interactive", is_flag=True,
              help="Ask for the required inputs, write the workload file, then plan it.")
@output_options(name="output")
@click.option("--strict", is_flag=True, help="Exit with code 3 when a constraint is unmet.")
@click.option("--no-calibrate", "no_calibrate", is_flag=True,
              help="Use the static CPU table instead of calibrating the operators on this "
                   "machine (calibration takes about a second, then is cached).")
def plan(workload: Path | None, out: Path | None, simulate: bool, rounds: int | None,
         interactive: bool, output: Output, strict: bool, no_calibrate: bool) -> None:
    """Plan what runs at the edge and what in the cloud, size it, and prove it.

    `edgewise plan apply DIR --cloud URL [--dry-run]` then installs the plan: the edge
    pipelines on each site's nodes, the cloud pipelines on the control plane."""
    try:
        from edgewise.plan.run import run_plan  # edgewise[plan]: MissingExtra names it

        if workload is None or interactive:
            from edgewise.plan.interactive import ask_workload

            target = (out or Path("plan-interactive"))
            target.mkdir(parents=True, exist_ok=True)
            workload = ask_workload(target / "workload.yaml")
            out = target
        result = run_plan(workload, out, simulate, progress=_progress(output.data),
                          calibrate=not no_calibrate, cache_dir=cache_dir(), rounds=rounds)
    except EdgewiseError as exc:
        fail(exc)
        return
    if output.data:
        output.emit(result["summary"])
    else:
        for line in result["lines"]:
            click.echo(line)
    unmet = result["summary"]["unmet"]
    if strict and unmet:
        fail(ConstraintsUnmet(f"{len(unmet)} constraint(s) unmet; first: {unmet[0]}"))


def cache_dir() -> Path:
    """Where calibrations are cached (the environment is read here, nowhere else)."""
    if os.environ.get("EDGEWISE_CACHE_DIR"):
        return Path(os.environ["EDGEWISE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgewise"


def _progress(quiet: bool) -> Any:
    def say(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)
    return say
