"""The control plane's `stream` source: ingested chunks of many nodes, merged in event time.

It reads the stream named in its config of every node matching its label selector from the
store, only below each stream's contiguous mark (so in sequence order; a range a node declared
lost is skipped and counted), decodes the chunks off the event loop and hands them to the
engine through `merge.Merge` (a watermark per node, ``max_wait`` for a node gone quiet).

Its position is, per node, the first sequence number of the chunk not handed to the engine in
full and how many of its rows were (`merge.Merge.position`); the engine commits it with the
operators' state and the output (`edgewise.cloud.pipelines.runner`), so after a crash the run
continues exactly after the last row whose effects were committed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np

from edgewise.cloud.pipelines.merge import Merge, Pending, sorted_by_time
from edgewise.cloud.store import Store, StoredChunk
from edgewise.errors import PeerError
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext, SourceOutput
from edgewise.pipeline.sources.stream import StreamConfig, StreamSource
from edgewise.sync import codec

log = logging.getLogger(__name__)

NODE_REFRESH = 5.0  # s between two reads of the node list
NODE_PAGE = 1000


def chunk_rows(chunk: StoredChunk, node_field: str) -> tuple[Batch, np.ndarray]:
    """A stored chunk as a batch (with the node's id in ``node_field``) in event-time order,
    and its event times."""
    cols = codec.decode(chunk.payload)
    n = len(next(iter(cols.values()))) if cols else 0
    if node_field and node_field not in cols:
        cols[node_field] = np.full(n, chunk.node_id, dtype=object)
    return sorted_by_time(Batch(cols, n))


class CloudStreamSource(StreamSource):
    """The `stream` source as the control plane runs it (see the module docstring)."""

    def __init__(self, id: str, config: StreamConfig, ctx: RunContext, store: Store) -> None:
        super().__init__(id, config, ctx)
        self.store = store
        self.merge = Merge(float(config.max_wait))
        self._start: dict[str, list[int]] = {}  # restored: per node [seq, rows to skip]
        self.records = 0
        self.lost = 0  # sequence numbers skipped: declared lost by their node
        self.quarantined = 0  # records skipped: sent while their node was quarantined

    def restore(self, position: Any) -> None:
        self._start = {str(k): [int(v[0]), int(v[1])] for k, v in position.items()}

    def stats(self) -> dict[str, Any]:
        return {"lost": self.lost, "quarantined": self.quarantined,
                "nodes": len(self.merge.nodes), "held": self.merge.held,
                "watermarks": self.merge.watermarks()}

    async def _nodes(self) -> list[str]:
        out: list[str] = []
        after = None
        while True:
            page = await self.store.list_nodes(self.config.nodes or None, limit=NODE_PAGE,
                                               after=after)
            out += [n.id for n in page]
            if len(page) < NODE_PAGE:
                return out
            after = page[-1].id

    async def _fill(self, node: str, mark: int) -> None:
        st = self.merge.nodes[node]
        room = self.merge.room(node)
        start = st.next_seq
        if room <= 0 or start >= mark:
            return
        chunks = await self.store.read_chunks(node, self.config.stream, from_seq=start,
                                              limit=room, include_quarantined=True)
        for c in chunks:
            if c.seq_first >= mark:
                break
            if c.seq_first > start:
                self.lost += c.seq_first - start  # a gap: declared lost by the node
            if c.quarantined:  # its node was quarantined: passed over as if empty
                self.quarantined += c.records
                batch, ts = Batch.empty(), np.empty(0)
                self.merge.offer(node, Pending(c.seq_first, c.seq_count, batch, ts, 0),
                                 time.monotonic())
                start = c.seq_first + c.seq_count
                continue
            try:
                batch, ts = await asyncio.to_thread(chunk_rows, c, self.config.node_field)
            except PeerError as exc:  # the ingest checked it; a stored chunk should decode
                log.error("cloud pipeline %s: chunk %s/%s/%d does not decode, skipped: %s",
                          self.ctx.pipeline, node, c.stream, c.seq_first, exc)
                batch, ts = Batch.empty(), np.empty(0)
            skip = self._start.pop(node, [0, 0])
            offset = skip[1] if skip[0] == c.seq_first else 0
            self.merge.offer(node, Pending(c.seq_first, c.seq_count, batch, ts,
                                           min(offset, batch.n)), time.monotonic())
            start = c.seq_first + c.seq_count

    async def run(self, out: SourceOutput) -> None:
        cfg = self.config
        nodes: list[str] = []
        refreshed = -math.inf
        while True:
            now = time.monotonic()
            if now - refreshed >= NODE_REFRESH:
                nodes = await self._nodes()
                refreshed = now
                for n in nodes:
                    self.merge.add_node(n, now, self._start.get(n, [0, 0])[0])
            marks = await self.store.stream_marks(cfg.stream)
            for n in nodes:
                await self._fill(n, marks.get(n, 0))
            batch = self.merge.take(time.monotonic())
            if batch is not None and batch.n:
                self.records += batch.n
                await out.emit(batch, self.merge.position())
            else:
                await asyncio.sleep(float(cfg.poll))
