"""One cloud pipeline running: the real engine over ingested streams, and its shipper.

Exactly once, in two steps that are each atomic and idempotent:

1. The engine (`edgewise.pipeline.engine.Engine`, the same one the nodes run) group-commits
   the pipeline's output records, its operators' state and its sources' positions (per node,
   the sequence number after the last chunk consumed) in ONE transaction of the pipeline's own
   outbox (``DATA/cloud-pipelines/<name>/outbox.db``). After a kill -9 it resumes from that
   commit: every chunk consumed before it has its effects in the outbox, none after it has.
2. The shipper moves the outbox's chunks into the store as the streams of the pseudo-node
   ``cloud:<name>`` (`spec.results_node`) through ``ship`` (in the control plane: the app's
   group commit, so data out forwards them) and only then deletes them from the outbox. A
   chunk shipped again after a crash has the same (node, stream, first seq) and the store
   skips it (its primary key), so a result is stored once.

The outbox is kept when the pipeline is deleted, so a pipeline set again under the same name
continues its sequence numbers instead of reusing ones the store holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgewise.cloud.pipelines.source import CloudStreamSource
from edgewise.cloud.pipelines.spec import results_node
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.outbox import Outbox, outbox_file
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.spec import PipelineSpec

log = logging.getLogger(__name__)

Ship = Callable[[Sequence[ChunkWrite], Sequence[MarkWrite]], Awaitable[None]]
"""Store chunks and move marks durably (returns after the commit; raises if it failed)."""

SHIP_BYTES = 4 * 1024 * 1024  # payload bytes per shipment, at most
SHIP_IDLE = 0.1  # s between looks at an empty outbox


def pipeline_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "cloud-pipelines" / name


class PipelineRun:
    """Runs one cloud pipeline until `stop` (or an error, which `run` raises)."""

    def __init__(self, spec: PipelineSpec, data_dir: Path, store: Store, ship: Ship) -> None:
        self.spec = spec
        self.dir = pipeline_dir(data_dir, spec.name)
        self.store = store
        self.ship_to = ship
        self.node = results_node(spec.name)
        self.outbox = Outbox(outbox_file(self.dir), spec.body.outbox.max_bytes,
                             spec.body.outbox.sync)
        ctx = RunContext(spec.name, self.dir, self.dir)
        self.sources = {c.id: CloudStreamSource(c.id, c.config, ctx, store)
                        for c in spec.sources}
        self.engine = Engine(spec, self.dir, outbox=self.outbox, sources=self.sources)
        self.shipped_chunks = 0
        self.shipped_records = 0
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()
        self.engine.stop()

    def status(self) -> dict[str, Any]:
        summary = self.engine.summary()
        return {"results_node": self.node, "readings_in": summary["readings_in"],
                "late": summary["late"], "stages": summary["stages"],
                "sources": summary["sources"], "commits": summary["commits"],
                "shipped_chunks": self.shipped_chunks,
                "shipped_records": self.shipped_records}

    async def run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.outbox:
            async with asyncio.TaskGroup() as tg:
                shipper = tg.create_task(self._ship_loop())
                try:
                    await self.engine.run()
                finally:
                    self._stopping.set()
                await shipper

    async def _ship_loop(self) -> None:
        while True:
            sent = await self.ship_once()
            if not sent:
                if self._stopping.is_set():
                    return
                try:
                    await asyncio.wait_for(self._stopping.wait(), SHIP_IDLE)
                except TimeoutError:
                    pass

    async def ship_once(self) -> int:
        """Ship what the outbox holds (up to `SHIP_BYTES`); the chunks shipped."""
        chunks = await asyncio.to_thread(self.outbox.peek, SHIP_BYTES)
        if not chunks:
            return 0
        now = datetime.now(UTC)
        writes = [ChunkWrite(self.node, c.stream, c.seq_first, c.seq_count, c.records,
                             c.compacted, c.payload, now) for c in chunks]
        # a stream's chunks share a priority and `Outbox.peek` reads oldest first, so what it
        # returns of a stream follows on what was shipped before: the mark moves to its end
        ends: dict[str, int] = {}
        for c in chunks:
            ends[c.stream] = max(ends.get(c.stream, 0), c.seq_first + c.seq_count)
        marks = [MarkWrite(self.node, s, end, now) for s, end in sorted(ends.items())]
        await self.ship_to(writes, marks)
        await asyncio.to_thread(self.outbox.ack, [c.id for c in chunks])
        self.shipped_chunks += len(chunks)
        self.shipped_records += sum(c.records for c in chunks)
        return len(chunks)


def direct_ship(store: Store) -> Ship:
    """`Ship` straight into a store (outside the control plane: tests, tools)."""

    async def ship(chunks: Sequence[ChunkWrite], marks: Sequence[MarkWrite]) -> None:
        await store.commit_ingest(chunks, (), marks)

    return ship
