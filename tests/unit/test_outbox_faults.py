"""The outbox under faults (docs/agent.md, "Faults"): the bound is what its files take on disk,
a new or rewound file never reuses a sequence number, a re-enrolled node numbers its pending
records from its new mark, a full disk evicts lower priorities and keeps the rest in memory, and
a damaged file is moved aside with what it held recorded as lost."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from edgewise.errors import StorageError
from edgewise.outbox import DeadLetter, Outbox, OutboxDiskFull, PendingChunk, disk, numbering
from edgewise.outbox.numbering import REPLACED, REWOUND, UNSURE, SentBefore
from edgewise.outbox.quarantine import open_outbox
from edgewise.outbox.view import OutboxView
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.commit import HOLD_FACTOR, Committer


def raw(n: int, seed: int = 0, first: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = np.empty(n, dtype=object)
    names[:] = [f"s{i % 4}" for i in range(n)]
    return {"sensor": names, "ts": 1000.0 + (first + np.arange(n)) / 10,
            "value": np.round(rng.uniform(0, 100, n), 2)}


def chunk(stream: str, n: int, seed: int = 0) -> PendingChunk:
    return PendingChunk(stream, raw(n, seed), n)


def files(path: Path) -> int:
    """What the outbox takes on disk: the database, its write-ahead log, the reserve file."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-reserve"))
               if p.exists())


def ranges(ob: Outbox, stream: str) -> list[tuple[int, int]]:
    return ob.db.execute("SELECT seq_first, seq_count FROM chunks WHERE stream=? "
                         "ORDER BY seq_first", (stream,)).fetchall()


def lost(ob: Outbox) -> list[tuple[str, int, int, str]]:
    return [(r.stream, r.seq_first, r.seq_count, r.reason) for r in ob.lost_ranges()]


# -- the bound on disk (finding 10) ------------------------------------------------------------


def test_the_bound_is_what_the_files_take_on_disk(tmp_path: Path) -> None:
    """A 2 MiB bound: the database, its log and the reserve file stay within 2 MiB at every
    commit (they grew to 3x the bound when it counted payload only), and every record evicted
    is a lost range."""
    path = tmp_path / "o.db"
    bound = 2 * 1024 * 1024
    largest = 0
    with Outbox(path, max_bytes=bound, sync="normal") as ob:
        ob.register_stream("raw", 1)
        ob.register_stream("alarms", 9)
        for i in range(600):
            ob.commit([chunk("raw", 3000, seed=i), chunk("alarms", 5, seed=i)], None,
                      {"engine": os.urandom(2000)})
            largest = max(largest, files(path))
        st = ob.stats()
        dropped = st["raw"].dropped
        gone = sum(c for s, _f, c, _r in lost(ob) if s == "raw")
        kept = sum(c for _f, c in ranges(ob, "raw"))
    assert largest <= bound, (largest, bound)
    assert dropped > 1_000_000 and st["alarms"].dropped == 0
    assert gone == dropped and kept + dropped == 600 * 3000  # every record: kept or lost


# -- continuity across files (findings 3 and 4: moved away, write-ahead log lost) --------------


def test_an_outbox_moved_away_is_followed_by_one_that_continues_its_numbers(
        tmp_path: Path) -> None:
    path = tmp_path / "engine" / "outbox.db"
    with Outbox(path) as ob:
        ob.register_stream("alarms", 9)
        ob.commit([chunk("alarms", 40)])
        ob.reconcile("node-1", {"alarms": 0})
        ob.commit([chunk("alarms", 60)])
    aside = tmp_path / "aside"
    aside.mkdir()
    for p in path.parent.glob("outbox.db*"):  # what `mv outbox.db* elsewhere/` takes
        shutil.move(p, aside / p.name)
    with Outbox(path) as ob:
        assert ob.numbered_for == "node-1"
        ob.register_stream("alarms", 9)
        ob.commit([chunk("alarms", 5)])
        assert ranges(ob, "alarms") == [(100, 5)]  # never 0 again: the cloud has 0..99
        assert lost(ob) == [("alarms", 0, 100, REPLACED)]  # what the cloud lacks of it is lost
        assert [r.exact for r in ob.lost_ranges()] == [False]
        assert ob.continued == {"alarms": (0, 100)}


def test_an_outbox_that_lost_its_write_ahead_log_continues_above_what_it_had(
        tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as ob:
        ob.register_stream("raw", 5)
        for i in range(5):
            ob.commit([chunk("raw", 100, seed=i)])
        ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copy(path, tmp_path / "checkpointed.db")  # the file as it was at the checkpoint
        for i in range(3):
            ob.commit([chunk("raw", 100, seed=10 + i)])
    # the write-ahead log is gone: the file is back at 500 records
    os.replace(tmp_path / "checkpointed.db", path)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with Outbox(path) as ob:
        ob.register_stream("raw", 5)
        ob.commit([chunk("raw", 7)])
        assert ranges(ob, "raw")[-1] == (800, 7)
        assert lost(ob) == [("raw", 500, 300, REWOUND)]


def test_the_uplink_sees_a_commit_only_once_the_note_covering_it_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk sent before its commit's note is written, then the process killed and the log
    lost: the note's positions are a commit behind what the cloud holds, and the sources
    produce that commit's records again under new numbers (a duplicate the cloud cannot see).
    So `peek` waits for the note of the commit it would read."""
    path = tmp_path / "outbox.db"
    with Outbox(path) as ob:
        ob.register_stream("raw", 5)
        ob.commit([chunk("raw", 100)], note=b"first")
        writing, release = threading.Event(), threading.Event()
        real = numbering.write_note

        def held(*args: object, **kw: object) -> None:
            writing.set()
            release.wait(10)
            real(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(numbering, "write_note", held)
        committer = threading.Thread(target=ob.commit, args=([chunk("raw", 50, seed=1)],),
                                     kwargs={"note": b"second"})
        committer.start()
        assert writing.wait(10)  # committed to the database, its note not yet written
        seen: list[list[int]] = []
        peeker = threading.Thread(target=lambda: seen.append(
            [c.seq_count for c in ob.peek()]))
        peeker.start()
        peeker.join(0.5)
        assert seen == []  # before: [100, 50] while the note still said 100 and "first"
        release.set()
        committer.join(10)
        peeker.join(10)
        assert seen == [[100, 50]]
        note = numbering.read_note(path)
        assert note is not None and note.next_seq == {"raw": 150}
        assert note.positions == b"second"


# -- a new node id (finding 8) -----------------------------------------------------------------


def test_after_reenrolment_pending_chunks_are_numbered_from_the_new_ids_mark(
        tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.register_stream("agg", 5)
        assert ob.reconcile("node-1", {"agg": 0}).kind == "adopted"
        for i in range(3):
            ob.commit([chunk("agg", 50, seed=i)])
        # 150..199 given up (evicted, not yet reported): really lost
        ob.commit([PendingChunk("agg", {}, 50, lost="dropped: outbox full")])
        first, second, _ = ob.peek(1 << 30)
        ob.ack([first.id, second.id])  # 0..99 stored under node-1
        assert ob.reconcile("node-1", {"agg": 100}).kind == ""
        done = ob.reconcile("node-2", {})
        assert done.kind == "renumbered" and done.streams == {"agg": 100}
        # the pending chunk and the lost range, densely from 0: nothing of node-1's 0..99
        assert ranges(ob, "agg") == [(0, 50)]
        assert lost(ob) == [("agg", 50, 50, "dropped: outbox full")]
        ob.commit([chunk("agg", 10)])
        assert ranges(ob, "agg") == [(0, 50), (100, 10)]
        assert ob.numbered_for == "node-2"


def test_after_reenrolment_what_the_old_id_sent_unacknowledged_is_not_sent_again(
        tmp_path: Path) -> None:
    """The old id's uplink sent 0..99 and the cloud's mark was 50 when the identity went:
    50..99 may be stored under the old id (its acknowledgement never came), so sending it under
    the new id could store it twice. It becomes a lost range naming the old id; 0..49 (stored
    there) is deleted; 100..149 (never sent) is numbered from the new id's mark."""
    with Outbox(tmp_path / "o.db") as ob:
        ob.register_stream("agg", 5)
        assert ob.reconcile("node-1", {"agg": 0}).kind == "adopted"
        for i in range(3):
            ob.commit([chunk("agg", 50, seed=i)])
        done = ob.reconcile("node-2", {}, SentBefore("node-1", {"agg": 100}, {"agg": 50}))
        assert done.kind == "renumbered" and done.unsure == 50
        assert ranges(ob, "agg") == [(50, 50)]  # what was never sent
        reason = UNSURE.format(node="node-1", first=50, last=99)
        assert lost(ob) == [("agg", 0, 50, reason)]
        st = ob.stats()["agg"]
        assert (st.acked, st.dropped, st.pending_records) == (50, 50, 50)


def test_a_welcome_above_an_outbox_that_knows_nothing_moves_its_numbers_up(
        tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.register_stream("agg", 5)
        ob.commit([chunk("agg", 30)])
        done = ob.reconcile("node-1", {"agg": 1000})
        assert done.kind == "moved" and done.streams == {"agg": 1030}
        assert ranges(ob, "agg") == [(1000, 30)]


def test_a_reload_on_another_thread_during_a_commit_does_not_break_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine commits in an executor thread while a welcome renumbers on the event loop
    and reads the counters again. Done in the middle of a commit, the reload once replaced the
    counters with those before the commit: the next commit reused sequence numbers (and CI
    once saw KeyError: 'alarms' and a pipeline restart)."""
    with Outbox(tmp_path / "o.db") as ob:
        ob.register_stream("alarms", 9)
        ob.commit([chunk("alarms", 5)])
        real_row_cost = disk.row_cost
        reloads: list[threading.Thread] = []

        def row_cost_with_a_reload(nbytes: int, page: int) -> int:
            if not reloads and threading.current_thread() is threading.main_thread():
                # once, inside the next commit's transaction, after it counted its records
                reloads.append(threading.Thread(target=ob._load))
                reloads[0].start()
                reloads[0].join(0.3)  # the reload waits for the commit (or breaks it)
            return real_row_cost(nbytes, page)

        monkeypatch.setattr(disk, "row_cost", row_cost_with_a_reload)
        ob.commit([chunk("alarms", 7, seed=1)])
        reloads[0].join(5)
        assert not reloads[0].is_alive()
        ob.commit([chunk("alarms", 3, seed=2)])
        assert ranges(ob, "alarms") == [(0, 5), (5, 7), (12, 3)]
        assert ob.stats()["alarms"].produced == 15 and ob.stats()["alarms"].pending_records == 15


# -- a full disk (finding 7) --------------------------------------------------------------------


def test_a_full_disk_evicts_lower_priorities_for_new_records_then_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file may not grow (SQLite's max_page_count and no free bytes stand in for a full
    disk): alarms are stored by evicting raw records, each eviction a lost range "dropped: disk
    full"; a commit with nothing to evict raises `OutboxDiskFull` and stores nothing."""
    monkeypatch.setattr(disk, "free_bytes", lambda directory: 0)
    with Outbox(tmp_path / "o.db") as ob:
        ob.register_stream("raw", 1)
        ob.register_stream("alarms", 9)
        for i in range(60):
            ob.commit([chunk("raw", 3000, seed=i)])
        pages = ob.db.execute("PRAGMA page_count").fetchone()[0]
        ob.db.execute(f"PRAGMA max_page_count={pages}")
        for i in range(10):
            ob.commit([chunk("alarms", 3000, seed=100 + i)])
        h = ob.health()
        assert h.state == "disk full" and h.error is not None
        assert ob.stats()["alarms"].pending_records == 30_000
        assert ob.stats()["alarms"].dropped == 0
        dropped = ob.stats()["raw"].dropped
        assert dropped > 0
        assert {r for _s, _f, _c, r in lost(ob)} == {"dropped: disk full"}
        assert sum(c for _s, _f, c, _r in lost(ob)) == dropped
        # more than the outbox holds now: the newcomer itself is given up, with the reason
        assert ob.commit([chunk("alarms", 200_000, seed=7)]).dropped == {"alarms": 200_000}
        assert lost(ob)[-1] == ("alarms", 30_000, 200_000, "dropped: disk full")
        # nothing to evict for (dead letters are not evicted): nothing stored, raised
        before = ob.stats()
        big = [DeadLetter("src", "bad", os.urandom(4096), 4096) for _ in range(100)]
        with pytest.raises(OutboxDiskFull):
            ob.commit([chunk("raw", 10)], big)
        assert ob.stats() == before and ob.dead_letter_count == 0
        ob.db.execute("PRAGMA max_page_count=1073741823")  # room again
        monkeypatch.undo()
        ob.commit([chunk("raw", 10)])
        assert ob.health().state == "ok"


async def test_the_committer_keeps_records_while_the_disk_is_full_and_sheds_beyond_its_hold(
        tmp_path: Path) -> None:
    """`OutboxDiskFull` is not an error of the run: the records wait and are stored once
    the disk has room; beyond the hold the oldest of the lowest priority become a lost range."""
    with Outbox(tmp_path / "o.db") as ob:
        ob.register_stream("raw", 1)
        ob.register_stream("alarms", 9)
        full = True
        real_commit = ob.commit

        def commit(*args, **kw):  # type: ignore[no-untyped-def]
            if full:
                raise OutboxDiskFull("the disk is full")
            return real_commit(*args, **kw)

        ob.commit = commit  # type: ignore[method-assign]
        acked = []
        com = Committer(ob, lambda pos: {"engine": repr(pos).encode()},
                        lambda pos, rep: acked.append(pos), max_pending_records=100)
        try:
            for i in range(10):
                com.add("alarms", Batch(raw(1, seed=i)))
                com.position("src", i)
                com.kick()
                await asyncio.sleep(0.01)
            for i in range(10):
                com.add("raw", Batch(raw(100, seed=i)))
                com.kick()
            await com.wait()
            assert com.error is None and com.disk_full_since is not None
            # whole batches of the lowest priority, oldest first, down to the hold
            assert com.lost_in_memory >= 1010 - HOLD_FACTOR * 100
            assert com.lost_in_memory % 100 == 0 and ob.health().held_records <= 400
            full = False
            await com.drain()
        finally:
            com.close()
        st = ob.stats()
        assert st["alarms"].pending_records == 10  # every alarm stored, once
        assert st["raw"].produced == 1000 and st["raw"].dropped == com.lost_in_memory
        assert lost(ob) == [("raw", 0, com.lost_in_memory, "dropped: disk full")]
        assert ranges(ob, "raw") == [(com.lost_in_memory, 1000 - com.lost_in_memory)]
        assert acked and acked[-1] == {"src": 9}
        assert ob.load_checkpoint() == {"engine": repr({"src": 9}).encode()}


# -- a damaged file (finding 4) -----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "zero-header", "garbage-pages"])
def test_a_damaged_outbox_is_moved_aside_and_a_new_one_continues_its_numbers(
        tmp_path: Path, damage: str) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as ob:
        ob.register_stream("raw", 5)
        for i in range(200):
            ob.commit([chunk("raw", 500, seed=i)])
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        elif damage == "zero-header":
            f.write(b"\0" * 8192)
        else:
            f.seek(4096 * 3)
            f.write(os.urandom(4096 * 4))
    with pytest.raises(StorageError):  # `agent status` reads it: one line, no traceback
        OutboxView(path).snapshot()
    ob = Outbox(path)
    q = open_outbox(ob)
    try:
        assert q is not None
        assert q.moved_to.exists() and q.moved_to.name.startswith("outbox.db.damaged-")
        assert q.moved_to.stat().st_size > 0  # kept, never deleted
        assert q.lost == {"raw": (0, 100_000)}
        ob.register_stream("raw", 5)
        ob.commit([chunk("raw", 3)])
        assert ranges(ob, "raw") == [(100_000, 3)]
        [(stream, first, count, reason)] = lost(ob)
        assert (stream, first, count) == ("raw", 0, 100_000)
        assert q.moved_to.name in reason and reason.startswith("lost: the outbox was damaged")
    finally:
        ob.close()
    again = Outbox(path)  # the new one is healthy: opened as it is
    assert open_outbox(again) is None
    try:
        assert ranges(again, "raw") == [(100_000, 3)]
    finally:
        again.close()


def _with_positions(path: Path, commits: int = 3) -> bytes:
    """An outbox whose last commit carried source positions (as the engine's do); returns
    those positions."""
    note = b""
    with Outbox(path) as ob:
        ob.register_stream("raw", 5)
        for i in range(commits):
            note = f"positions after commit {i}".encode()
            ob.commit([chunk("raw", 50, seed=i)], checkpoint={"engine": b"state"}, note=note)
    return note


@pytest.mark.parametrize("fault", ["moved-away", "damaged", "rewound"])
def test_a_new_or_rewound_file_hands_on_the_notes_source_positions(
        tmp_path: Path, fault: str) -> None:
    """Whatever happened to the file, its note's positions go on to the engine, once: its
    sources continue from the last commit made instead of producing again, under new numbers,
    what the cloud may hold (a new file used to start them from the beginning)."""
    path = tmp_path / "outbox.db"
    if fault == "rewound":
        with Outbox(path) as ob:
            ob.register_stream("raw", 5)
            ob.commit([chunk("raw", 50)], checkpoint={"engine": b"state"}, note=b"first")
            ob.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copy(path, tmp_path / "checkpointed.db")
        last = _with_positions(path)
        os.replace(tmp_path / "checkpointed.db", path)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        last = _with_positions(path)
        if fault == "moved-away":
            for p in path.parent.glob("outbox.db*"):
                p.unlink()
        else:
            with open(path, "r+b") as f:
                f.write(b"\0" * 8192)
    ob = Outbox(path)
    try:
        open_outbox(ob)
        assert ob.take_rewound() == last
        assert ob.take_rewound() is None  # once
    finally:
        ob.close()
    again = Outbox(path)  # the next start is an ordinary one: the new file's own checkpoint
    try:
        open_outbox(again)
        assert again.take_rewound() is None
    finally:
        again.close()


def test_a_note_of_another_file_or_a_file_with_its_own_checkpoint_hands_on_nothing(
        tmp_path: Path) -> None:
    """The note's positions are not given to a file that has a checkpoint of its own (it was
    put there with its state), nor in place of a damaged file that tells another epoch."""
    path = tmp_path / "outbox.db"
    _with_positions(path)
    other = tmp_path / "other" / "outbox.db"
    _with_positions(other)
    for p in path.parent.glob("outbox.db*"):
        p.unlink()
    shutil.copy(other, path)  # another outbox, with its checkpoint, in its place
    with Outbox(path) as ob:
        assert ob.take_rewound() is None
    _with_positions(path)
    for p in path.parent.glob("outbox.db*"):
        p.unlink()
    ob = Outbox(path)  # in place of a damaged file that tells another epoch than the note's
    try:
        ob.open(floors={"raw": 150}, reason="lost: test", replaced_epoch="0123456789abcdef")
        assert ob.take_rewound() is None
    finally:
        ob.close()


def test_a_damaged_outbox_that_cannot_be_moved_is_one_line_naming_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"not sqlite at all" * 500)

    def no_rename(*a: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(StorageError) as info:
        open_outbox(Outbox(path))
    text = str(info.value)
    assert "\n" not in text and "cannot be moved aside" in text and f"mv {path}" in text


def test_an_outbox_of_an_older_version_opens_with_the_new_tables(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE streams (stream TEXT PRIMARY KEY, priority INTEGER NOT NULL,
            compact INTEGER NOT NULL DEFAULT 0, next_seq INTEGER NOT NULL DEFAULT 0,
            produced INTEGER NOT NULL DEFAULT 0, acked INTEGER NOT NULL DEFAULT 0,
            dropped INTEGER NOT NULL DEFAULT 0, compacted INTEGER NOT NULL DEFAULT 0,
            dropped_reported INTEGER NOT NULL DEFAULT 0);
        INSERT INTO streams(stream, priority, next_seq, produced) VALUES ('a', 5, 70, 70);
    """)
    db.close()
    assert OutboxView(path).snapshot().lost == []  # read-only: no lost table yet, no error
    with Outbox(path) as ob:
        assert ob.meta["origin"] == "adopted" and ob.numbered_for is None
        ob.commit([chunk("a", 3)])
        assert ranges(ob, "a") == [(70, 3)] and lost(ob) == []
