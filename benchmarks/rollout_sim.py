"""Rollouts over the fleet simulator (issue 12): a real control plane, N virtual nodes speaking
the real protocol and acting on releases, and one rollout per injected failure rate.

Starts ``edgewise cloud serve`` (SQLite, or ``--db postgresql://...``) and ``edgewise sim
fleet`` (``--processes``), publishes releases 2.0, 2.1 and 2.2, and rolls them out one after
the other to the whole fleet with 0%, 1% and 5% of the nodes failing them (rolled back at
their health gate): canary 1% + waves 10%,50%,100%, no bake, ``--max-failures 2%``. Then the
baseline from the same run: release 2.3 to every node at once (``config set --selector S
--release 2.3``). `edgewise.testbed.fleet.rollout_scenario` says how each figure is measured.

Run: python benchmarks/rollout_sim.py --nodes 10000 --processes 2 [--site-size 2
     --max-unavailable-per-site 1] [--quarantine 10] [--apply-seconds 1-5]
     [--heartbeat-every 15] [--report-every 10] [--db URL]
The last line printed is one JSON object with all figures (the machine's load average at the
start and the end included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json

from edgewise.testbed.fleet.rollout_scenario import RolloutScenarioConfig, run_rollouts


def table(res: dict[str, Any]) -> None:
    print(f"\n{res['nodes']:,} virtual nodes ({res['processes']} simulator processes, "
          f"{res['store']}), all connected after {res.get('all_connected_s')} s; "
          f"server RSS {res.get('server_rss_mb_connected')} MB connected, "
          f"{res.get('server_rss_mb_end')} MB at the end")
    cols = ("failing", "outcome", "seconds", "updated", "failed", "allowed",
            "touched after pause", "assigned after crossing (other waves)", "wave in flight",
            "max in flight per site", "server CPU %")
    print("  " + " | ".join(cols))
    for r in res["rollouts"]:
        outcome = r["state"] + (f" ({r['paused_by']}, {r['wave']})" if r["paused_by"] else "")
        row = (r["failure_rate"], outcome, r["seconds"], r["updated"],
               r["states"].get("failed", 0), r["failures_allowed"], r["touched_after_pause"],
               None if r["assigned_after_crossing"] is None else
               f"{r['assigned_after_crossing']} ({r['beyond_wave_in_flight']})",
               r["wave_in_flight"], r["max_in_flight_per_site"],
               r["server_cpu_pct"])
        print("  " + " | ".join("-" if v is None else str(v) for v in row))
    if "baseline" in res:
        b = res["baseline"]
        print(f"  baseline: release {b['release']} to {b['nodes']:,} nodes at once: every node "
              f"committed after {b['seconds']} s (the PUT {b['put_s']} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--processes", type=int, default=2, help="simulator processes")
    ap.add_argument("--db", default=None, help="postgresql://... (default: SQLite)")
    ap.add_argument("--rates", default="2.0=0,2.1=0.01,2.2=0.05",
                    help="VERSION=RATE,... one rollout each, in this order")
    ap.add_argument("--site-size", type=int, default=0, help="nodes per site (0: no sites)")
    ap.add_argument("--max-unavailable-per-site", type=int, default=None)
    ap.add_argument("--canary", default="1%")
    ap.add_argument("--waves", default="10%,50%,100%")
    ap.add_argument("--max-failures", default="2%")
    ap.add_argument("--apply-seconds", default="1-5")
    ap.add_argument("--heartbeat-every", type=float, default=None)
    ap.add_argument("--report-every", type=float, default=None)
    ap.add_argument("--quarantine", type=int, default=0)
    ap.add_argument("--ramp", type=float, default=0.0, help="s over which nodes start")
    ap.add_argument("--phase-timeout", type=float, default=1800.0)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgewise-rollout-sim-"))
    rates = tuple(tuple(x.split("=", 1)) for x in args.rates.split(","))
    cfg = RolloutScenarioConfig(
        args.nodes, work, rates=rates, processes=args.processes,  # type: ignore[arg-type]
        db=args.db, site_size=args.site_size,
        canary=args.canary, waves=args.waves, max_failures=args.max_failures,
        max_unavailable_per_site=args.max_unavailable_per_site,
        apply_seconds=args.apply_seconds, heartbeat_every=args.heartbeat_every,
        report_every=args.report_every, quarantine=args.quarantine, ramp=args.ramp,
        phase_timeout=args.phase_timeout, baseline=None if args.no_baseline else "2.3")
    load0 = os.getloadavg()
    res = asyncio.run(run_rollouts(cfg))
    res["loadavg_start"] = [round(x, 1) for x in load0]
    res["loadavg_end"] = [round(x, 1) for x in os.getloadavg()]
    res["workdir"] = str(work)
    for r in res["rollouts"]:
        r["failed_nodes"] = len(r["failed_nodes"])  # the count; the indices are in the test
    table(res)
    emit_json(res)


if __name__ == "__main__":
    main()
