"""Sequence numbers that never collide, and lost ranges that are always reported.

The cloud dedupes by (node, stream, seq) and keeps a contiguous mark per stream, so a number the
cloud has seen must never be given to another record: it would be taken as a duplicate and
deleted as acknowledged. And every number given out must end up stored in the cloud or reported
as lost, with a reason. Three things keep that true (docs/agent.md, "Faults"):

* **Lost ranges.** Every eviction (a chunk dropped or a newcomer refused when full, a disk that
  is full) records its sequence range in the ``lost`` table, with its reason, in the transaction
  that drops the records. The uplink reports each as a ``gap`` (chunks in flight included: the
  cloud records as lost only what it does not hold) and the row is forgotten once the cloud's
  contiguous mark has passed it (`forget_lost`). A row with ``exact`` 0 is an upper bound: the
  range of a replaced outbox, part of which the cloud may hold.
* **Continuity across files** (`note`, `continue_from`). After each commit the outbox writes
  ``outbox.seqs`` beside the database (no fsync: a view), holding the file's epoch and the next
  numbers. An outbox opened behind its note (a new file where the old one was moved away or
  quarantined, or a file that lost its write-ahead log) continues from the note's numbers, and
  the range in between is recorded as lost (an upper bound). The agent does the same with the
  uplink ledger's highest numbers sent. The note also keeps the source positions of the commit
  that gave its numbers: a file behind its own note, or a new file with no checkpoint in place
  of the note's file, hands them to the engine (`take_rewound`), whose sources continue from
  there rather than produce again, under new numbers, what the cloud may hold.
* **A welcome from another node id** (`reconcile`): the first welcome adopts the node id; if the
  cloud's mark is above this outbox's numbers (an outbox with no note and no ledger), the stream
  is moved up above the mark. After a re-enrolment (a new node id), the pending chunks and the
  unreported lost ranges are numbered again from the new id's mark, densely: what was stored
  under the old id is not a gap of the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from edgewise.outbox.disk import storage_error
from edgewise.outbox.records import LostRange, OutboxHealth
from edgewise.outbox.schema import set_meta

REPLACED = "lost: the outbox file was replaced (records pending in the previous file)"
REWOUND = ("lost: the outbox lost its latest commits (write-ahead log missing, or a power "
           "loss with sync: normal)")
BEHIND = ("lost: the outbox is behind the numbers its uplink sent (replaced, or it lost its "
          "latest commits)")
UNSURE = ("lost: sent as node {node} seq {first}..{last} before this node enrolled again, "
          "never acknowledged; the control plane may hold it under {node}")
DROPPED_FULL = "dropped: outbox full"
DROPPED_DISK = "dropped: disk full"


def note_path(db_path: Path) -> Path:
    """``outbox.db`` → ``outbox.seqs``."""
    return db_path.with_suffix(".seqs")


MAX_NOTE_POSITIONS = 4096  # bytes of source positions kept in the note (more: not kept)


@dataclass
class Note:
    epoch: str
    generation: str
    numbered_for: str | None
    next_seq: dict[str, int] = field(default_factory=dict)
    positions: bytes | None = None  # the engine's source positions of the same commit


def read_note(db_path: Path) -> Note | None:
    try:
        path = note_path(db_path)
        if path.stat().st_size > 1 << 20:  # ours are a few KiB: not one of ours
            return None
        raw = json.loads(path.read_text())
        pos = raw.get("positions")
        positions = (bytes.fromhex(pos) if isinstance(pos, str)
                     and len(pos) <= 2 * MAX_NOTE_POSITIONS else None)
        return Note(str(raw["epoch"]), str(raw["generation"]), raw.get("numbered_for"),
                    {str(k): int(v) for k, v in raw["next_seq"].items()}, positions)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_note(db_path: Path, meta: dict[str, str], next_seq: dict[str, int],
               positions: bytes | None = None) -> None:
    """Best effort, cheap enough for every commit: written over itself, padded with spaces
    to a multiple of 512 bytes (no new blocks on a full disk, no torn JSON after a crash).
    ``positions`` (the engine's source positions of the commit that gave these numbers) is
    kept up to `MAX_NOTE_POSITIONS` bytes."""
    note: dict[str, object] = {"epoch": meta["epoch"], "generation": meta.get("generation", "0"),
                               "numbered_for": meta.get("numbered_for"), "next_seq": next_seq}
    if positions is not None and len(positions) <= MAX_NOTE_POSITIONS:
        note["positions"] = positions.hex()
    data = json.dumps(note).encode()
    data += b" " * (-len(data) % 512)
    with contextlib.suppress(OSError):
        fd = os.open(note_path(db_path), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size  # never shorter: no stale tail after the JSON
            os.pwrite(fd, data + b" " * (size - len(data)) if size > len(data) else data, 0)
        finally:
            os.close(fd)


def floors_from_note(note: Note | None, meta: dict[str, str]) -> tuple[dict[str, int], str]:
    """The numbers this database must continue from, and why (empty if it is not behind)."""
    if note is None:
        return {}, ""
    if note.epoch != meta["epoch"]:
        return note.next_seq, REPLACED
    if note.generation == meta.get("generation", "0"):
        return note.next_seq, REWOUND
    return {}, ""  # the note is of an earlier numbering of this same file


def record_lost(db: sqlite3.Connection, stream: str, first: int, count: int, reason: str,
                now: float, exact: bool = True) -> None:
    """Add a lost range (inside the caller's transaction), merged into the stream's last one
    when it continues it for the same reason and was not reported yet."""
    if count <= 0:
        return
    row = db.execute(
        "SELECT id, seq_first, seq_count, reason, exact, reported_to FROM lost WHERE stream=? "
        "ORDER BY id DESC LIMIT 1", (stream,)).fetchone()
    if (row is not None and row[1] + row[2] == first and row[3] == reason
            and bool(row[4]) == exact and row[5] is None):
        db.execute("UPDATE lost SET seq_count=? WHERE id=?", (row[2] + count, row[0]))
        return
    db.execute("INSERT INTO lost(stream, seq_first, seq_count, exact, reason, created) "
               "VALUES (?, ?, ?, ?, ?, ?)", (stream, first, count, int(exact), reason, now))


def continue_from(db: sqlite3.Connection, floors: dict[str, int], lows: dict[str, int],
                  reason: str) -> dict[str, tuple[int, int]]:
    """Move each stream's next number up to its floor (inside the caller's transaction);
    what lies between (from ``lows`` if higher) is recorded as lost, an upper bound. Streams
    not registered yet get a row (priority 0 until the engine registers them). Returns
    ``{stream: (first, count)}`` of the ranges recorded."""
    now = time.time()
    out = {}
    for stream, floor in sorted(floors.items()):
        row = db.execute("SELECT next_seq FROM streams WHERE stream=?", (stream,)).fetchone()
        next_seq = row[0] if row is not None else 0
        if floor <= next_seq:
            continue
        if row is None:
            db.execute("INSERT INTO streams(stream, priority, next_seq) VALUES (?, 0, ?)",
                       (stream, floor))
        else:
            db.execute("UPDATE streams SET next_seq=? WHERE stream=?", (floor, stream))
        first = max(next_seq, lows.get(stream, 0))
        if first < floor:
            record_lost(db, stream, first, floor - first, reason, now, exact=False)
            out[stream] = (first, floor - first)
    return out


@dataclass
class Reconciled:
    """What `reconcile` did: ``kind`` is "", "adopted", "moved" or "renumbered"."""

    kind: str = ""
    streams: dict[str, int] = field(default_factory=dict)  # stream -> its new next_seq
    dropped_ranges: int = 0  # lost ranges of the old id that the new one is not told about
    unsure: int = 0  # records sent under the old id, unacknowledged: reported lost (`UNSURE`)


@dataclass
class SentBefore:
    """What the uplink of node id ``node`` sent (its ledger): per stream the end of the
    highest range sent, and the control plane's contiguous mark at its last welcome."""

    node: str
    high: dict[str, int]
    marks: dict[str, int]


def reconcile(db: sqlite3.Connection, meta: dict[str, str], node_id: str,
              marks: dict[str, int], sent: SentBefore | None = None) -> Reconciled:
    """Make this outbox's numbers those of ``node_id`` (inside the caller's transaction).

    After a re-enrolment, ``sent`` says what the old id's uplink sent (`SentBefore`): a
    pending chunk below the old id's mark is stored there and is deleted; one sent above it
    (its acknowledgement never came) may be stored there too, so it is not sent again under
    the new id, where it would be stored twice: it becomes a lost range whose reason names the
    old id and its numbers there."""
    numbered = meta.get("numbered_for")
    if numbered == node_id:
        return Reconciled()
    streams = {s: n for s, n in db.execute("SELECT stream, next_seq FROM streams")}
    result = Reconciled("adopted")
    if numbered is None:
        for stream, mark in sorted(marks.items()):
            if stream not in streams or mark <= streams[stream]:
                continue
            lowest = min([streams[stream], *_firsts(db, stream)])
            delta = mark - lowest
            db.execute("UPDATE chunks SET seq_first=seq_first+? WHERE stream=?", (delta, stream))
            db.execute("UPDATE lost SET seq_first=seq_first+? WHERE stream=?", (delta, stream))
            db.execute("UPDATE streams SET next_seq=next_seq+? WHERE stream=?", (delta, stream))
            result.kind = "moved"
            result.streams[stream] = streams[stream] + delta
    else:
        result.kind = "renumbered"
        result.dropped_ranges = db.execute(
            "SELECT COUNT(*) FROM lost WHERE exact=0 OR reported_to IS NOT NULL").fetchone()[0]
        db.execute("DELETE FROM lost WHERE exact=0 OR reported_to IS NOT NULL")
        if sent is not None and sent.node == numbered:
            result.unsure = _settle_sent(db, numbered, sent)
        for stream in streams:
            nxt = marks.get(stream, 0)
            items = [("chunks", cid, first, count) for cid, first, count in db.execute(
                "SELECT id, seq_first, seq_count FROM chunks WHERE stream=?", (stream,))]
            items += [("lost", lid, first, count) for lid, first, count in db.execute(
                "SELECT id, seq_first, seq_count FROM lost WHERE stream=?", (stream,))]
            for table, rid, _first, count in sorted(items, key=lambda it: it[2]):
                db.execute(f"UPDATE {table} SET seq_first=? WHERE id=?", (nxt, rid))
                nxt += count
            db.execute("UPDATE streams SET next_seq=? WHERE stream=?", (nxt, stream))
            result.streams[stream] = nxt
    generation = str(int(meta.get("generation", "0")) + (result.kind != "adopted"))
    set_meta(db, numbered_for=node_id, generation=generation)
    meta.update(numbered_for=node_id, generation=generation)
    return result


def _settle_sent(db: sqlite3.Connection, old: str, sent: SentBefore) -> int:
    """Chunks the old id's uplink sent: deleted below its mark, lost ranges above (see
    `reconcile`); returns the records made lost."""
    unsure = 0
    for cid, stream, first, count, records in db.execute(
            "SELECT id, stream, seq_first, seq_count, records FROM chunks "
            "ORDER BY id").fetchall():
        if first >= sent.high.get(stream, 0):
            continue  # never sent under the old id
        db.execute("DELETE FROM chunks WHERE id=?", (cid,))
        if first + count <= sent.marks.get(stream, 0):  # stored under the old id
            db.execute("UPDATE streams SET acked=acked+? WHERE stream=?", (count, stream))
            continue
        unsure += records
        db.execute("UPDATE streams SET dropped=dropped+? WHERE stream=?", (records, stream))
        record_lost(db, stream, first, count, UNSURE.format(node=old, first=first,
                                                            last=first + count - 1),
                    time.time())
    return unsure


def _firsts(db: sqlite3.Connection, stream: str) -> list[int]:
    return [r[0] for r in db.execute(
        "SELECT MIN(seq_first) FROM chunks WHERE stream=? UNION ALL "
        "SELECT MIN(seq_first) FROM lost WHERE stream=?", (stream, stream)) if r[0] is not None]


def forget_lost(db: sqlite3.Connection, marks: dict[str, int]) -> int:
    """Forget lost ranges wholly below the cloud's marks (settled there); returns how many."""
    n = 0
    for stream, mark in marks.items():
        n += db.execute("DELETE FROM lost WHERE stream=? AND seq_first+seq_count<=?",
                        (stream, mark)).rowcount
    return n


def mark_reported(db: sqlite3.Connection, ids: list[int], node_id: str) -> None:
    db.executemany("UPDATE lost SET reported_to=? WHERE id=?", [(node_id, i) for i in ids])


class Numbered:
    """The numbering part of `edgewise.outbox.store.Outbox` (a mixin: state lives there)."""

    path: Path
    meta: dict[str, str]
    continued: dict[str, tuple[int, int]]
    health_state: OutboxHealth
    _lock: threading.Lock
    _note_lock: threading.Lock
    _next_seq: dict[str, int]
    _note_positions: bytes | None
    rewound_positions: bytes | None

    @property
    def db(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _tx(self, then: Callable[[], None] | None = None
            ) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    def _load_locked(self) -> None:
        raise NotImplementedError

    def _reload_after_failure(self) -> None:
        raise NotImplementedError

    def _has_checkpoint(self) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM checkpoint LIMIT 1").fetchone() is not None

    @property
    def numbered_for(self) -> str | None:
        """The node id whose sequence space this outbox's numbers are in (None: not yet)."""
        return self.meta.get("numbered_for")

    def _write_note(self) -> None:
        with self._note_lock:  # the last one written is the newest state
            write_note(self.path, self.meta, dict(self._next_seq), self._note_positions)

    def _noted(self, changed: bool) -> None:
        """After a transaction that moved numbers, still holding the lock (``_tx(then=...)``):
        the note is written before the uplink can read what the transaction changed."""
        if changed:
            self._write_note()

    def take_rewound(self) -> bytes | None:
        """The source positions to continue from, once, if this file lost its latest commits
        (`REWOUND`) or is a new file in place of the note's, and the note kept them (None
        otherwise; see `_continue_from_note`)."""
        positions, self.rewound_positions = self.rewound_positions, None
        return positions

    def _continue_from_note(self, floors: dict[str, int], reason: str | None,
                            replaced_epoch: str | None = None) -> None:
        """At open: continue the numbers above the note's (and ``floors``); hand the note's
        source positions on (`take_rewound`) to a file behind its own note, or to a new file
        with no checkpoint of its own beside the note of another, unless ``replaced_epoch``
        (the epoch of the damaged file this one replaces, "" if unreadable) is not the note's."""
        note = read_note(self.path)
        behind, why = floors_from_note(note, self.meta)
        if note is not None and note.epoch == self.meta["epoch"]:
            self._note_positions = note.positions  # kept until the next commit brings its own
        if behind and note is not None and self.numbered_for is None and note.numbered_for:
            with self._tx() as db:
                set_meta(db, numbered_for=note.numbered_for)
            self.meta["numbered_for"] = note.numbered_for
        for stream, n in behind.items():
            floors[stream] = max(floors.get(stream, 0), n)
        why = reason or why or REPLACED
        self.continued = self.continue_from(floors, {}, why) if floors else {}
        if note is not None and note.positions and (
                (self.continued and why == REWOUND)
                or (note.epoch != self.meta["epoch"] and replaced_epoch in (None, "", note.epoch)
                    and not self._has_checkpoint())):
            # the same file behind its own note, or a new file (no checkpoint of its own) in
            # place of the one the note is of (moved away, deleted, damaged): the records of
            # the commits lost with it are not produced again under new numbers (the cloud
            # may hold them); the engine continues its sources from the note's positions
            # (`take_rewound`)
            self.rewound_positions = note.positions
        for stream, (first, count) in self.continued.items():
            self.health_state.notes.append(
                f"stream {stream}: seq {first}..{first + count - 1} {why}")
        if not self.continued:
            self._write_note()

    def continue_from(self, floors: dict[str, int], lows: dict[str, int],
                      reason: str) -> dict[str, tuple[int, int]]:
        """Continue each stream's numbers from at least its floor; the range skipped is lost
        (an upper bound; see `continue_from` of this module)."""
        done: dict[str, tuple[int, int]] = {}
        try:  # the note too in the same hold of the lock (see `_noted`)
            with self._tx(lambda: self._noted(bool(done))) as db:
                done = continue_from(db, floors, lows, reason)
                if done:  # in the same hold of the lock: no commit sees the old numbers
                    self._load_locked()
        except sqlite3.Error as exc:
            self._reload_after_failure()
            raise storage_error("outbox renumbering failed", self.path, exc) from None
        return done

    def reconcile(self, node_id: str, marks: dict[str, int],
                  sent: SentBefore | None = None) -> Reconciled:
        """Make the numbers those of ``node_id`` (at a welcome; see `reconcile` above)."""
        result: Reconciled | None = None
        try:
            with self._tx(lambda: self._noted(result is not None and bool(result.kind))) as db:
                result = reconcile(db, self.meta, node_id, marks, sent)
                if result.kind:  # in the same hold of the lock: no commit sees the old numbers
                    self._load_locked()
        except sqlite3.Error as exc:
            self._reload_after_failure()
            raise storage_error("outbox renumbering failed", self.path, exc) from None
        assert result is not None  # set inside the transaction that did not fail
        return result

    def lost_ranges(self) -> list[LostRange]:
        with self._lock:
            rows = self.db.execute("SELECT id, stream, seq_first, seq_count, reason, exact, "
                                   "reported_to FROM lost ORDER BY id").fetchall()
        return [LostRange(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]

    def forget_lost(self, marks: dict[str, int]) -> int:
        """Forget lost ranges the cloud's marks have passed."""
        try:
            with self._tx() as db:
                return forget_lost(db, marks)
        except sqlite3.Error as exc:
            raise storage_error("outbox update failed", self.path, exc) from None

    def mark_reported(self, ids: list[int], node_id: str) -> None:
        if not ids:
            return
        try:
            with self._tx() as db:
                mark_reported(db, ids, node_id)
        except sqlite3.Error as exc:
            raise storage_error("outbox update failed", self.path, exc) from None
