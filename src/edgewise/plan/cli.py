"""`edgewise plan`: from a workload file to a placed, sized, quantified and deployable design.

    edgewise plan WORKLOAD.yaml [--simulate] [--no-calibrate] -o DIR
    edgewise plan --interactive -o DIR        (or no WORKLOAD: asks for the required inputs)

CPU coefficients are calibrated on this machine (`edgewise.plan.costs`) and cached in
``$EDGEWISE_CACHE_DIR`` or ``$XDG_CACHE_HOME/edgewise`` (default ``~/.cache/edgewise``);
``--no-calibrate`` uses the static table instead.

Writes into DIR: ``architecture.md`` and ``architecture.html``, the figures next to them,
``pipelines/``, ``agents/`` and ``rollout.yaml``, and ``plan.json`` with the key figures.
Heavy modules (numpy work, matplotlib) are imported inside the command only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgewise.errors import ConfigError, EdgewiseError


@click.command()
@click.argument("workload", required=False,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where to write the document and artefacts "
                                 "(default: plan-<workload name>).")
@click.option("--simulate", is_flag=True,
              help="Run the real engine on synthetic data and use the measured figures.")
@click.option("--interactive", is_flag=True,
              help="Ask for the required inputs, write the workload file, then plan it.")
@click.option("--json", "as_json", is_flag=True, help="Print the key figures as one JSON object.")
@click.option("--strict", is_flag=True, help="Exit with code 3 when a constraint is unmet.")
@click.option("--no-calibrate", "no_calibrate", is_flag=True,
              help="Use the static CPU table instead of calibrating the operators on this "
                   "machine (calibration takes about a second, then is cached).")
def plan(workload: Path | None, out: Path | None, simulate: bool, interactive: bool,
         as_json: bool, strict: bool, no_calibrate: bool) -> None:
    """Plan what runs at the edge and what in the cloud, size it, and prove it."""
    from edgewise.cli import _fail

    try:
        if workload is None or interactive:
            from edgewise.plan.interactive import ask_workload

            target = (out or Path("plan-interactive"))
            target.mkdir(parents=True, exist_ok=True)
            workload = ask_workload(target / "workload.yaml")
            out = target
        result = run_plan(workload, out, simulate, progress=_progress(as_json),
                          calibrate=not no_calibrate, cache_dir=cache_dir())
    except EdgewiseError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(result["summary"], default=str))
    else:
        for line in result["lines"]:
            click.echo(line)
    if strict and result["summary"]["unmet"]:
        sys.exit(3)


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


def run_plan(workload_path: Path, out: Path | None, simulate: bool,
             progress: Any = None, calibrate: bool = True,
             cache_dir: Path | None = None) -> dict[str, Any]:
    """Load, plan, optionally simulate, and write everything. Returns a summary.

    ``calibrate``: calibrate the CPU model on this machine (cached in ``cache_dir`` if given);
    otherwise the static table is used."""
    from edgewise.plan import artefacts, document, figures
    from edgewise.plan.costs import Calibrator, Costs
    from edgewise.plan.model import build_plan
    from edgewise.plan.workload import load_workload

    say = progress or (lambda _m: None)
    wl = load_workload(workload_path)
    out = out or Path(f"plan-{wl.name}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot create the output directory: {exc}") from None
    say(f"planning {wl.name}: {len(wl.sites)} site type(s), {len(wl.stages)} stage(s)")
    costs = Calibrator(cache_dir, say) if calibrate else Costs()
    the_plan = build_plan(wl, costs)
    measured: dict[str, Any] = {}
    if simulate:
        from edgewise.plan.simulate import simulate as run_sim

        the_plan, measured = run_sim(the_plan, say, costs)
    say("drawing figures")
    figs = figures.draw_all(the_plan, out)
    blocks = document.build(the_plan)
    md = document.to_markdown(blocks)
    (out / "architecture.md").write_text(md, encoding="utf-8")
    (out / "architecture.html").write_text(
        document.to_html(blocks, f"Architecture: {wl.name}"), encoding="utf-8")
    written = artefacts.write_artefacts(the_plan, out)
    words = document.word_count(md)
    summary = summary_of(the_plan, measured, words)
    (out / "plan.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    lines = [f"wrote {out / 'architecture.md'} ({words:,} words) and architecture.html",
             f"figures: {', '.join(p.name for p in figs)}",
             f"artefacts: {', '.join(str(p.relative_to(out)) for p in written)}"]
    for sp in the_plan.sites:
        placed = ", ".join(f"{st.id}: {sp.where(st.id)}" for st in sp.stages)
        f = sp.final
        lines.append(f"{sp.name}: {placed}; uplink {f.edge_wire_per_s * 8 / 1e3:,.1f} kbit/s "
                     f"(naive {f.naive_per_s * 8 / 1e3:,.0f} kbit/s); alarm p99 edge "
                     f"{f.latency.edge_p99 * 1000:,.2f} ms / cloud "
                     f"{f.latency.cloud_p99 * 1000:,.1f} ms; node {f.sizing.option.name}")
    for x in the_plan.unmet:
        lines.append(f"UNMET: {x}")
    return {"plan": the_plan, "summary": summary, "lines": lines, "out": out}


def summary_of(the_plan: Any, measured: dict[str, Any], words: int) -> dict[str, Any]:
    sites = {}
    for sp in the_plan.sites:
        e, f = sp.estimate, sp.final
        site: dict[str, Any] = {
            "placement": {st.id: sp.where(st.id) for st in sp.stages},
            "naive_bytes_per_s": f.naive_per_s,
            "estimate": {"uplink_bytes_per_s": e.edge_wire_per_s,
                         "records_per_s": sum(e.calibration.stream_records.values()),
                         "stage_cpu_us_per_s": sum(
                             e.calibration.stage_cpu_us[st.id] for st in sp.stages
                             if sp.where(st.id) != "cloud"),
                         "cores": e.sizing.cores_needed,
                         "stage_cpu_us": {st.id: e.calibration.stage_cpu_us[st.id]
                                          for st in sp.stages if sp.where(st.id) != "cloud"},
                         "cores_parts": dict(e.sizing.parts),
                         "method": e.calibration.method},
            "alarm_latency_ms": {"edge_p50": f.latency.edge_p50 * 1e3,
                                 "edge_p99": f.latency.edge_p99 * 1e3,
                                 "cloud_p50": f.latency.cloud_p50 * 1e3,
                                 "cloud_p99": f.latency.cloud_p99 * 1e3},
            "outbox_bytes": f.outbox_bytes,
            "node": f.sizing.option.name,
        }
        if sp.measured is not None:
            m = sp.measured
            site["measured"] = {"uplink_bytes_per_s": m.edge_wire_per_s,
                                "records_per_s": sum(m.calibration.stream_records.values()),
                                "stage_cpu_us_per_s": sum(
                                    m.calibration.stage_cpu_us[st.id] for st in sp.stages
                                    if sp.where(st.id) != "cloud"),
                                "cores": m.sizing.cores_needed,
                                "stage_cpu_us": {st.id: m.calibration.stage_cpu_us[st.id]
                                                 for st in sp.stages
                                                 if sp.where(st.id) != "cloud"},
                                "cores_parts": dict(m.sizing.parts),
                                "method": m.calibration.method}
            ms_ = measured.get(sp.name)
            if ms_ is not None:
                site["simulation"] = {
                    "sample_fraction": ms_.sample_fraction,
                    "throughput_readings": ms_.throughput_readings,
                    "event_seconds": ms_.throughput_s,
                    "realtime_readings": ms_.realtime_readings,
                    "latency_samples": ms_.latency_source,
                    "cpu_event_seconds": ms_.cpu_event_s,
                    "cpu_segment_seconds": ms_.cpu_segment_s,
                    "cpu_sample_fraction": ms_.cpu_fraction,
                    "stage_cpu_spread": ms_.stage_cpu_spread,
                }
        sites[sp.name] = site
    return {"workload": the_plan.workload.name, "simulated": the_plan.simulated,
            "cpu_model": "calibrated" if any(
                c.source == "calibrated" for sp in the_plan.sites
                for c in sp.stage_costs.values()) else "static",
            "words": words, "unmet": the_plan.unmet,
            "hard_constraints": {c.name: c.met for c in the_plan.hard}, "sites": sites}
