"""Fleet scale (issue 11): a real control plane and thousands of virtual nodes on this machine.

Starts ``edgewise cloud serve`` (SQLite in its data folder, or ``--db postgresql://...``) and
``edgewise sim fleet`` (``--processes`` simulator processes), then runs enrol → steady state →
push to all (one ``PUT /v1/config`` with the fleet's selector) → kill -9 of the control plane
and restart (the reconnect storm) → steady state, and stops the simulator, which checks every
sequence number each node sent against what the control plane stored
(`edgewise.testbed.fleet.scenario` describes each phase and how each figure is measured).

Run: python benchmarks/fleet_scale.py --nodes 2000 [--db URL] [--processes 2] [--servers 2]
     [--telemetry-every 10] [--steady 30] [--profile DIR]
``--servers N`` runs ``cloud serve --processes N`` (needs ``--db postgresql://...``); the
server's CPU and memory are then those of the supervisor and its serving processes, summed.
``--profile DIR`` samples the server with py-spy (pip install py-spy; ``--profile-threads``:
every busy thread, not only the GIL holder) during the steady window
and the storm, and writes the busiest functions to DIR/profile.md (with ``--servers``, the
serving processes together).
Above 20,000 nodes each simulator process connects from its own loopback address (127.0.0.2,
127.0.0.3, ...: `sim fleet --source-address`): one address has only about 28,000 source ports
toward the control plane's one port (Linux's ``ip_local_port_range``, 32768-60999 here), and a
30,000-node run from one address stopped at 28,231 sessions.
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json, print_table

from edgewise.testbed.fleet.profile import markdown
from edgewise.testbed.fleet.scenario import ScenarioConfig, ScenarioError, run_scenario

SOURCE_PORTS = 20_000  # nodes above this: one loopback source address per simulator process

TARGETS = {  # issue 11, acceptance at 10,000 nodes on one process
    "server_cpu_us_per_node_s": "<= 50",
    "server_kb_per_node": "<= 100",
    "ack_p99_ms": "<= 1000",
    "push_p99_s": "<= 5",
    "storm_recovery_s": "<= 60",
    "records_lost": "0",
    "records_duplicated": "0",
}


def _terminated(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--db", default=None, help="postgresql://... (default: SQLite)")
    ap.add_argument("--processes", type=int, default=1, help="simulator processes")
    ap.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                    help="a cloud serve --limit (repeatable), e.g. max_unauthenticated=1024")
    ap.add_argument("--servers", type=int, default=1,
                    help="control-plane processes (cloud serve --processes; needs --db)")
    ap.add_argument("--telemetry-every", type=float, default=10.0)
    ap.add_argument("--steady", type=float, default=30.0, help="s of the steady window")
    ap.add_argument("--after", type=float, default=10.0, help="s of steady state at the end")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="s from the last node's first session to the steady window (the "
                         "enrolment's backlog is sent then)")
    ap.add_argument("--ramp", type=float, default=0.0, help="s over which nodes start")
    ap.add_argument("--phase-timeout", type=float, default=600.0)
    ap.add_argument("--fetch-only", action="store_true",
                    help="nodes ignore inline desired states and fetch (as the agent does)")
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--profile-threads", action="store_true",
                    help="sample every busy thread, not only the GIL holder (shows OpenSSL)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgewise-fleet-scale-"))
    sources = tuple(a for i in range(args.processes) for a in (
        "--source-address", f"127.0.0.{2 + i}")) if args.nodes > SOURCE_PORTS else ()
    cfg = ScenarioConfig(args.nodes, work, args.processes, args.db, args.telemetry_every,
                         args.steady, args.after, args.ramp, args.phase_timeout,
                         profile=args.profile, profile_gil=not args.profile_threads,
                         servers=args.servers, settle_s=args.settle,
                         server_args=tuple(a for v in args.limit for a in ("--limit", v)),
                         sim_args=(*(("--fetch-only",) if args.fetch_only else ()),
                                   *sources))
    if args.servers > 1 and not args.db:
        ap.error("--servers needs --db postgresql://...")
    print(f"fleet scale: {args.nodes:,} nodes, {args.processes} simulator process(es), "
          f"{args.servers} control-plane process(es), "
          f"{'PostgreSQL' if args.db else 'SQLite'}; work folder {work}", flush=True)
    # SIGTERM ends the run as Ctrl-C does: asyncio.run cancels the scenario, whose finally
    # blocks stop the control plane and the simulator (the default action left both running)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        res = asyncio.run(run_scenario(cfg))
    except ScenarioError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for phase, what in res.phases:
        print(f"  {phase}: {what}")
    f = {k: v for k, v in res.figures.items() if k != "sim"}
    f["nodes"] = args.nodes
    f["store"] = "postgresql" if args.db else "sqlite"
    f["sim_processes"] = args.processes
    f["server_processes"] = args.servers
    f["limits"] = args.limit
    f["fetch_only"] = args.fetch_only
    f["settle_s"] = args.settle
    rows = [(k, str(v), TARGETS.get(k, "")) for k, v in f.items()]
    print_table("fleet scale", rows)
    if args.profile is not None:
        parts = [markdown(args.profile / name, title)
                 for name, title in (("steady.txt", "server, steady state"),
                                     ("storm.txt", "server, reconnect storm"))
                 if (args.profile / name).exists()]
        (args.profile / "profile.md").write_text("\n".join(parts))
        print(f"profile: {args.profile / 'profile.md'}")
    emit_json(f)


if __name__ == "__main__":
    main()
