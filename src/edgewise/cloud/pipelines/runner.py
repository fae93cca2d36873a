"""One cloud pipeline running: the real engine over ingested streams, and its shipper.

Exactly once, in two steps that are each atomic and idempotent:

1. The engine (`edgewise.pipeline.engine.Engine`, the same one the nodes run) group-commits
   the pipeline's output records, its operators' state and its sources' positions (per node,
   the sequence number after the last chunk consumed) in ONE transaction of the pipeline's own
   outbox (``DATA/cloud-pipelines/<name>/outbox.db``). After a kill -9 it resumes from that
   commit: every chunk consumed before it has its effects in the outbox, none after it has.
2. The shipper moves the outbox's chunks into the store as the streams of the pseudo-node
   ``cloud:<name>`` (`spec.results_node`) and only then deletes them from the outbox. A chunk
   shipped again after a crash has the same (node, stream, first seq) and the store skips it
   (its primary key), so a result is stored once.

In the control plane a run holds the pipeline's lease (``lease``, `state` and
`CloudPipelineStore.commit_pipeline_results`): the shipper reads every unshipped chunk with
the outbox's state of the same instant and stores both in one transaction fenced by the lease,
and a run starts from the state the store holds (``start``), not from its local outbox. So a
replica that takes the pipeline over, or the same one after a kill -9, continues exactly where
the stored results end; what was committed locally but never shipped is computed again under
the same sequence numbers. Without a lease (tools, tests) the run ships through ``ship`` and
resumes from its local outbox.

The local outbox is kept when the pipeline is deleted, and so is the stored state, so a
pipeline set again under the same name continues its sequence numbers instead of reusing ones
the store holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence, Set
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgewise.cloud.pipelines import state as run_state
from edgewise.cloud.pipelines.source import CloudStreamSource
from edgewise.cloud.pipelines.spec import results_node
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.cloud.store.cloud_pipelines import PipelineLease
from edgewise.outbox import Outbox, outbox_file
from edgewise.outbox.records import Chunk
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.spec import PipelineSpec

log = logging.getLogger(__name__)

Ship = Callable[[Sequence[ChunkWrite], Sequence[MarkWrite]], Awaitable[None]]
"""Store chunks and move marks durably (returns after the commit; raises if it failed)."""
Forward = Callable[[Sequence[ChunkWrite], Set[tuple[str, str, int]]], Awaitable[object]]
"""Hand stored results to data out: the chunks and the keys the store inserted."""

SHIP_BYTES = 4 * 1024 * 1024  # payload bytes per shipment, at most
SHIP_IDLE = 0.1  # s between looks at an empty outbox
STATE_EVERY = 1.0  # s between shipments of a changed state without results (under a lease)


def pipeline_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "cloud-pipelines" / name


class PipelineRun:
    """Runs one cloud pipeline until `stop` (or an error, which `run` raises)."""

    def __init__(self, spec: PipelineSpec, data_dir: Path, store: Store,
                 ship: Ship | None = None, *, lease: PipelineLease | None = None,
                 start: run_state.RunState | None = None,
                 forward: Forward | None = None) -> None:
        if (ship is None) == (lease is None):
            raise ValueError("a run ships either through `ship` or under a `lease`")
        self.spec = spec
        self.dir = pipeline_dir(data_dir, spec.name)
        self.store = store
        self.ship_to = ship
        self.lease = lease
        self.start = start
        self.forward = forward
        self._reader: run_state.PendingReader | None = None
        self._shipped_state: run_state.RunState | None = None
        self._state_at = 0.0
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
        self._engine_done = False

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
        if self.lease is not None and self.start is not None:
            await asyncio.to_thread(run_state.reset, self.dir, self.start)
            self._shipped_state = self.start
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._run()
        finally:
            if self._reader is not None:
                self._reader.close()

    async def _run(self) -> None:
        with self.outbox:
            async with asyncio.TaskGroup() as tg:
                shipper = tg.create_task(self._ship_loop())
                try:
                    await self.engine.run()
                finally:
                    self._engine_done = True
                    self._stopping.set()
                await shipper

    async def _ship_loop(self) -> None:
        while True:
            done = self._engine_done  # its last commit is in the outbox: ship it, then end
            sent = await self.ship_once(final=done)
            if not sent:
                if done:
                    return
                if self._stopping.is_set():  # the engine is making its last commit
                    await asyncio.sleep(SHIP_IDLE / 10)
                    continue
                try:
                    await asyncio.wait_for(self._stopping.wait(), SHIP_IDLE)
                except TimeoutError:
                    pass

    async def ship_once(self, final: bool = False) -> int:
        """Ship what the outbox holds (up to `SHIP_BYTES`; under a lease all of it, with the
        state, and with ``final`` the state even if it was shipped less than `STATE_EVERY`
        ago); the chunks shipped."""
        if self.lease is not None:
            return await self._ship_leased(self.lease, final)
        assert self.ship_to is not None
        chunks = await asyncio.to_thread(self.outbox.peek, SHIP_BYTES)
        if not chunks:
            return 0
        writes, marks = self._writes(chunks)
        await self.ship_to(writes, marks)
        await self._shipped(chunks)
        return len(chunks)

    async def _ship_leased(self, lease: PipelineLease, final: bool) -> int:
        """Every unshipped chunk and the state right after them, in one transaction fenced
        by the lease (`PipelineLeaseLost` when another replica runs the pipeline now). A
        changed state without results is shipped at most every `STATE_EVERY` seconds, so a
        takeover computes again only what came after it."""
        if self._reader is None:
            self._reader = run_state.PendingReader(self.dir)
        loop = asyncio.get_running_loop()
        want = final or loop.time() - self._state_at >= STATE_EVERY
        chunks, state = await asyncio.to_thread(self._reader.read_pending, want)
        if state is None or (not chunks and state == self._shipped_state):
            return 0
        writes, marks = self._writes(chunks)
        result = await self.store.commit_pipeline_results(lease, writes, marks, state.encode())
        self._shipped_state, self._state_at = state, loop.time()
        await self._shipped(chunks)
        if self.forward is not None and writes:
            try:  # data out is best effort after the commit, as for ingested chunks
                await self.forward(writes, result.chunks)
            except Exception:
                log.exception("cloud pipeline %s: data out after a shipment failed",
                              self.spec.name)
        return len(chunks)

    def _writes(self, chunks: Sequence[Chunk]) -> tuple[list[ChunkWrite], list[MarkWrite]]:
        now = datetime.now(UTC)
        writes = [ChunkWrite(self.node, c.stream, c.seq_first, c.seq_count, c.records,
                             c.compacted, c.payload, now) for c in chunks]
        # a stream's chunks share a priority and `Outbox.peek` reads oldest first, so what it
        # returns of a stream follows on what was shipped before: the mark moves to its end
        ends: dict[str, int] = {}
        for c in chunks:
            ends[c.stream] = max(ends.get(c.stream, 0), c.seq_first + c.seq_count)
        marks = [MarkWrite(self.node, s, end, now) for s, end in sorted(ends.items())]
        return writes, marks

    async def _shipped(self, chunks: Sequence[Chunk]) -> None:
        if chunks:
            await asyncio.to_thread(self.outbox.ack, [c.id for c in chunks])
        self.shipped_chunks += len(chunks)
        self.shipped_records += sum(c.records for c in chunks)


def direct_ship(store: Store) -> Ship:
    """`Ship` straight into a store (outside the control plane: tests, tools)."""

    async def ship(chunks: Sequence[ChunkWrite], marks: Sequence[MarkWrite]) -> None:
        await store.commit_ingest(chunks, (), marks)

    return ship
