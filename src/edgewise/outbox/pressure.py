"""The outbox under pressure: its bound on disk and a full disk (a part of `Outbox`).

`Pressure` is mixed into `edgewise.outbox.store.Outbox`; it holds the eviction path
(docs/architecture.md, principle 5: pressure is visible) and what happens when the disk is full
(`edgewise.outbox.disk`): every chunk evicted is counted and its range recorded as lost, with
the reason (`edgewise.outbox.numbering`). Called inside the store's transactions, under its lock
unless said otherwise.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import AbstractContextManager, suppress
from pathlib import Path

from edgewise.outbox import disk, numbering
from edgewise.outbox.compaction import compact_columns
from edgewise.outbox.policy import StoredChunk, choose_evictions
from edgewise.outbox.records import CommitReport, OutboxHealth, StreamStats
from edgewise.sync import codec


class Pressure:
    """Eviction to the bound, and the full disk; state lives in the `Outbox`."""

    path: Path
    max_bytes: int
    reserve: disk.Reserve
    health_state: OutboxHealth
    _lock: threading.Lock
    _streams: dict[str, StreamStats]
    _compact: dict[str, bool]
    _used: int
    _disk: int
    _fixed: int
    _page: int
    _frozen: int | None
    _reserve_ok: bool

    @property
    def db(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _seal(self, stream: str, payload: bytes) -> bytes:  # encryption at rest (`Outbox`)
        raise NotImplementedError

    def _open(self, stream: str, payload: bytes) -> bytes:
        raise NotImplementedError

    def _capacity(self) -> int:
        """Bytes the chunk rows may take: the bound less the log's share and the reserve file
        (or, while the disk is full, what they take now), less everything else in the file."""
        live = self.max_bytes - 2 * disk.wal_reserve(self.max_bytes)
        if self._frozen is not None:
            live = min(live, self._frozen)
        return live - self._fixed

    def _hold_bound(self, db: sqlite3.Connection, priority: int, report: CommitReport) -> None:
        """Measure the file as this commit leaves it; evict more if the estimates fell short."""
        for _ in range(3):
            live = disk.live_bytes(db)
            self._fixed = live - self._disk
            over = self._disk - self._capacity()
            if over <= 0 or not self._evict(db, over, priority, report):
                return

    def _drop_reason(self) -> str:
        return numbering.DROPPED_DISK if self._frozen is not None else numbering.DROPPED_FULL

    # -- a full disk (docs/agent.md, "Faults") -------------------------------------------------
    def _disk_full(self, exc: sqlite3.Error) -> None:
        """Give the checkpoint the reserve's room, and stop growing: commits from now on evict
        lower priorities to make room for what they store."""
        h = self.health_state
        if h.state != "disk full":
            h.state, h.since = "disk full", time.time()
        h.error = f"the disk is full ({exc}); the outbox stopped growing"
        self.reserve.release()
        self._reserve_ok = False
        with self._lock, suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with self._lock:  # free pages left for b-tree splits: the file must not grow at all
            self._frozen = self._disk + self._fixed - disk.SPLIT_PAGES * self._page

    def _maybe_recover(self) -> None:
        """The disk has room again (the reserve file fits): grow again up to the bound."""
        free = disk.free_bytes(self.path.parent)
        if free is None or free < 2 * self.reserve.size or not self.reserve.ensure():
            return
        self._reserve_ok = True
        self._frozen = None
        h = self.health_state
        h.state, h.since, h.error = "ok", time.time(), None

    def health(self) -> OutboxHealth:
        h = self.health_state
        h.disk_bytes = disk.file_bytes(self.path) + (
            self.reserve.size if self.reserve.present else 0)
        h.free_bytes = disk.free_bytes(self.path.parent)
        if h.state == "disk full" and self._frozen is not None:
            self._maybe_recover()  # also without commits (no pipeline running)
        return OutboxHealth(**vars(h))

    # -- eviction -----------------------------------------------------------------------------
    def _make_room(
        self, db: sqlite3.Connection, incoming: int, priority: int, report: CommitReport
    ) -> bool:
        cap = self._capacity()
        if self._disk + incoming <= cap:
            return True
        if incoming > cap:
            return False
        self._evict(db, self._disk + incoming - cap, priority, report)
        return self._disk + incoming <= cap

    def _evict(self, db: sqlite3.Connection, need: int, priority: int,
               report: CommitReport) -> bool:
        """Free ``need`` bytes of chunks of ``priority`` or lower (policy order); False if
        that much cannot be freed (nothing is evicted then)."""
        rows = db.execute(
            "SELECT id, stream, priority, nbytes, compacted FROM chunks "
            "WHERE priority <= ? ORDER BY priority, id LIMIT 10000",
            (priority,),
        ).fetchall()
        stored = [
            StoredChunk(cid, prio, disk.row_cost(nb, self._page),
                        self._compact.get(stream, False) and not comp)
            for cid, stream, prio, nb, comp in rows
        ]
        streams = {cid: stream for cid, stream, *_ in rows}
        evictions, ok = choose_evictions(stored, need, 0, priority, 0)
        goal = self._disk - need
        for ev in evictions:
            if self._disk <= goal:
                break
            if ev.action == "compact":
                self._compact_chunk(db, ev.chunk_id, streams[ev.chunk_id], report)
            else:
                self._drop_chunk(db, ev.chunk_id, streams[ev.chunk_id], report)
        return ok

    def _drop_chunk(
        self, db: sqlite3.Connection, cid: int, stream: str, report: CommitReport
    ) -> None:
        records, nbytes, first, count = db.execute(
            "SELECT records, nbytes, seq_first, seq_count FROM chunks WHERE id=?", (cid,)
        ).fetchone()
        db.execute("DELETE FROM chunks WHERE id=?", (cid,))
        st = self._streams[stream]
        st.dropped += records
        st.pending_records -= records
        st.pending_chunks -= 1
        st.pending_bytes -= nbytes
        self._used -= nbytes
        self._disk -= disk.row_cost(nbytes, self._page)
        report.dropped[stream] = report.dropped.get(stream, 0) + records
        db.execute("UPDATE streams SET dropped=? WHERE stream=?", (st.dropped, stream))
        numbering.record_lost(db, stream, first, count, self._drop_reason(), time.time())

    def _compact_chunk(
        self, db: sqlite3.Connection, cid: int, stream: str, report: CommitReport
    ) -> None:
        records, nbytes, payload = db.execute(
            "SELECT records, nbytes, payload FROM chunks WHERE id=?", (cid,)
        ).fetchone()
        cols = compact_columns(codec.decode(self._open(stream, payload)))
        new = self._seal(stream, codec.encode(cols))
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
        self._disk += disk.row_cost(len(new), self._page) - disk.row_cost(nbytes, self._page)
        report.compacted[stream] = report.compacted.get(stream, 0) + records
        db.execute("UPDATE streams SET compacted=? WHERE stream=?", (st.compacted, stream))

