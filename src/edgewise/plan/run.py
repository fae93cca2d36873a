"""One planning run: load a workload, plan, optionally simulate, write every artefact.

`run_plan` is what ``edgewise plan`` calls (its flags: `edgewise.cli.plan`); it returns the plan,
a JSON-able summary (also written as ``plan.json``) and the lines the command prints.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgewise.errors import ConfigError


def run_plan(workload_path: Path, out: Path | None, simulate: bool,
             progress: Any = None, calibrate: bool = True,
             cache_dir: Path | None = None, rounds: int | None = None) -> dict[str, Any]:
    """Load, plan, optionally simulate, and write everything. Returns a summary.

    ``calibrate``: calibrate the CPU model on this machine (cached in ``cache_dir`` if given);
    otherwise the static table is used. ``rounds``: realtime runs per site with ``simulate``
    (None: `edgewise.plan.simulate.REALTIME_ROUNDS`)."""
    from edgewise.plan import artefacts, blocks, document, figures
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
    if wl.code_dir is not None and str(wl.code_dir) not in sys.path:
        sys.path.insert(0, str(wl.code_dir))  # user functions: calibrated beside, simulated
    costs = Calibrator(cache_dir, say) if calibrate else Costs()
    the_plan = build_plan(wl, costs)
    measured: dict[str, Any] = {}
    if simulate:
        from edgewise.plan.simulate import REALTIME_ROUNDS
        from edgewise.plan.simulate import simulate as run_sim

        the_plan, measured = run_sim(the_plan, say, costs, rounds or REALTIME_ROUNDS)
    say("drawing figures")
    figs = figures.draw_all(the_plan, out)
    doc, words, warnings = document.build_within(the_plan)
    md = blocks.to_markdown(doc)
    (out / "architecture.md").write_text(md, encoding="utf-8")
    (out / "architecture.html").write_text(
        blocks.to_html(doc, f"Architecture: {wl.name}"), encoding="utf-8")
    written = artefacts.write_artefacts(the_plan, out)
    summary = summary_of(the_plan, measured, words)
    summary["warnings"] = warnings
    (out / "plan.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    lines = [f"wrote {out / 'architecture.md'} ({words:,} words) and architecture.html",
             f"figures: {', '.join(p.name for p in figs)}",
             f"artefacts: {', '.join(str(p.relative_to(out)) for p in written)}"]
    for sp in the_plan.sites:
        placed = ", ".join(f"{st.id}: {sp.where(st.id)}" for st in sp.stages)
        f = sp.final
        naive = f"naive {f.naive_per_s * 8 / 1e3:,.0f} kbit/s" + (
            "" if f.naive_per_s * 8 <= sp.site.link.uplink else
            f", more than the {sp.site.link.uplink / 1e3:,.0f} kbit/s link carries")
        lines.append(f"{sp.name}: {placed}; uplink {f.edge_wire_per_s * 8 / 1e3:,.1f} kbit/s "
                     f"({naive}); alarm p99 edge "
                     f"{f.latency.edge_p99 * 1000:,.2f} ms / cloud "
                     f"{f.latency.cloud_p99 * 1000:,.1f} ms; node {f.sizing.option.name}")
    for x in warnings:
        lines.append(f"warning: {x}")
    for x in the_plan.unmet:
        lines.append(f"UNMET: {x}")
    for fd in the_plan.findings:
        lines.append(f"FINDING: {fd.message}")
    return {"plan": the_plan, "summary": summary, "lines": lines, "out": out}


def summary_of(the_plan: Any, measured: dict[str, Any], words: int) -> dict[str, Any]:
    from edgewise.plan.site_figures import snapshot_us_per_commit

    sites = {}
    for sp in the_plan.sites:
        e, f = sp.estimate, sp.final
        site: dict[str, Any] = {
            "placement": {st.id: sp.where(st.id) for st in sp.stages},
            "naive_bytes_per_s": f.naive_per_s,
            # whether the link could carry the naive baseline at all (a ratio against a
            # baseline the link cannot carry says so)
            "naive_fits_uplink": f.naive_per_s * 8 <= sp.site.link.uplink,
            "uplink_bits_per_s": sp.site.link.uplink,
            "estimate": {"uplink_bytes_per_s": e.edge_wire_per_s,
                         "records_per_s": sum(e.calibration.stream_records.values()),
                         "stage_cpu_us_per_s": sum(
                             e.calibration.stage_cpu_us[st.id] for st in sp.stages
                             if sp.where(st.id) != "cloud"),
                         "cores": e.sizing.cores_needed,
                         "stage_cpu_us": {st.id: e.calibration.stage_cpu_us[st.id]
                                          for st in sp.stages if sp.where(st.id) != "cloud"},
                         "cores_parts": dict(e.sizing.parts),
                         # the commits part's two factors (`node_cpu_model`)
                         "commits_per_s": (sp.engine_site or {}).get("commits_per_s"),
                         # that run's cores before and after --simulate's realtime runs,
                         # and per realtime run the mean of its two neighbours
                         "engine_site_halves": (sp.engine_site or {}).get("halves"),
                         "engine_site_rounds": (sp.engine_site or {}).get("rounds"),
                         "snapshot_us_per_commit": snapshot_us_per_commit(sp),
                         "stage_records_per_s": {st.id: e.calibration.stage_out[st.id]
                                                 for st in sp.stages
                                                 if sp.where(st.id) != "cloud"},
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
                                "stage_records_per_s": {
                                    st.id: m.calibration.stage_out[st.id] for st in sp.stages
                                    if sp.where(st.id) != "cloud"},
                                "method": m.calibration.method}
            site["stages"] = _stage_comparison(site["estimate"], site["measured"])
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
                    # node cores of every realtime run; the measurement is their median
                    "cores_rounds": ms_.cores_rounds,
                }
        sites[sp.name] = site
    return {"workload": the_plan.workload.name, "simulated": the_plan.simulated,
            "cpu_model": "calibrated" if any(
                c.source == "calibrated" for sp in the_plan.sites
                for c in sp.stage_costs.values()) else "static",
            "words": words, "unmet": the_plan.unmet,
            "findings": [asdict(fd) for fd in the_plan.findings],
            "hard_constraints": {c.name: c.met for c in the_plan.hard}, "sites": sites}


def _stage_comparison(est: dict[str, Any], meas: dict[str, Any]) -> dict[str, Any]:
    """Per edge stage: estimated and measured records/s and CPU, and their ratios (measured /
    estimated; None where the estimate is 0)."""
    out = {}
    for sid, e_rec in est["stage_records_per_s"].items():
        m_rec = meas["stage_records_per_s"].get(sid, 0.0)
        e_cpu = est["stage_cpu_us"].get(sid, 0.0)
        m_cpu = meas["stage_cpu_us"].get(sid, 0.0)
        out[sid] = {"records_per_s": [e_rec, m_rec],
                    "records_ratio": m_rec / e_rec if e_rec else None,
                    "cpu_us_per_s": [e_cpu, m_cpu],
                    "cpu_ratio": m_cpu / e_cpu if e_cpu else None}
    return out
