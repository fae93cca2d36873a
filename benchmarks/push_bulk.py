"""A selector push's store work: the desired versions of N nodes written one node at a time
(one transaction each through `Store.update_desired_state`, what `desired.assign` did, one at
a time on SQLite, 8 at once on PostgreSQL) against one bulk operation
(`Store.update_desired_states`, what it does now), in the same run.

    .venv/bin/python benchmarks/push_bulk.py [--nodes 2000] [--db URL]

Prints nodes/s for both and, last, one JSON line. The store call alone: no HTTP, no pokes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime

from sqlalchemy import insert

from edgewise.cloud.desired import DesiredChange
from edgewise.cloud.store import Store
from edgewise.cloud.store.models import Node


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--db", default=None, help="an empty PostgreSQL database URL")
    args = ap.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        async with Store.for_data_dir(tmp, args.db) as store:
            async with store._tx() as conn:
                await conn.execute(insert(Node), [
                    {"id": f"node-{i:06d}", "labels": {"site": "a"}, "key_fingerprint": f"{i:064x}",
                     "cert_serial": f"{i:x}", "cert_expiry": now, "status": "online",
                     "created": now, "last_seen": None} for i in range(args.nodes)])
            ids = [f"node-{i:06d}" for i in range(args.nodes)]
            change = DesiredChange(config={"rate": 5})
            gate = asyncio.Semaphore(8 if store.dialect == "postgresql" else 1)

            async def one(node_id: str) -> None:
                async with gate:
                    await store.update_desired_state(node_id, change.apply, labels={"site": "a"},
                                                     actor="bench", now=now)

            started = time.perf_counter()
            await asyncio.gather(*(one(n) for n in ids))
            per_node = args.nodes / (time.perf_counter() - started)
            started = time.perf_counter()
            await store.update_desired_states([(n, {"site": "a"}) for n in ids], change.apply,
                                              actor="bench", now=now)
            bulk = args.nodes / (time.perf_counter() - started)
            assert await store.desired_version(ids[-1]) == 2
            if args.db:
                async with store._tx() as conn:
                    for table in ("audit_log", "desired_states", "nodes"):
                        await conn.exec_driver_sql(f"DELETE FROM {table}")
    print(f"per node: {per_node:>9,.0f} nodes/s  ({args.nodes} nodes, {store.dialect})")
    print(f"    bulk: {bulk:>9,.0f} nodes/s")
    print(json.dumps({"nodes": args.nodes, "db": store.dialect,
                      "per_node_nodes_per_s": round(per_node),
                      "bulk_nodes_per_s": round(bulk), "speedup": round(bulk / per_node, 1)}))


if __name__ == "__main__":
    asyncio.run(main())
