"""Read-only access to an outbox database: what `agent status`, `dead-letters` and the uplink's
gap reports read, without disturbing the writer.

`OutboxView` opens its own read-only SQLite connection (WAL lets it read while the store writes;
it sees committed transactions only). `OutboxView.snapshot` is one read transaction, so sequence
counters and pending chunks agree: the uplink computes gaps and the chunks the cloud already has
from it. The data directory layout of the outbox (`OUTBOX_FILE`, `outbox_path`) is named here
and nowhere else.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgewise.errors import StorageError
from edgewise.outbox.records import LostRange

OUTBOX_FILE = "outbox.db"


def outbox_file(directory: str | os.PathLike[str]) -> Path:
    """The outbox database in a pipeline's data directory (``edgewise run --data DIR``)."""
    return Path(directory) / OUTBOX_FILE


@dataclass
class StreamRow:
    priority: int
    next_seq: int
    produced: int
    acked: int
    dropped: int
    compacted: int
    pending_records: int = 0
    pending_chunks: int = 0
    pending_bytes: int = 0


@dataclass
class PendingChunk:
    id: int
    stream: str
    seq_first: int
    seq_count: int
    records: int


@dataclass
class OutboxSnapshot:
    streams: dict[str, StreamRow] = field(default_factory=dict)
    chunks: list[PendingChunk] = field(default_factory=list)
    lost: list[LostRange] = field(default_factory=list)  # with ``chunks``: ranges to report


class OutboxView:
    """Read-only access to the outbox database; thread-safe, opened lazily.

    Never writes and never takes a write lock, so it cannot slow the engine's commits or make
    its counters drift. Raises `StorageError` when the database exists but cannot be read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None:
            if not self.path.exists():
                return None
            try:
                db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                    check_same_thread=False,
                )
                db.execute("PRAGMA busy_timeout=5000")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open outbox {self.path} to read: {exc}") from None
            self._db = db
        return self._db

    def snapshot(self, chunks: bool = True) -> OutboxSnapshot:
        """Streams (with pending sums) and, if ``chunks``, every pending chunk's sequence
        range, in one read transaction. Empty when there is no outbox yet."""
        with self._lock:
            db = self._connect()
            if db is None:
                return OutboxSnapshot()
            try:
                db.execute("BEGIN")
                try:
                    snap = self._read(db, chunks)
                finally:
                    db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # created, schema not written yet
                    return OutboxSnapshot()
                raise StorageError(f"cannot read outbox {self.path}: {exc}") from None
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read outbox {self.path}: {exc}") from None
        return snap

    @staticmethod
    def _read(db: sqlite3.Connection, chunks: bool) -> OutboxSnapshot:
        snap = OutboxSnapshot()
        for name, prio, next_seq, produced, acked, dropped, compacted in db.execute(
            "SELECT stream, priority, next_seq, produced, acked, dropped, compacted FROM streams"
        ):
            snap.streams[name] = StreamRow(prio, next_seq, produced, acked, dropped, compacted)
        for name, records, count, nbytes in db.execute(
            "SELECT stream, SUM(records), COUNT(*), SUM(nbytes) FROM chunks GROUP BY stream"
        ):
            row = snap.streams.get(name)
            if row is not None:
                row.pending_records, row.pending_chunks, row.pending_bytes = records, count, nbytes
        if chunks:
            snap.chunks = [
                PendingChunk(*r) for r in db.execute(
                    "SELECT id, stream, seq_first, seq_count, records FROM chunks ORDER BY id"
                )
            ]
            try:
                snap.lost = [
                    LostRange(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6])
                    for r in db.execute("SELECT id, stream, seq_first, seq_count, reason, exact, "
                                        "reported_to FROM lost ORDER BY id")
                ]
            except sqlite3.OperationalError:  # an outbox of an older version, not opened since
                snap.lost = []
        return snap

    def oldest_pending(self, priorities: Iterable[int]) -> dict[int, float]:
        """When (epoch seconds) the oldest waiting chunk of each of ``priorities`` was
        committed; a priority with nothing waiting is left out. One indexed lookup each
        (``chunks_by_priority``), for the heartbeat's health (`edge.health`)."""
        out: dict[int, float] = {}
        with self._lock:
            db = self._connect()
            if db is None:
                return out
            try:
                for prio in sorted(set(priorities)):
                    row = db.execute("SELECT created FROM chunks WHERE priority = ? "
                                     "ORDER BY id LIMIT 1", (prio,)).fetchone()
                    if row is not None:
                        out[prio] = float(row[0])
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # created, schema not written yet
                    return {}
                raise StorageError(f"cannot read outbox {self.path}: {exc}") from None
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read outbox {self.path}: {exc}") from None
        return out

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> OutboxView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
