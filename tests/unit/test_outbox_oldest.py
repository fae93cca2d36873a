"""`OutboxView.oldest_pending`: when the oldest waiting chunk of each priority was committed
(the heartbeat's outbox age, `edge.health`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from edgewise.outbox import Outbox, PendingChunk
from edgewise.outbox.view import OutboxView


def cols(n: int) -> dict[str, np.ndarray]:
    return {"sensor": np.array(["s"] * n, dtype=object), "ts": np.arange(n, dtype=float),
            "value": np.arange(n, dtype=float)}


def created(path: Path) -> dict[int, list[float]]:
    """Each priority's waiting chunks' commit times, oldest chunk first (read directly)."""
    out: dict[int, list[float]] = {}
    with sqlite3.connect(path) as db:
        for prio, t in db.execute("SELECT priority, created FROM chunks ORDER BY id"):
            out.setdefault(prio, []).append(t)
    return out


def test_oldest_pending_per_priority(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with OutboxView(path) as view:
        assert view.oldest_pending([9, 5]) == {}  # no outbox yet
        ob = Outbox(path, 64 << 20, sync="normal")
        with ob:
            ob.register_stream("alarms", 9)
            ob.register_stream("raw", 5)
            ob.commit([PendingChunk("alarms", cols(3), 3), PendingChunk("raw", cols(5), 5)])
            ob.commit([PendingChunk("alarms", cols(2), 2)])
            ob.commit([PendingChunk("alarms", cols(2), 2)])
            times = created(path)
            assert [len(times[9]), len(times[5])] == [3, 1]
            assert view.oldest_pending([9, 5, 1]) == {9: times[9][0], 5: times[5][0]}
            alarms = [c.id for c in ob.peek() if c.stream == "alarms"]
            ob.ack(alarms[:2])  # the two oldest alarm chunks are stored
            assert view.oldest_pending([9, 5]) == {9: times[9][2], 5: times[5][0]}
            ob.ack([c.id for c in ob.peek()])
            assert view.oldest_pending([9, 5]) == {}
