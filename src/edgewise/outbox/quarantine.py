"""Opening the outbox of a long-running node: a damaged file is moved aside, never deleted.

`open_outbox` opens with a full check of the file (``PRAGMA quick_check``). A file that is not a
readable database (truncated, overwritten, corrupt) is **quarantined**: it and its write-ahead
log are renamed to ``outbox.db.damaged-<UTC time>`` (and ``-wal``, ``-shm``) beside it, and a new
outbox is started. The new file is a new epoch: it continues the sequence numbers from what the
damaged file still tells (its ``streams`` table, if readable) and from the ``outbox.seqs`` note
(`edgewise.outbox.numbering`), and the range in between is recorded as lost with the reason
naming the quarantined file, so the cloud hears of it as a gap (an upper bound: the cloud keeps
what it holds). The note's source positions go on too (unless the damaged file still tells an
epoch other than the note's): the pipeline continues its sources from the last commit made
instead of producing again, under new numbers, records the cloud may hold. If the file cannot
be moved aside, `StorageError` says in one line what to do.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgewise.errors import StorageError
from edgewise.outbox.store import Outbox, OutboxDamaged


@dataclass
class Quarantined:
    """A damaged outbox moved aside: where it went, why, and the ranges recorded as lost."""

    moved_to: Path
    error: str
    lost: dict[str, tuple[int, int]] = field(default_factory=dict)  # stream -> (first, count)

    def describe(self) -> str:
        return (f"the outbox was damaged ({self.error}); it was moved to {self.moved_to} and a "
                "new one started; what was pending in it is reported to the cloud as lost. "
                f"Keep {self.moved_to.name} for inspection or delete it")


def open_outbox(outbox: Outbox) -> Quarantined | None:
    """Open ``outbox`` (checked); quarantine it and open a new one if it is damaged."""
    try:
        outbox.open(check=True)
        return None
    except OutboxDamaged as exc:
        error = str(exc).rsplit(": ", 1)[-1]
    moved = move_aside(outbox.path, error)
    floors, epoch = read_floors(moved)
    reason = f"lost: the outbox was damaged ({error}); quarantined as {moved.name}"
    outbox.open(floors=floors, reason=reason, replaced_epoch=epoch)
    q = Quarantined(moved, error, dict(outbox.continued))
    outbox.health_state.notes.append(q.describe())
    return q


def move_aside(path: Path, error: str) -> Path:
    """Rename the database and its ``-wal``/``-shm`` to ``<name>.damaged-<time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    try:
        os.rename(path, target)
    except OSError as exc:
        raise StorageError(
            f"the outbox {path} is damaged ({error}) and cannot be moved aside "
            f"({exc.strerror or exc}); move it away by hand (mv {path} {target}) and start "
            "the agent again") from None
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{target}{suffix}")
    return target


def read_floors(path: Path) -> tuple[dict[str, int], str]:
    """The next sequence number of each stream of a damaged file and its epoch, as far as it
    still tells (``{}``, ``""`` where it does not)."""
    floors: dict[str, int] = {}
    epoch = ""
    for uri in (f"file:{path}?mode=ro", f"file:{path}?mode=ro&immutable=1"):
        try:
            db = sqlite3.connect(uri, uri=True)
            try:
                floors = floors or {str(s): int(n) for s, n in db.execute(
                    "SELECT stream, next_seq FROM streams")}
                row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
                epoch = str(row[0]) if row is not None else ""
                return floors, epoch
            finally:
                db.close()
        except (sqlite3.Error, ValueError, TypeError):
            continue
    return floors, epoch
