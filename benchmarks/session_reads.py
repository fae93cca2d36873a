"""A session's store reads: the store's own readers against the SQLAlchemy path (issue 11).

Every session upgrade reads its node (`Store.get_node`), every hello the node's quarantine
(`Store.quarantines`) and its marks and desired version (`Store.session_start`): in a reconnect
storm, thousands of each. The store serves them through reader connections of its own
(`edgewise.cloud.store.readers`); the baseline, in the same run, is the same statements through
SQLAlchemy's async engine as the store read them before (`Store._tx`). Each figure is the CPU of
this process (all threads) per read, one read at a time and 100 at once. The nodes have no
streams yet (`session_start` reads the stream rows and the desired version).

Run: python benchmarks/session_reads.py [--nodes 2000] [--reads 500] [--db postgresql://.../EMPTY]
The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json, print_table
from fleet_health_scale import fill

from edgewise.cloud.store import Store, database_url
from edgewise.cloud.store.models import DesiredStateRow, Node, NodeHealthRow, StreamRow


async def _sqlalchemy_get_node(store: Store, node_id: str) -> Any:
    async with store._tx(write=False) as conn:
        return (await conn.execute(select(Node).where(Node.id == node_id))).first()


async def _sqlalchemy_quarantine(store: Store, node_id: str) -> Any:
    async with store._tx(write=False) as conn:
        return (await conn.execute(select(NodeHealthRow.node_id, NodeHealthRow.quarantine).where(
            NodeHealthRow.node_id.in_([node_id]),
            NodeHealthRow.quarantine.is_not(None)))).all()


async def _sqlalchemy_start(store: Store, node_id: str) -> Any:
    async with store._tx(write=False) as conn:
        streams = (await conn.execute(select(StreamRow.stream, StreamRow.contiguous).where(
            StreamRow.node_id == node_id))).all()
        version = (await conn.execute(select(func.max(DesiredStateRow.version)).where(
            DesiredStateRow.node_id == node_id))).scalar()
    return streams, version


async def _cpu_per_read(fn: Callable[[str], Awaitable[Any]], ids: list[str],
                        together: int) -> float:
    c0 = time.process_time()
    if together == 1:
        for node_id in ids:
            await fn(node_id)
    else:
        for i in range(0, len(ids), together):
            await asyncio.gather(*(fn(n) for n in ids[i:i + together]))
    return 1e6 * (time.process_time() - c0) / len(ids)


async def run(nodes: int, reads: int, db: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        async with Store(database_url(db, d)) as store:
            await fill(store, nodes, 1)
            ids = [f"node-{k:06d}" for k in range(nodes)]
            pairs: dict[str, tuple[Callable[[str], Awaitable[Any]],
                                   Callable[[str], Awaitable[Any]]]] = {
                "get_node": (store.get_node, lambda n: _sqlalchemy_get_node(store, n)),
                "quarantine": (lambda n: store.quarantines([n]),
                               lambda n: _sqlalchemy_quarantine(store, n)),
                "session_start": (store.session_start, lambda n: _sqlalchemy_start(store, n)),
            }
            out: dict[str, float] = {}
            for name, (ours, base) in pairs.items():
                for together in (1, 100):
                    for label, fn in (("ours", ours), ("sqlalchemy", base)):
                        await _cpu_per_read(fn, ids[:50], 1)  # warm
                        sample = [ids[(i * 7919) % nodes] for i in range(reads)]
                        key = f"{name}_{label}_{'one' if together == 1 else 'x100'}_us"
                        out[key] = round(await _cpu_per_read(fn, sample, together), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--reads", type=int, default=500)
    ap.add_argument("--db", help="an empty PostgreSQL database's URL (default: SQLite in a "
                                 "temporary folder)")
    args = ap.parse_args()
    out = asyncio.run(run(args.nodes, args.reads, args.db))
    rows = []
    for name in ("get_node", "quarantine", "session_start"):
        for together in ("one", "x100"):
            ours = out[f"{name}_ours_{together}_us"]
            base = out[f"{name}_sqlalchemy_{together}_us"]
            rows.append((f"{name}, {'one at a time' if together == 'one' else '100 at once'}",
                         f"{ours:,.0f} us", f"{base:,.0f} us through SQLAlchemy "
                                            f"({base / max(ours, 1e-9):.1f}x)"))
    print_table(f"CPU per read ({'PostgreSQL' if args.db else 'SQLite'}, {args.nodes:,} nodes, "
                f"{args.reads} reads)", rows)
    emit_json({"store": "postgresql" if args.db else "sqlite", "nodes": args.nodes, **out})


if __name__ == "__main__":
    main()
