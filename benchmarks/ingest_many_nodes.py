"""Ingest with many nodes each sending rarely: group commits per second and CPU per batch, for
three shapes of the store's group commit in the same run: the stream-mark upsert as one
statement per stream (the first path), as one multi-row VALUES upsert per 1,000 streams with
the chunks through the ORM (the second, compiled anew for every commit: each bound value
visited by SQLAlchemy's compiler), and `Store.commit_ingest` now (Core tables, the marks as one
cached statement run with executemany). The first two are rebuilt here as baselines.

    .venv/bin/python benchmarks/ingest_many_nodes.py [--nodes 2000] [--rounds 5] [--db URL]

Each round is one group commit of one small chunk from each of ``--nodes`` nodes (the shape
issue 11 measured at 5,000 nodes: ~467 batches per commit). CPU is this process's (the
event loop and the database driver's thread; SQLite runs inside it, PostgreSQL does not).
Prints both figures for each path and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import case, func

from edgewise.cloud.store import ChunkWrite, GapWrite, IngestResult, MarkWrite, Store
from edgewise.cloud.store.models import ChunkRow, StreamRow


class PerStreamStore(Store):
    """The old `commit_ingest`: chunks in one batch insert, then one upsert per stream."""

    async def commit_ingest(self, chunks: Sequence[ChunkWrite], gaps: Sequence[GapWrite] = (),
                            marks: Sequence[MarkWrite] = ()) -> IngestResult:
        inserted: set[tuple[str, str, int]] = set()
        stored: dict[tuple[str, str], int] = {}
        by_key = {(c.node_id, c.stream, c.seq_first): c for c in chunks}
        async with self._tx() as conn:
            rows = await conn.execute(
                self._insert(ChunkRow).on_conflict_do_nothing().returning(
                    ChunkRow.node_id, ChunkRow.stream, ChunkRow.seq_first),
                [vars(c) for c in chunks])
            for r in rows:
                key = (r.node_id, r.stream, r.seq_first)
                inserted.add(key)
                stored[key[:2]] = stored.get(key[:2], 0) + by_key[key].records
            for m in marks:
                key = (m.node_id, m.stream)
                ins = self._insert(StreamRow).values(
                    node_id=key[0], stream=key[1], contiguous=m.contiguous,
                    stored_records=stored.get(key, 0), gap_records=0,
                    last_received=m.last_received)
                ex = ins.excluded
                await conn.execute(ins.on_conflict_do_update(
                    index_elements=[StreamRow.node_id, StreamRow.stream],
                    set_={"contiguous": case((ex.contiguous > StreamRow.contiguous,
                                              ex.contiguous), else_=StreamRow.contiguous),
                          "stored_records": StreamRow.stored_records + ex.stored_records,
                          "gap_records": StreamRow.gap_records + ex.gap_records,
                          "last_received": func.coalesce(ex.last_received,
                                                         StreamRow.last_received)}))
        return IngestResult(frozenset(inserted), frozenset(), sum(stored.values()))


class MultiRowStore(Store):
    """The second `commit_ingest`: chunks through the ORM class, marks as one multi-row VALUES
    upsert per 1,000 streams (a new statement to compile for every commit)."""

    async def commit_ingest(self, chunks: Sequence[ChunkWrite], gaps: Sequence[GapWrite] = (),
                            marks: Sequence[MarkWrite] = ()) -> IngestResult:
        inserted: set[tuple[str, str, int]] = set()
        stored: dict[tuple[str, str], int] = {}
        by_key = {(c.node_id, c.stream, c.seq_first): c for c in chunks}
        async with self._tx() as conn:
            rows = await conn.execute(
                self._insert(ChunkRow).on_conflict_do_nothing().returning(
                    ChunkRow.node_id, ChunkRow.stream, ChunkRow.seq_first),
                [vars(c) for c in chunks])
            for r in rows:
                key = (r.node_id, r.stream, r.seq_first)
                inserted.add(key)
                stored[key[:2]] = stored.get(key[:2], 0) + by_key[key].records
            rows_ = [{"node_id": m.node_id, "stream": m.stream, "contiguous": m.contiguous,
                      "stored_records": stored.get((m.node_id, m.stream), 0),
                      "gap_records": 0, "last_received": m.last_received} for m in marks]
            for i in range(0, len(rows_), 1000):
                ins = self._insert(StreamRow).values(rows_[i:i + 1000])
                ex = ins.excluded
                await conn.execute(ins.on_conflict_do_update(
                    index_elements=[StreamRow.node_id, StreamRow.stream],
                    set_={"contiguous": case((ex.contiguous > StreamRow.contiguous,
                                              ex.contiguous), else_=StreamRow.contiguous),
                          "stored_records": StreamRow.stored_records + ex.stored_records,
                          "gap_records": StreamRow.gap_records + ex.gap_records,
                          "last_received": func.coalesce(ex.last_received,
                                                         StreamRow.last_received)}))
        return IngestResult(frozenset(inserted), frozenset(), sum(stored.values()))


async def measure(store: Store, nodes: int, rounds: int) -> tuple[float, float]:
    """(batches per second, CPU µs per batch) over ``rounds`` group commits."""
    now = datetime.now(UTC)
    payload = b"\x28\xb5\x2f\xfd" + b"x" * 200
    elapsed = cpu = 0.0
    for r in range(rounds + 1):  # round 0 creates the stream rows: not timed
        chunks = [ChunkWrite(f"node-{i:06d}", "aggregates", r * 10, 10, 10, False, payload,
                             now) for i in range(nodes)]
        marks = [MarkWrite(f"node-{i:06d}", "aggregates", (r + 1) * 10, now)
                 for i in range(nodes)]
        started, cpu_started = time.perf_counter(), time.process_time()
        await store.commit_ingest(chunks, [], marks)
        if r:
            elapsed += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
    return nodes * rounds / elapsed, cpu / (nodes * rounds) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--db", default=None, help="a PostgreSQL URL (default: SQLite in a temp dir)")
    args = ap.parse_args()
    out: dict[str, tuple[float, float]] = {}
    for name, cls in (("per_stream", PerStreamStore), ("multi_row", MultiRowStore),
                      ("executemany", Store)):
        with tempfile.TemporaryDirectory() as tmp:
            store = cls.for_data_dir(tmp, args.db)
            async with store:
                if args.db:  # a shared database: start from empty tables
                    async with store._tx() as conn:
                        await conn.exec_driver_sql("DELETE FROM chunks")
                        await conn.exec_driver_sql("DELETE FROM streams")
                out[name] = await measure(store, args.nodes, args.rounds)
        rate, cpu = out[name]
        print(f"{name:>11}: {rate:>9,.0f} batches/s, {cpu:6.1f} µs CPU per batch  ({args.nodes} "
              f"nodes, one batch each per group commit, {args.rounds} commits)")
    figures: dict[str, object] = {"nodes": args.nodes,
                                  "db": "postgresql" if args.db else "sqlite"}
    for name, (rate, cpu) in out.items():
        figures[f"{name}_batches_per_s"] = round(rate)
        figures[f"{name}_cpu_us_per_batch"] = round(cpu, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
