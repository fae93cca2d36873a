"""Event-time merge of many nodes' streams, with a watermark per node (pure, no I/O).

Each node's chunks arrive in sequence order (`offer`), their rows sorted by event time. A
node's *watermark* is the highest event time read from it. The merge's *frontier* is the
lowest watermark of the live nodes, and `take` hands out, from every node, the rows at or
below the frontier, as one batch: no live node can still send a row below it (its chunks come
in event-time order), so a window downstream closes only when every live node has passed its
end. A node is live until it has sent nothing new for ``max_wait`` seconds (wall time); then
the frontier goes on without it (with no live node at all it is unbounded and everything read
is handed out). What a quiet node sends later is handed out behind the others' event time: the
window operators merge it into windows still open (their ``allowed_lateness``) or route it to
their ``late`` port, where it is counted.

Positions: per node the first sequence number of the chunk not yet handed out in full and the
rows of it that were (`position`), so a restart skips exactly what was handed out.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgewise.pipeline.batch import Batch


@dataclass
class Pending:
    """A chunk read from a node: its rows sorted by event time, ``offset`` of them handed out."""

    seq_first: int
    seq_count: int
    batch: Batch
    ts: np.ndarray  # event times of the rows, sorted (-inf without a numeric ts)
    offset: int = 0


@dataclass
class NodeState:
    watermark: float = -math.inf  # highest event time read from this node
    last_data: float = 0.0  # wall time it last offered something
    next_seq: int = 0  # seq after the last chunk read
    queue: deque[Pending] = field(default_factory=deque)


def sorted_by_time(batch: Batch, time_field: str = "ts") -> tuple[Batch, np.ndarray]:
    """The batch with its rows in event-time order (stable) and those times."""
    ts = batch.columns.get(time_field)
    if ts is None or ts.dtype.kind not in "iuf":
        return batch, np.full(batch.n, -math.inf)
    t = ts.astype(np.float64, copy=False)
    if batch.n < 2 or bool(np.all(t[1:] >= t[:-1])):
        return batch, t
    order = np.argsort(t, kind="stable")
    return batch.take(order), t[order]


class Merge:
    """See the module docstring. ``now`` is wall time in seconds (monotonic)."""

    def __init__(self, max_wait: float, max_buffered: int = 64) -> None:
        self.max_wait = max_wait
        self.max_buffered = max_buffered
        self.nodes: dict[str, NodeState] = {}
        self.held = 0  # takes that left rows behind for a live node

    def add_node(self, node: str, now: float, next_seq: int = 0) -> None:
        if node not in self.nodes:
            self.nodes[node] = NodeState(last_data=now, next_seq=next_seq)

    def room(self, node: str) -> int:
        return self.max_buffered - len(self.nodes[node].queue)

    def offer(self, node: str, item: Pending, now: float) -> None:
        st = self.nodes[node]
        st.queue.append(item)
        st.next_seq = item.seq_first + item.seq_count
        st.last_data = now
        if len(item.ts):
            st.watermark = max(st.watermark, float(item.ts[-1]))

    def frontier(self, now: float) -> float:
        live = [st.watermark for st in self.nodes.values()
                if now - st.last_data < self.max_wait]
        return min(live) if live else math.inf

    def take(self, now: float) -> Batch | None:
        """The rows of every node at or below the frontier, as one batch in event-time order
        (None when there are none)."""
        limit = self.frontier(now)
        parts: list[Batch] = []
        for st in self.nodes.values():
            while st.queue:
                p = st.queue[0]
                end = int(np.searchsorted(p.ts, limit, side="right"))
                if end > p.offset:
                    parts.append(p.batch.take(np.arange(p.offset, end)))
                    p.offset = end
                if p.offset < p.batch.n:
                    self.held += 1
                    break
                st.queue.popleft()
        if not parts:
            return None
        merged, _ = sorted_by_time(Batch.concat(parts))
        return merged

    def position(self) -> dict[str, list[int]]:
        """Per node: [first seq not handed out in full, rows of that chunk handed out]."""
        out: dict[str, list[int]] = {}
        for n, st in self.nodes.items():
            out[n] = [st.queue[0].seq_first, st.queue[0].offset] if st.queue else [st.next_seq, 0]
        return out

    def watermarks(self) -> dict[str, float | None]:
        return {n: (None if st.watermark == -math.inf else st.watermark)
                for n, st in sorted(self.nodes.items())}
