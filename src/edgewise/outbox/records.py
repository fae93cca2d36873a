"""The outbox's record types: what goes in (pending chunks, dead letters), what comes out
(stored chunks, per-stream counts, commit reports), and the priority names of the pipeline spec.

Plain data, no I/O; shared by the store, its read-only view, the pipeline engine and the uplink.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from edgewise.errors import StorageError


class OutboxDamaged(StorageError):
    """The outbox file is not a readable database (truncated, overwritten, corrupt)."""


class OutboxDiskFull(StorageError):
    """A commit found the disk full and nothing could be evicted to make room: nothing of it
    was stored. The caller keeps its records and tries again (`edgewise.pipeline.commit`)."""


@dataclass
class DeadLetter:
    """An input that could not become a record, with the reason, kept for people to inspect."""

    source: str
    reason: str
    payload: bytes
    size: int


PRIORITIES = {"alarm": 9, "critical": 9, "high": 7, "normal": 5, "low": 3, "bulk": 1}


@dataclass
class PendingChunk:
    """Records of one stream waiting for the next group commit.

    With ``lost`` (a reason), ``count`` records that were given up before they could be stored
    (``columns`` empty): the commit gives them their sequence numbers and records the range as
    lost, so the cloud hears of them as a gap."""

    stream: str
    columns: dict[str, np.ndarray]
    count: int
    lost: str | None = None


@dataclass
class Chunk:
    """A stored chunk as the uplink reads it."""

    id: int
    stream: str
    priority: int
    seq_first: int
    seq_count: int
    records: int
    compacted: bool
    payload: bytes


@dataclass
class LostRange:
    """A sequence range whose records are gone and not (known to be) in the cloud."""

    id: int
    stream: str
    seq_first: int
    seq_count: int
    reason: str
    exact: bool = True  # False: an upper bound (the cloud records only what it does not hold)
    reported_to: str | None = None


@dataclass
class OutboxHealth:
    """The outbox's own condition, for status (`edgewise.outbox.Outbox.health`)."""

    state: str = "ok"  # ok | disk full
    since: float | None = None  # epoch seconds, when the state began
    error: str | None = None  # the last storage error, if the state is not ok
    disk_bytes: int = 0  # the database and its write-ahead log on disk
    max_bytes: int = 0  # the bound (docs/architecture.md, "The outbox")
    free_bytes: int | None = None  # free on its file system
    held_records: int = 0  # waiting in memory for the disk (the engine's committer)
    lost_in_memory: int = 0  # given up in memory while the disk was full (reported as gaps)
    notes: list[str] = field(default_factory=list)  # what happened at open (continuity, ...)


@dataclass
class StreamStats:
    priority: int
    produced: int = 0
    acked: int = 0
    dropped: int = 0
    compacted: int = 0
    pending_records: int = 0
    pending_chunks: int = 0
    pending_bytes: int = 0


@dataclass
class CommitReport:
    chunks: int = 0
    records: int = 0
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    compacted: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0


def concat_columns(parts: Iterable[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Concatenate ``(columns, n)`` record sets; a column missing from a part is filled with
    None, and mixed kinds (text and numbers) become object columns."""
    parts = [(c, n) for c, n in parts if n]
    if not parts:
        return {}
    if len(parts) == 1:
        return parts[0][0]
    names: dict[str, None] = {}
    for cols, _ in parts:
        for k in cols:
            names.setdefault(k, None)
    out: dict[str, np.ndarray] = {}
    for name in names:
        arrays = []
        for cols, n in parts:
            col = cols.get(name)
            if col is None:
                col = np.full(n, None, dtype=object)
            arrays.append(col)
        kinds = {a.dtype.kind for a in arrays}
        if len(kinds) > 1 and not kinds <= {"f", "i", "u", "b"}:
            arrays = [a.astype(object) for a in arrays]
        out[name] = np.concatenate(arrays)
    return out
