"""The outbox: a durable, bounded, prioritised buffer of records on their way to the cloud.

SQLite in WAL mode. Records arrive as chunks (one per stream per group commit), encoded with
`edgewise.sync.codec`, each holding a contiguous range of sequence numbers of its stream. One
transaction per group commit writes the chunks, the dead letters and the checkpoint (operator
state and source positions) together, so after a crash the pipeline resumes exactly where the
stored records end: nothing lost, nothing twice.

When the outbox reaches its bound (bytes on disk, `edgewise.outbox.disk`),
`edgewise.outbox.policy.choose_evictions` decides what to compact or drop; every record affected
is counted per stream and its sequence range recorded as lost, with the reason, for the uplink
to report (`edgewise.outbox.numbering`). When the disk itself is full, the outbox releases its
reserve file, stops growing and evicts lower priorities to store the new records; a commit that
still cannot be stored raises `OutboxDiskFull` (nothing stored; the caller keeps its records).

Encryption at rest: given a ``cipher`` (`edgewise.security.payload.PayloadCipher`: AES-GCM
under a key sealed to the TPM), every chunk's payload is stored encrypted, bound to its stream
name, and decrypted when read (`peek`, `read_stream`, compaction); the uplink sends the plain
codec bytes. Dead letters' payloads and the checkpoint's values are sealed with it too
(`SEALED` prefix; their kind and key as associated data); ones stored in clear before the
cipher was given are still read. Without the cipher, `dead_letters` shows a sealed payload as
None (``encrypted``: True) and `load_checkpoint` refuses a sealed value.

Thread use: one `Outbox` object may be used from several threads (a lock serialises access); the
engine does its commits from a single writer thread so the event loop never waits on fsync.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgewise.errors import StorageError
from edgewise.outbox import disk, numbering, schema
from edgewise.outbox.compaction import compact_columns
from edgewise.outbox.numbering import Numbered
from edgewise.outbox.pressure import Pressure
from edgewise.outbox.records import (
    Chunk,
    CommitReport,
    DeadLetter,
    OutboxDamaged,
    OutboxDiskFull,
    OutboxHealth,
    PendingChunk,
    StreamStats,
    concat_columns,
)
from edgewise.sync import codec

__all__ = ["MAX_DEAD_LETTERS", "Outbox", "OutboxDamaged", "compact_columns"]

MAX_DEAD_LETTERS = 10_000
SEALED = b"EWSEAL1\0"  # a dead letter's payload or checkpoint value sealed with the cipher


class PayloadCipher(Protocol):
    """Encrypts chunk payloads at rest (`edgewise.security.payload.PayloadCipher`)."""

    def seal(self, data: bytes, aad: bytes = b"") -> bytes: ...
    def open(self, blob: bytes, aad: bytes = b"") -> bytes: ...
class Outbox(Pressure, Numbered):
    """Open with ``with Outbox(path, max_bytes) as ob:``."""

    def __init__(
        self, path: str | Path, max_bytes: int = 256 * 1024**2, sync: str = "full",
        cipher: PayloadCipher | None = None,
    ) -> None:
        self.path = Path(path)
        self.cipher = cipher
        self.max_bytes = max_bytes
        self.sync = sync
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._streams: dict[str, StreamStats] = {}
        self._compact: dict[str, bool] = {}
        self._next_seq: dict[str, int] = {}
        self._used = 0  # payload bytes of the stored chunks
        self._disk = 0  # their estimated bytes in the file (`disk.row_cost`)
        self._fixed = 0  # bytes in use that are not chunk rows (less the estimates' error)
        self._page = 4096
        self._frozen: int | None = None  # disk full: the outbox may not grow past this
        self.meta: dict[str, str] = {}
        self.reserve = disk.Reserve(self.path, disk.wal_reserve(max_bytes))
        self.dead_letter_count = 0
        self.health_state = OutboxHealth(max_bytes=max_bytes)
        self._note_lock = threading.Lock()
        self._reserve_ok = False
        self.continued: dict[str, tuple[int, int]] = {}  # at open: stream -> range lost
        self._note_positions: bytes | None = None  # of the last commit, kept in the note
        self.rewound_positions: bytes | None = None  # see `take_rewound`

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self, check: bool = False, floors: dict[str, int] | None = None,
             reason: str | None = None, replaced_epoch: str | None = None) -> Outbox:
        """Open (creating the file if needed); with ``check``, `OutboxDamaged` also for damage
        SQLite only finds when it reads every page (``PRAGMA quick_check``).

        A file behind its ``outbox.seqs`` note (or ``floors``) continues from there, the range
        skipped lost for ``reason`` (`continued`); ``replaced_epoch``: `_continue_from_note`."""
        if self._db is not None:
            raise StorageError("outbox is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
            db.execute("PRAGMA busy_timeout=5000")
            if check:
                problems = [r[0] for r in db.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError(f"database disk image is malformed: "
                                                f"{'; '.join(problems)}")
            self.meta = schema.create(db)
            disk.configure_wal(db, self.max_bytes)
            self._page = db.execute("PRAGMA page_size").fetchone()[0]
            self._db = db
            self._load()
        except sqlite3.Error as exc:
            self._db = None
            if db is not None:
                db.close()
            raise disk.storage_error("cannot open outbox", self.path, exc) from None
        self._continue_from_note(floors or {}, reason, replaced_epoch)
        return self

    def configure(self, max_bytes: int, sync: str) -> None:
        """Apply a pipeline's outbox settings to an open outbox (each engine the agent starts
        brings its own); a smaller ``max_bytes`` takes effect at the next commit."""
        self.max_bytes = max_bytes
        self.sync = sync
        self.health_state.max_bytes = max_bytes
        self.reserve.size = disk.wal_reserve(max_bytes)
        with self._lock:
            self.db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            disk.configure_wal(self.db, max_bytes)
        self._reserve_ok = False  # written (to its new size) by the next commit

    def close(self) -> None:
        """Close; the write-ahead log is copied into the file first (best effort: a reader
        still open elsewhere may keep part of it)."""
        if self._db is not None:
            with self._lock:
                with suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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
        """Read the counters again. Another thread may be committing or acknowledging (the
        engine commits in an executor while a welcome renumbers on the event loop), so the
        counters are built aside and swapped in under the lock, never cleared in place."""
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> None:
        db = self.db
        streams: dict[str, StreamStats] = {}
        compact: dict[str, bool] = {}
        next_seq: dict[str, int] = {}
        for row in db.execute(
            "SELECT stream, priority, compact, next_seq, produced, acked, dropped, compacted "
            "FROM streams"
        ):
            name, prio, comp, seq, produced, acked, dropped, compacted = row
            streams[name] = StreamStats(prio, produced, acked, dropped, compacted)
            compact[name] = bool(comp)
            next_seq[name] = seq
        for name, records, chunks, nbytes in db.execute(
            "SELECT stream, SUM(records), COUNT(*), SUM(nbytes) FROM chunks GROUP BY stream"
        ):
            st = streams.get(name)
            if st:
                st.pending_records, st.pending_chunks, st.pending_bytes = records, chunks, nbytes
        used = on_disk = 0
        for (nbytes,) in db.execute("SELECT nbytes FROM chunks"):
            used += nbytes
            on_disk += disk.row_cost(nbytes, self._page)
        self._fixed = disk.live_bytes(db) - on_disk
        self._used, self._disk = used, on_disk
        self._streams, self._compact, self._next_seq = streams, compact, next_seq
        self.dead_letter_count = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    @contextmanager
    def _tx(self, then: Callable[[], None] | None = None) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; ``then`` runs after its COMMIT, still holding it."""
        db = self.db
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself on a full disk
                    db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")
                if then is not None:
                    then()

    # -- streams ------------------------------------------------------------------------------
    def register_stream(self, stream: str, priority: int, compact: bool = False) -> None:
        st = self._streams.get(stream)
        if st is None or st.priority != priority or self._compact.get(stream) != compact:
            try:
                with self._tx() as db:
                    db.execute(
                        "INSERT INTO streams(stream, priority, compact) VALUES (?, ?, ?) "
                        "ON CONFLICT(stream) DO UPDATE SET priority=excluded.priority, "
                        "compact=excluded.compact",
                        (stream, priority, int(compact)),
                    )
            except sqlite3.Error as exc:
                raise disk.storage_error("outbox stream registration failed", self.path,
                                         exc) from None
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
        note: bytes | None = None,
    ) -> CommitReport:
        """Store chunks, dead letters and checkpoint in one transaction (one fsync).
        ``note``: the source positions of this checkpoint, small, also kept in the
        ``outbox.seqs`` note (`edgewise.outbox.numbering`: a file that loses its latest
        commits continues its sources from there instead of producing their records again).

        Raises `OutboxDiskFull` (nothing stored) when the disk is full even after evicting
        what this commit may evict, `StorageError` for any other failure."""
        encoded = []
        for pc in chunks:
            if pc.count == 0:
                continue
            if pc.stream not in self._streams:
                raise StorageError(f"stream {pc.stream!r} is not registered")
            if pc.lost is not None:
                encoded.append((pc, b"", None, None))
                continue
            payload = self._seal(pc.stream, codec.encode(pc.columns))
            ts = pc.columns.get("ts")
            ts_first = float(np.min(ts)) if ts is not None and ts.dtype.kind == "f" else None
            ts_last = float(np.max(ts)) if ts is not None and ts.dtype.kind == "f" else None
            encoded.append((pc, payload, ts_first, ts_last))
        for attempt in (1, 2):
            try:
                report = self._commit(encoded, dead, checkpoint, note)
                break
            except sqlite3.Error as exc:
                self._reload_after_failure()
                if not disk.is_disk_full(exc):
                    raise disk.storage_error("outbox commit failed", self.path, exc) from None
                if attempt == 2:
                    raise OutboxDiskFull(f"outbox commit failed ({self.path}): the disk is "
                                         "full and nothing more may be evicted") from None
                self._disk_full(exc)
        if self._frozen is not None:
            self._maybe_recover()
        elif not self._reserve_ok:  # at the first commit, once the engine set the bound
            self._reserve_ok = self.reserve.ensure()
        return report

    def _commit(self, encoded: list[tuple[PendingChunk, bytes, float | None, float | None]],
                dead: list[DeadLetter] | None, checkpoint: dict[str, bytes] | None,
                note: bytes | None) -> CommitReport:
        report = CommitReport()
        now = time.time()
        top = 0

        def noted() -> None:
            # before the lock is let go: `peek` (the uplink) never reads a chunk whose
            # numbers and source positions the note does not hold yet, so a file that later
            # loses its log continues from at least what the cloud may have
            if note is not None:
                self._note_positions = note
            if encoded:
                self._write_note()

        with self._tx(noted) as db:
            for pc, payload, ts_first, ts_last in encoded:
                st = self._streams[pc.stream]
                top = max(top, st.priority)
                seq = self._next_seq[pc.stream]
                self._next_seq[pc.stream] = seq + pc.count
                st.produced += pc.count
                cost = disk.row_cost(len(payload), self._page)
                if pc.lost is not None or not self._make_room(db, cost, st.priority, report):
                    st.dropped += pc.count
                    report.dropped[pc.stream] = report.dropped.get(pc.stream, 0) + pc.count
                    numbering.record_lost(db, pc.stream, seq, pc.count,
                                          pc.lost or self._drop_reason(), now)
                else:
                    db.execute(
                        "INSERT INTO chunks(stream, priority, seq_first, seq_count, records, "
                        "ts_first, ts_last, created, nbytes, payload) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (pc.stream, st.priority, seq, pc.count, pc.count, ts_first, ts_last,
                         now, len(payload), payload),
                    )
                    self._used += len(payload)
                    self._disk += cost
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
                    [(k, self._seal_extra(b"checkpoint " + k.encode(), v))
                     for k, v in checkpoint.items()],
                )
            if encoded:
                self._hold_bound(db, top, report)
        return report

    def _reload_after_failure(self) -> None:
        """Counters were changed inside a transaction that rolled back: read them again."""
        try:
            self._load()
        except sqlite3.Error:  # the database itself is gone; the caller raises
            with self._lock:
                self._streams, self._next_seq = {}, {}

    def _add_dead(self, db: sqlite3.Connection, dead: list[DeadLetter], now: float) -> None:
        db.executemany(
            "INSERT INTO dead_letters(created, source, reason, size, payload) VALUES (?,?,?,?,?)",
            [(now, d.source, d.reason, d.size, self._seal_extra(b"dead letter", d.payload))
             for d in dead],
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
            Chunk(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), self._open(r[1], r[7]))
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
                    self._disk -= disk.row_cost(nbytes, self._page)
                    acked += seq_count
                    db.execute("UPDATE streams SET acked=? WHERE stream=?", (st.acked, stream))
        except sqlite3.Error as exc:
            self._reload_after_failure()
            raise disk.storage_error("outbox ack failed", self.path, exc) from None
        return acked

    # -- checkpoint and inspection ------------------------------------------------------------
    def load_checkpoint(self) -> dict[str, bytes]:
        with self._lock:
            rows = self.db.execute("SELECT key, value FROM checkpoint").fetchall()
        out = {k: self._open_extra(b"checkpoint " + k.encode(), v) for k, v in rows}
        if any(v is None for v in out.values()):
            raise StorageError(f"{self.path}: the checkpoint is encrypted; open the outbox with "
                               "its key (the agent's --tpm)")
        return out  # type: ignore[return-value]

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute(
                "SELECT id, created, source, reason, size, payload FROM dead_letters "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {"id": r[0], "created": r[1], "source": r[2], "reason": r[3], "size": r[4],
             "payload": self._open_extra(b"dead letter", r[5]),
             "encrypted": bool(r[5]) and r[5].startswith(SEALED)}
            for r in rows
        ]

    def read_stream(self, stream: str) -> dict[str, np.ndarray]:
        """Every pending record of a stream, decoded and concatenated (tests and tools)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT payload FROM chunks WHERE stream=? ORDER BY seq_first", (stream,)
            ).fetchall()
        decoded = (codec.decode(self._open(stream, r[0])) for r in rows)
        return concat_columns((c, len(next(iter(c.values()), ()))) for c in decoded)

    def _seal(self, stream: str, payload: bytes) -> bytes:
        return payload if self.cipher is None else self.cipher.seal(payload, stream.encode())

    def _open(self, stream: str, payload: bytes) -> bytes:
        return payload if self.cipher is None else self.cipher.open(payload, stream.encode())

    def _seal_extra(self, what: bytes, data: bytes | None) -> bytes | None:
        """A dead letter's payload or a checkpoint value as stored (sealed with a cipher)."""
        return data if data is None or self.cipher is None else \
            SEALED + self.cipher.seal(data, what)

    def _open_extra(self, what: bytes, data: bytes | None) -> bytes | None:
        """`_seal_extra` undone; None for a sealed value without the cipher."""
        if data is None or not data.startswith(SEALED):
            return data  # stored in clear (no cipher, or before it was given)
        return None if self.cipher is None else self.cipher.open(data[len(SEALED):], what)

    def capacity(self) -> int:
        """Bytes on disk the chunk rows may take now (`edgewise.outbox.disk`)."""
        return self._capacity()

    @property
    def chunk_bytes(self) -> int:
        """Bytes on disk of the stored chunk rows (estimated; checked after each commit)."""
        return self._disk

    @property
    def used_bytes(self) -> int:
        """Payload bytes of the stored chunks (`health` has the bytes on disk)."""
        return self._used

    def stats(self) -> dict[str, StreamStats]:
        return {k: StreamStats(**vars(v)) for k, v in self._streams.items()}
