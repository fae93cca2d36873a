"""Frames of the uplink session and the outbox reads that feed them; no state, no event loop.

`take` (chunks to send, framed as ``batch``; run in a worker thread), `signature` (whether the
outbox changed since the feeder last looked), `gap_frame` and `parse_marks` (the contiguous
marks of a ``welcome``). Messages: `edgewise.sync.protocol`; used by `edgewise.edge.transfer`.
"""

from __future__ import annotations

from typing import Any

from edgewise.errors import PeerError
from edgewise.outbox import Chunk, Outbox
from edgewise.sync import protocol as P

FRAME_OVERHEAD = 512  # bytes of msgpack around a batch payload, generously
MAX_PAYLOAD = P.MAX_FRAME_BYTES - FRAME_OVERHEAD


def take(ob: Outbox, room: int, exclude: set[int]) -> list[tuple[Chunk, bytes | None]]:
    """Next chunks to send and their frames (encoded here, in the worker thread).

    A chunk too large for one frame comes with ``None`` instead of a frame.
    """
    out: list[tuple[Chunk, bytes | None]] = []
    for c in ob.peek(max_bytes=max(room, 1), exclude=exclude):
        if len(c.payload) > MAX_PAYLOAD:
            out.append((c, None))
            continue
        out.append((c, P.encode({
            "t": P.BATCH, "id": c.id, "stream": c.stream, "seq": c.seq_first,
            "count": c.seq_count, "records": c.records, "compacted": c.compacted,
            "payload": c.payload,
        })))
    return out


def signature(ob: Outbox) -> tuple[int, int, int]:
    """Changes whenever the outbox gains, loses or rewrites a chunk (in-memory, no SQL)."""
    produced = pending = dropped = 0
    for s in ob.stats().values():
        produced += s.produced
        pending += s.pending_chunks
        dropped += s.dropped + s.compacted
    return produced, pending, dropped


def gap_frame(stream: str, seq: int, count: int, reason: str = "dropped: outbox full") -> bytes:
    """A ``gap``: ``[seq, seq+count)`` of ``stream`` is lost, for ``reason`` (the cloud keeps
    what it already holds of the range and records the rest as lost)."""
    return P.encode({"t": P.GAP, "stream": stream, "seq": seq, "count": count,
                     "reason": reason})


def parse_marks(streams: dict[Any, Any]) -> dict[str, int]:
    """The cloud's contiguous mark per stream, from a ``welcome``'s ``streams``."""
    marks = {}
    for name, v in streams.items():
        if isinstance(v, dict):
            v = v.get("contiguous", v.get("mark"))
        if not isinstance(name, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PeerError(f"welcome: stream {name!r} has no valid contiguous mark ({v!r})")
        marks[name] = v
    return marks
