"""What the outbox takes on disk, and what it does when the disk is full. No policy, no counters.

**The bound** (`Outbox(max_bytes=...)`, the pipeline's ``outbox.max_bytes``) is the space the
outbox's files take on disk: ``outbox.db`` (live pages: chunks with their SQLite cells,
overflow pages and index entries, plus the streams, checkpoint, dead letters and lost ranges),
its write-ahead log (``-wal``, checkpointed and cut back to `wal_reserve`), and the reserve file
(``-reserve``, see below). It holds to within one group commit: a commit is stored, then the
file is measured and evicted back under the bound in the same transaction. Not counted: the
32 KiB ``-shm`` index and the small ``.seqs`` note (`edgewise.outbox.numbering`).

* `row_cost`: the bytes one chunk row of a given payload takes in the file (SQLite's cell
  layout: what stays in the leaf page, what goes to overflow pages, with leaf slack and the
  index entry). The eviction policy works in these bytes; `live_bytes` (page count minus free
  pages) is then checked against the bound after each commit, so estimates cannot let the file
  grow past it.
* `wal_reserve`: what the write-ahead log may take (1/8 of the bound, 32 KiB to 4 MiB);
  ``wal_autocheckpoint`` is half of it and ``journal_size_limit`` cuts the file back to it.

**A full disk** (SQLite's ``SQLITE_FULL``, `is_disk_full`): nothing can be written, not even a
checkpoint, because the log cannot be copied into a file that cannot grow. So the outbox keeps a
**reserve file** (`Reserve`, ``outbox.db-reserve``, as large as `wal_reserve`): when the disk
fills it is deleted, which gives the checkpoint its room; from then on the outbox stops growing
(its capacity is what it holds) and each commit evicts lower priorities to make room, reusing
free pages. Once the disk has room again (`free_bytes`) the reserve file is written again and
the outbox may grow up to its bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

from edgewise.errors import StorageError
from edgewise.outbox.records import OutboxDamaged

ROW_FIXED = 72  # bytes of a chunk row besides its payload: header, ids, ranges, times
INDEX_ENTRY = 32  # one entry of chunks_by_priority, with its page's slack
LEAF_SLACK = 1.25  # leaf pages are about 4/5 full after deletions
WAL_MIN, WAL_MAX = 32 * 1024, 4 * 1024 * 1024
SPLIT_PAGES = 8  # a full disk: pages kept free inside the file for b-tree page splits


def row_cost(nbytes: int, page_size: int = 4096) -> int:
    """Bytes a chunk row with ``nbytes`` of payload takes in the database file (estimate)."""
    usable = page_size
    max_local = usable - 35
    min_local = (usable - 12) * 32 // 255 - 23
    row = nbytes + ROW_FIXED
    if row <= max_local:
        local, overflow = row, 0
    else:
        local = min_local + (row - min_local) % (usable - 4)
        if local > max_local:
            local = min_local
        overflow = -(-(row - local) // (usable - 4))
    return int(local * LEAF_SLACK) + overflow * page_size + INDEX_ENTRY


def wal_reserve(max_bytes: int) -> int:
    """What the write-ahead log may take of the bound (and the size of the reserve file)."""
    return max(WAL_MIN, min(max_bytes // 8, WAL_MAX))


def configure_wal(db: sqlite3.Connection, max_bytes: int) -> None:
    """Checkpoint at half the log's share; cut the log file back to its share afterwards."""
    page = db.execute("PRAGMA page_size").fetchone()[0]
    reserve = wal_reserve(max_bytes)
    db.execute(f"PRAGMA wal_autocheckpoint={max(reserve // 2 // page, 4)}")
    db.execute(f"PRAGMA journal_size_limit={reserve}")


def live_bytes(db: sqlite3.Connection) -> int:
    """Bytes of the database's pages in use (inside a transaction: as it stands there)."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    size = db.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def file_bytes(path: Path) -> int:
    """Bytes the database file and its write-ahead log take (0 for what is missing)."""
    total = 0
    for p in (path, Path(f"{path}-wal")):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's ``SQLITE_FULL`` (or an ``ENOSPC`` / ``EDQUOT`` from the file system)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return False


def free_bytes(directory: Path) -> int | None:
    """Bytes free for this process on the file system of ``directory`` (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return int(st.f_bavail * st.f_frsize)


class Reserve:
    """The reserve file beside the database: room for a checkpoint when the disk is full."""

    def __init__(self, db_path: Path, size: int) -> None:
        self.path = Path(f"{db_path}-reserve")
        self.size = size

    @property
    def present(self) -> bool:
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def ensure(self) -> bool:
        """Write the reserve file if it is missing or short (cut it if it is longer: the
        bound changed); False if the disk has no room."""
        if self.present:
            with contextlib.suppress(OSError):
                if self.path.stat().st_size > self.size:
                    os.truncate(self.path, self.size)
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.pwrite(fd, b"\0" * self.size, 0)
        except OSError:
            os.close(fd)
            self.release()
            return False
        os.close(fd)
        return True

    def release(self) -> bool:
        """Delete the reserve file (its room goes to the checkpoint); True if there was one."""
        try:
            self.path.unlink()
        except OSError:
            return False
        return True


DAMAGED = ("malformed", "not a database", "corrupt")


def storage_error(what: str, path: Path, exc: sqlite3.Error) -> StorageError:
    """The one-line error of a failed SQLite call: `OutboxDamaged` if the file is damaged."""
    text = f"{what} ({path}): {exc}" if what.endswith("failed") else f"{what} {path}: {exc}"
    if isinstance(exc, sqlite3.DatabaseError) and any(d in str(exc) for d in DAMAGED):
        return OutboxDamaged(text)
    return StorageError(text)
