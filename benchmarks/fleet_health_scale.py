"""Fleet health at scale (issue 12): how long the control plane takes to compute the fleet
gauges (`FleetGauges.refresh`, every 30 s) and one drift page for N nodes, beside paging the
same nodes with `list_nodes` alone, in one run.

N nodes are written straight into a SQLite store (no sessions): each with a desired state
holding a pipeline of PIPELINE_KB of YAML, a reported state, and a health map like an agent's;
a fleet layer and a group layer.

Run: python benchmarks/fleet_health_scale.py [--nodes 10000] [--pipeline-kb 8]
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json, print_table

from edgewise.cloud.fleet_metrics import FleetGauges
from edgewise.cloud.fleet_state import drift
from edgewise.cloud.store import Store
from edgewise.cloud.store.models import DesiredStateRow, Node, NodeHealthRow, ReportedStateRow
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState

HEALTH = {"outbox": {"9": [0, 0.0], "5": [120, 4.5], "1": [3000, 40.0]},
          "pipelines": {"line": ["running", None]}, "cpu": 3.5, "mem": 80 * 2**20,
          "disk_free": 20 * 2**30, "disk_total": 32 * 2**30, "release": "1.4.0",
          "cert_expires": 1.9e9, "clock_offset_s": 0.04}


async def fill(store: Store, n: int, pipeline_kb: int) -> None:
    now = datetime.now(UTC)
    yaml = "# " + "x" * (pipeline_kb * 1024) + "\n"
    for i in range(0, n, 1000):
        ids = [f"node-{k:06d}" for k in range(i, min(i + 1000, n))]
        async with store._tx() as conn:
            await conn.execute(insert(Node), [{
                "id": nid, "labels": {"site": f"s{k % 50}"}, "key_fingerprint": f"{k:064x}",
                "cert_serial": f"{k:x}", "cert_expiry": now + timedelta(hours=20),
                "status": "online", "created": now, "last_seen": now, "revoked": False}
                for k, nid in enumerate(ids, i)])
            await conn.execute(insert(DesiredStateRow), [{
                "node_id": nid, "version": 3, "created": now, "expires_at": None,
                "body": DesiredState(3, {"line": yaml}, {"rate": 10}, {}, None,
                                     "1.4.0").to_wire()} for nid in ids])
            await conn.execute(insert(ReportedStateRow), [{
                "node_id": nid, "updated": now,
                "body": {**ReportedState(3, "running desired v3").to_wire(),
                         "node_setpoints": LwwMap().to_wire()}} for nid in ids])
            await conn.execute(insert(NodeHealthRow), [
                {"node_id": nid, "body": HEALTH, "received": now} for nid in ids])
    await store.write_layer("fleet", set_={"rate": 10}, actor="bench")
    await store.write_layer("group", "s1", set_={"mode": "fast"}, selector={"site": "s1"},
                            actor="bench")


async def run(n: int, pipeline_kb: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        async with Store.for_data_dir(Path(d)) as store:
            await fill(store, n, pipeline_kb)
            t0 = time.perf_counter()
            after = None
            while True:
                page = await store.list_nodes(limit=1000, after=after)
                if len(page) < 1000:
                    break
                after = page[-1].id
            list_s = time.perf_counter() - t0
            gauges = FleetGauges(store)
            c0, t0 = time.process_time(), time.perf_counter()
            summary = await gauges.refresh()
            refresh_s, refresh_cpu = time.perf_counter() - t0, time.process_time() - c0
            assert summary.nodes["online"] == n, summary.nodes
            layers = [la for la in await store.get_layers() if la.kind != "node"]
            t0 = time.perf_counter()
            rows = await store.fleet_page(limit=1000)
            drifting = sum(1 for r in rows if drift(r, layers, datetime.now(UTC)))
            drift_page_s = time.perf_counter() - t0
    return {"nodes": n, "pipeline_kb": pipeline_kb, "list_nodes_s": round(list_s, 3),
            "gauges_refresh_s": round(refresh_s, 3), "gauges_refresh_cpu_s": round(refresh_cpu, 3),
            "drift_page_1000_s": round(drift_page_s, 3), "drift_page_drifting": drifting}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--pipeline-kb", type=int, default=8)
    args = ap.parse_args()
    f = asyncio.run(run(args.nodes, args.pipeline_kb))
    print_table(f"fleet health, {args.nodes:,} nodes (SQLite)", [
        ("fleet gauges refresh", f"{f['gauges_refresh_s']} s",
         f"{f['list_nodes_s']} s to page the nodes alone (list_nodes); every 30 s"),
        ("  its CPU in this process", f"{f['gauges_refresh_cpu_s']} s", ""),
        ("one drift page (1,000 nodes, whole desired states)", f"{f['drift_page_1000_s']} s",
         f"{f['drift_page_drifting']} of them drifting (the group layer not applied)"),
    ])
    emit_json(f)


if __name__ == "__main__":
    main()
