"""The outbox: a durable, bounded, prioritised buffer of records on their way to the cloud.

SQLite in WAL mode. Records arrive as chunks (one per stream per group commit), encoded with
`edgewise.sync.codec`, each holding a contiguous range of sequence numbers of its stream. One
transaction per group commit writes the chunks, the dead letters and the checkpoint (operator
state and source positions) together, so after a crash the pipeline resumes exactly where the
stored records end: nothing lost, nothing twice.

When the outbox is full, `outbox_policy.choose_evictions` decides what to compact or drop; every
record affected is counted per stream and reported.

Thread use: one `Outbox` object may be used from several threads (a lock serialises access); the
engine does its commits from a single writer thread so the event loop never waits on fsync.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.edge.outbox_policy import StoredChunk, choose_evictions
from edgewise.errors import StorageError
from edgewise.pipeline.component import DeadLetter
from edgewise.sync import codec

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    priority INTEGER NOT NULL,
    compact INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 0,
    produced INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    compacted INTEGER NOT NULL DEFAULT 0,
    dropped_reported INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the uplink keys its state by id
    stream TEXT NOT NULL,
    priority INTEGER NOT NULL,
    seq_first INTEGER NOT NULL,
    seq_count INTEGER NOT NULL,
    records INTEGER NOT NULL,
    ts_first REAL,
    ts_last REAL,
    created REAL NOT NULL,
    compacted INTEGER NOT NULL DEFAULT 0,
    nbytes INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_priority ON chunks(priority, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB
);
CREATE TABLE IF NOT EXISTS checkpoint (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""

PRIORITIES = {"alarm": 9, "critical": 9, "high": 7, "normal": 5, "low": 3, "bulk": 1}
MAX_DEAD_LETTERS = 10_000


@dataclass
class PendingChunk:
    """Records of one stream waiting for the next group commit."""

    stream: str
    columns: dict[str, np.ndarray]
    count: int


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


class Outbox:
    """Open with ``with Outbox(path, max_bytes) as ob:``."""

    def __init__(
        self, path: str | Path, max_bytes: int = 256 * 1024**2, sync: str = "full"
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.sync = sync
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._streams: dict[str, StreamStats] = {}
        self._compact: dict[str, bool] = {}
        self._next_seq: dict[str, int] = {}
        self._used = 0
        self.dead_letter_count = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self) -> Outbox:
        if self._db is not None:
            raise StorageError("outbox is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open outbox {self.path}: {exc}") from None
        self._db = db
        self._load()
        return self

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.close()
                self._db = None

    def __enter__(self) -> Outbox:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError("outbox is not open")
        return self._db

    def _load(self) -> None:
        db = self.db
        for row in db.execute(
            "SELECT stream, priority, compact, next_seq, produced, acked, dropped, compacted "
            "FROM streams"
        ):
            name, prio, compact, next_seq, produced, acked, dropped, compacted = row
            self._streams[name] = StreamStats(prio, produced, acked, dropped, compacted)
            self._compact[name] = bool(compact)
            self._next_seq[name] = next_seq
        for name, records, chunks, nbytes in db.execute(
            "SELECT stream, SUM(records), COUNT(*), SUM(nbytes) FROM chunks GROUP BY stream"
        ):
            st = self._streams.get(name)
            if st:
                st.pending_records, st.pending_chunks, st.pending_bytes = records, chunks, nbytes
        self._used = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM chunks").fetchone()[0]
        self.dead_letter_count = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")

    # -- streams ------------------------------------------------------------------------------
    def register_stream(self, stream: str, priority: int, compact: bool = False) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO streams(stream, priority, compact) VALUES (?, ?, ?) "
                "ON CONFLICT(stream) DO UPDATE SET priority=excluded.priority, "
                "compact=excluded.compact",
                (stream, priority, int(compact)),
            )
        st = self._streams.setdefault(stream, StreamStats(priority))
        st.priority = priority
        self._compact[stream] = compact
        self._next_seq.setdefault(stream, 0)

    # -- writing ------------------------------------------------------------------------------
    def commit(
        self,
        chunks: list[PendingChunk],
        dead: list[DeadLetter] | None = None,
        checkpoint: dict[str, bytes] | None = None,
    ) -> CommitReport:
        """Store chunks, dead letters and checkpoint in one transaction (one fsync)."""
        report = CommitReport()
        now = time.time()
        encoded = []
        for pc in chunks:
            if pc.count == 0:
                continue
            if pc.stream not in self._streams:
                raise StorageError(f"stream {pc.stream!r} is not registered")
            payload = codec.encode(pc.columns)
            ts = pc.columns.get("ts")
            ts_first = float(np.min(ts)) if ts is not None and ts.dtype.kind == "f" else None
            ts_last = float(np.max(ts)) if ts is not None and ts.dtype.kind == "f" else None
            encoded.append((pc, payload, ts_first, ts_last))
        try:
            with self._tx() as db:
                for pc, payload, ts_first, ts_last in encoded:
                    st = self._streams[pc.stream]
                    seq = self._next_seq[pc.stream]
                    self._next_seq[pc.stream] = seq + pc.count
                    st.produced += pc.count
                    if not self._make_room(db, len(payload), st.priority, report):
                        st.dropped += pc.count
                        report.dropped[pc.stream] = report.dropped.get(pc.stream, 0) + pc.count
                    else:
                        db.execute(
                            "INSERT INTO chunks(stream, priority, seq_first, seq_count, records, "
                            "ts_first, ts_last, created, nbytes, payload) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (pc.stream, st.priority, seq, pc.count, pc.count, ts_first, ts_last,
                             now, len(payload), payload),
                        )
                        self._used += len(payload)
                        st.pending_records += pc.count
                        st.pending_chunks += 1
                        st.pending_bytes += len(payload)
                        report.chunks += 1
                        report.records += pc.count
                        report.bytes += len(payload)
                    db.execute(
                        "UPDATE streams SET next_seq=?, produced=?, dropped=?, compacted=? "
                        "WHERE stream=?",
                        (self._next_seq[pc.stream], st.produced, st.dropped, st.compacted,
                         pc.stream),
                    )
                if dead:
                    self._add_dead(db, dead, now)
                    report.dead_letters = len(dead)
                if checkpoint:
                    db.executemany(
                        "INSERT INTO checkpoint(key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        list(checkpoint.items()),
                    )
        except sqlite3.Error as exc:
            self._reload_after_failure()
            raise StorageError(f"outbox commit failed ({self.path}): {exc}") from None
        return report

    def _reload_after_failure(self) -> None:
        """Counters were changed inside a transaction that rolled back: read them again."""
        self._streams.clear()
        self._next_seq.clear()
        try:
            self._load()
        except sqlite3.Error:  # the database itself is gone; the caller raises StorageError
            pass

    def _add_dead(self, db: sqlite3.Connection, dead: list[DeadLetter], now: float) -> None:
        db.executemany(
            "INSERT INTO dead_letters(created, source, reason, size, payload) VALUES (?,?,?,?,?)",
            [(now, d.source, d.reason, d.size, d.payload) for d in dead],
        )
        self.dead_letter_count += len(dead)
        if self.dead_letter_count > MAX_DEAD_LETTERS:
            excess = self.dead_letter_count - MAX_DEAD_LETTERS
            db.execute(
                "DELETE FROM dead_letters WHERE id IN "
                "(SELECT id FROM dead_letters ORDER BY id LIMIT ?)",
                (excess,),
            )
            self.dead_letter_count = MAX_DEAD_LETTERS

    def _make_room(
        self, db: sqlite3.Connection, incoming: int, priority: int, report: CommitReport
    ) -> bool:
        if self._used + incoming <= self.max_bytes:
            return True
        rows = db.execute(
            "SELECT id, stream, priority, nbytes, compacted FROM chunks "
            "WHERE priority <= ? ORDER BY priority, id LIMIT 10000",
            (priority,),
        ).fetchall()
        stored = [
            StoredChunk(cid, prio, nb, self._compact.get(stream, False) and not comp)
            for cid, stream, prio, nb, comp in rows
        ]
        streams = {cid: stream for cid, stream, *_ in rows}
        evictions, accept = choose_evictions(stored, self._used, incoming, priority, self.max_bytes)
        for ev in evictions:
            if self._used + incoming <= self.max_bytes:
                break
            if ev.action == "compact":
                self._compact_chunk(db, ev.chunk_id, streams[ev.chunk_id], report)
            else:
                self._drop_chunk(db, ev.chunk_id, streams[ev.chunk_id], report)
        return accept and self._used + incoming <= self.max_bytes

    def _drop_chunk(
        self, db: sqlite3.Connection, cid: int, stream: str, report: CommitReport
    ) -> None:
        records, nbytes = db.execute(
            "SELECT records, nbytes FROM chunks WHERE id=?", (cid,)
        ).fetchone()
        db.execute("DELETE FROM chunks WHERE id=?", (cid,))
        st = self._streams[stream]
        st.dropped += records
        st.pending_records -= records
        st.pending_chunks -= 1
        st.pending_bytes -= nbytes
        self._used -= nbytes
        report.dropped[stream] = report.dropped.get(stream, 0) + records
        db.execute("UPDATE streams SET dropped=? WHERE stream=?", (st.dropped, stream))

    def _compact_chunk(
        self, db: sqlite3.Connection, cid: int, stream: str, report: CommitReport
    ) -> None:
        records, nbytes, payload = db.execute(
            "SELECT records, nbytes, payload FROM chunks WHERE id=?", (cid,)
        ).fetchone()
        cols = compact_columns(codec.decode(payload))
        new = codec.encode(cols)
        n = len(next(iter(cols.values()))) if cols else 0
        db.execute(
            "UPDATE chunks SET payload=?, nbytes=?, records=?, compacted=1 WHERE id=?",
            (new, len(new), n, cid),
        )
        st = self._streams[stream]
        st.compacted += records
        st.pending_records += n - records
        st.pending_bytes += len(new) - nbytes
        self._used += len(new) - nbytes
        report.compacted[stream] = report.compacted.get(stream, 0) + records
        db.execute("UPDATE streams SET compacted=? WHERE stream=?", (st.compacted, stream))

    # -- reading (uplink) ---------------------------------------------------------------------
    def peek(self, max_bytes: int = 1024 * 1024, exclude: set[int] | None = None) -> list[Chunk]:
        """Chunks to send next: highest priority first, oldest first within a priority."""
        picked: list[int] = []
        total = 0
        with self._lock:
            # sizes first, payloads only of the chunks that fit the budget
            for cid, nbytes in self.db.execute(
                "SELECT id, nbytes FROM chunks ORDER BY priority DESC, id LIMIT 10000"
            ):
                if exclude and cid in exclude:
                    continue
                if picked and total + nbytes > max_bytes:
                    break
                picked.append(cid)
                total += nbytes
            if not picked:
                return []
            rows = self.db.execute(
                "SELECT id, stream, priority, seq_first, seq_count, records, compacted, payload "
                f"FROM chunks WHERE id IN ({','.join('?' * len(picked))})",
                picked,
            ).fetchall()
        by_id = {r[0]: r for r in rows}
        return [
            Chunk(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7])
            for r in (by_id[c] for c in picked if c in by_id)
        ]

    def ack(self, chunk_ids: list[int]) -> int:
        """Delete chunks the cloud has durably stored; returns the records acknowledged."""
        if not chunk_ids:
            return 0
        acked = 0
        try:
            with self._tx() as db:
                for cid in chunk_ids:
                    row = db.execute(
                        "SELECT stream, seq_count, records, nbytes FROM chunks WHERE id=?", (cid,)
                    ).fetchone()
                    if row is None:
                        continue
                    stream, seq_count, records, nbytes = row
                    db.execute("DELETE FROM chunks WHERE id=?", (cid,))
                    st = self._streams[stream]
                    st.acked += seq_count
                    st.pending_records -= records
                    st.pending_chunks -= 1
                    st.pending_bytes -= nbytes
                    self._used -= nbytes
                    acked += seq_count
                    db.execute("UPDATE streams SET acked=? WHERE stream=?", (st.acked, stream))
        except sqlite3.Error as exc:
            self._reload_after_failure()
            raise StorageError(f"outbox ack failed ({self.path}): {exc}") from None
        return acked

    # -- checkpoint and inspection ------------------------------------------------------------
    def load_checkpoint(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self.db.execute("SELECT key, value FROM checkpoint").fetchall())

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute(
                "SELECT id, created, source, reason, size, payload FROM dead_letters "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {"id": r[0], "created": r[1], "source": r[2], "reason": r[3], "size": r[4],
             "payload": r[5]}
            for r in rows
        ]

    def read_stream(self, stream: str) -> dict[str, np.ndarray]:
        """Every pending record of a stream, decoded and concatenated (tests and tools)."""
        from edgewise.pipeline.batch import Batch

        with self._lock:
            rows = self.db.execute(
                "SELECT payload FROM chunks WHERE stream=? ORDER BY seq_first", (stream,)
            ).fetchall()
        return Batch.concat(Batch(codec.decode(r[0])) for r in rows).columns

    @property
    def used_bytes(self) -> int:
        return self._used

    def stats(self) -> dict[str, StreamStats]:
        return {k: StreamStats(**vars(v)) for k, v in self._streams.items()}


def compact_columns(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw records → one aggregate per key: count, and mean/min/max of each numeric field.

    The key is the first text column (e.g. ``sensor``); ``ts`` becomes ``ts_first``/``ts_last``.
    """
    if not cols:
        return cols
    n = len(next(iter(cols.values())))
    key = next((k for k, v in cols.items() if v.dtype.kind == "O"), None)
    if key is None:
        keys = np.zeros(n, dtype=np.int64)
        uniq = np.array(["*"], dtype=object)
    else:
        uniq_list, keys = np.unique(cols[key].astype(str), return_inverse=True)
        uniq = uniq_list.astype(object)
    counts = np.bincount(keys, minlength=len(uniq))
    out: dict[str, np.ndarray] = {(key or "key"): uniq, "count": counts.astype(np.int64)}
    for name, col in cols.items():
        if name == key or col.dtype.kind not in ("f", "i", "u"):
            continue
        v = col.astype(np.float64)
        if name == "ts":
            mins = np.full(len(uniq), np.inf)
            maxs = np.full(len(uniq), -np.inf)
            np.minimum.at(mins, keys, v)
            np.maximum.at(maxs, keys, v)
            out["ts_first"], out["ts_last"] = mins, maxs
            continue
        sums = np.bincount(keys, weights=v, minlength=len(uniq))
        mins = np.full(len(uniq), np.inf)
        maxs = np.full(len(uniq), -np.inf)
        np.minimum.at(mins, keys, v)
        np.maximum.at(maxs, keys, v)
        out[f"{name}_mean"] = sums / np.maximum(counts, 1)
        out[f"{name}_min"] = mins
        out[f"{name}_max"] = maxs
    return out
