"""What the agent is doing, for `edgewise agent status`, written so it works when it is stopped.

Two sources, each read without disturbing the running agent:

* ``DATA/status.json``: written atomically (temp file + ``os.replace``) every second by the
  running agent: link state, bytes on the wire, window, refused chunks, twin and engine state,
  certificate. No fsync: it is a view, not a record, and a crash loses at most a second of it.
* the outbox database, through `OutboxView`: a read-only SQLite connection (WAL lets it read
  while the engine writes; it sees committed transactions only). Per stream produced,
  acknowledged, pending, dropped, compacted come from here, so they are exact even when the
  agent is not running.

`OutboxView.snapshot` is also what the uplink uses to compute gaps and the chunks the cloud
already has: one read transaction, so sequence counters and pending chunks agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edgewise.errors import StorageError

STATUS_FILE = "status.json"
ENGINE_DIR = "engine"
OUTBOX_FILE = "outbox.db"
STALE_AFTER_S = 5.0  # a status file older than this means the agent is not running


def outbox_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / ENGINE_DIR / OUTBOX_FILE


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
        return snap

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> OutboxView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the status file ----------------------------------------------------------------------------


def write_status(data_dir: str | os.PathLike[str], status: dict[str, Any]) -> None:
    """Replace ``DATA/status.json`` atomically (readers see the old or the new file)."""
    target = Path(data_dir) / STATUS_FILE
    data = json.dumps(status, default=str, separators=(",", ":")).encode()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".status.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(data_dir: str | os.PathLike[str], now: float | None = None) -> dict[str, Any]:
    """Everything `edgewise agent status` shows, as one JSON-able dict.

    Per-stream counts come from the outbox database (exact, also when the agent is stopped);
    link, bytes, window, twin and engine from the status file, marked stale when the agent
    has not refreshed it for `STALE_AFTER_S` seconds or its process is gone.
    """
    from edgewise.edge.identity import read_cert_info

    data = Path(data_dir)
    now = time.time() if now is None else now
    try:
        agent = json.loads((data / STATUS_FILE).read_text())
        if not isinstance(agent, dict):
            agent = {}
    except (OSError, ValueError):
        agent = {}
    updated = agent.get("updated_at")
    age = now - updated if isinstance(updated, int | float) else None
    running = (
        age is not None and age <= STALE_AFTER_S and agent.get("state") not in ("stopped",
                                                                                 "failed")
        and _pid_alive(agent.get("pid"))
    )
    with OutboxView(outbox_path(data)) as view:
        snap = view.snapshot(chunks=False)
    refused = agent.get("uplink", {}).get("refused", {}) if isinstance(
        agent.get("uplink"), dict) else {}
    streams = {}
    for name, row in sorted(snap.streams.items(), key=lambda kv: (-kv[1].priority, kv[0])):
        streams[name] = {
            "priority": row.priority,
            "produced": row.produced,
            "acknowledged": row.acked,
            "pending": row.pending_records,
            "pending_chunks": row.pending_chunks,
            "pending_bytes": row.pending_bytes,
            "dropped": row.dropped,
            "compacted": row.compacted,
            "refused": int(refused.get(name, {}).get("records", 0)),
        }
    cert = read_cert_info(data)
    link = dict(agent.get("link") or {})
    if not running:
        link["state"] = "agent not running"
    return {
        "data_dir": str(data),
        "running": running,
        "status_age_s": None if age is None else round(age, 3),
        "state": agent.get("state", "never started") if agent else "never started",
        "node_id": agent.get("node_id") or _node_id(data),
        "cloud": agent.get("cloud"),
        "streams": streams,
        "link": link,
        "bytes": agent.get("bytes", {}),
        "window": agent.get("window", {}),
        "uplink": agent.get("uplink", {}),
        "twin": agent.get("twin", {}),
        "engine": agent.get("engine", {}),
        "certificate": cert.to_json() if cert else None,
        "certificate_expires_in_s": (
            None if cert is None
            else round((cert.not_after - datetime.fromtimestamp(now, UTC)).total_seconds())
        ),
        "problem": agent.get("problem"),
    }


def _node_id(data: Path) -> str | None:
    try:
        return (data / "identity" / "node_id").read_text().strip() or None
    except OSError:
        return None
