"""`cloud.pipelines.merge.Merge`: rows handed out only up to the lowest watermark of the live
nodes, a quiet node dropped after max_wait, positions that say what was handed out."""

from __future__ import annotations

import math

import numpy as np

from edgewise.cloud.pipelines.merge import Merge, Pending, sorted_by_time
from edgewise.pipeline.batch import Batch


def chunk(seq: int, ts: list[float]) -> Pending:
    b, t = sorted_by_time(Batch({"ts": np.array(ts), "v": np.arange(len(ts), dtype=float)}))
    return Pending(seq, len(ts), b, t)


def test_frontier_quiet_node_and_positions() -> None:
    m = Merge(max_wait=10.0)
    m.add_node("a", 0.0)
    m.add_node("b", 0.0)
    m.offer("a", chunk(0, [3.0, 1.0, 2.0, 5.0]), 1.0)  # sorted on the way in
    assert m.take(1.0) is None  # b is live and has sent nothing: it may send ts 0
    m.offer("b", chunk(0, [1.5, 2.5]), 2.0)
    out = m.take(2.0)  # frontier: min(5.0, 2.5) = 2.5
    assert out is not None and out["ts"].tolist() == [1.0, 1.5, 2.0, 2.5]
    assert m.position() == {"a": [0, 2], "b": [2, 0]}
    assert m.frontier(2.0) == 2.5
    # b goes quiet: after max_wait the merge goes on without it
    assert m.take(11.9) is None
    out = m.take(12.5)
    assert out is not None and out["ts"].tolist() == [3.0, 5.0]
    assert m.position() == {"a": [4, 0], "b": [2, 0]}
    assert math.isinf(m.frontier(12.5))
    # b comes back behind the others: handed out at once (the window decides: merge or late)
    # (a is quiet now, so the frontier is b's own watermark)
    m.offer("b", chunk(2, [0.5, 4.0]), 13.0)
    out = m.take(13.0)
    assert out is not None and out["ts"].tolist() == [0.5, 4.0]
    assert m.position() == {"a": [4, 0], "b": [4, 0]}
    # a live node ahead does not hold back rows at or below the others' watermark
    m.offer("a", chunk(4, [6.0, 9.0]), 14.0)
    m.offer("b", chunk(4, [7.0]), 14.0)
    out = m.take(14.0)
    assert out is not None and out["ts"].tolist() == [6.0, 7.0]
    assert m.position() == {"a": [4, 1], "b": [5, 0]}
