"""A cloud pipeline run's state as the store keeps it, so any replica can continue the run.

A run's own outbox (``DATA/cloud-pipelines/<name>/outbox.db``) holds, in one transaction per
group commit, the result chunks, the operators' state and the sources' positions (the
checkpoint) and each result stream's next sequence number. `read_pending` reads the chunks not
yet shipped together with that checkpoint and those numbers in ONE read transaction: the state
it returns is the state right after the last of those chunks. The runner ships both in one
store transaction (`CloudPipelineStore.commit_pipeline_results`), so the store always holds a
state that matches exactly the results it holds. `reset` lays a fresh outbox out from such a
state: the replica that takes a pipeline over (or the same one started again) continues from
the last shipment, computing again only what was not shipped, under the same sequence numbers.

The state is JSON (`encode` / `decode`): ``{"checkpoint": {key: base64}, "next_seq": {stream:
n}}``; its size is the checkpoint's (operator state, e.g. a window's open groups).
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.errors import StorageError
from edgewise.outbox import outbox_file, schema
from edgewise.outbox.records import Chunk

MAX_STATE = 256 * 1024 * 1024  # bytes of a stored state decoded, at most


@dataclass(frozen=True)
class RunState:
    checkpoint: dict[str, bytes] = field(default_factory=dict)
    next_seq: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({
            "checkpoint": {k: base64.b64encode(v).decode() for k, v in
                           sorted(self.checkpoint.items())},
            "next_seq": dict(sorted(self.next_seq.items()))}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> RunState:
        if len(data) > MAX_STATE:
            raise StorageError(f"a stored cloud pipeline state of {len(data)} bytes is more "
                               f"than {MAX_STATE}")
        try:
            raw: Any = json.loads(data)
            return cls({str(k): base64.b64decode(v) for k, v in raw["checkpoint"].items()},
                       {str(k): int(v) for k, v in raw["next_seq"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"a stored cloud pipeline state does not decode: {exc}") from None


class PendingReader:
    """Reads an outbox's unshipped chunks and its state in one read transaction (its own
    read-only connection beside the engine's writer; WAL lets both work at once)."""

    def __init__(self, directory: Path) -> None:
        self.path = outbox_file(directory)
        self._db: sqlite3.Connection | None = None

    def read_pending(self, want_state: bool = True) -> tuple[list[Chunk], RunState | None]:
        """The unshipped chunks, and the state right after them when there are chunks or
        ``want_state`` (else None: a large checkpoint is not read for nothing)."""
        state: RunState | None = None
        try:
            if self._db is None:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                           isolation_level=None, check_same_thread=False)
            db = self._db
            db.execute("BEGIN")
            try:
                rows = db.execute(
                    "SELECT id, stream, priority, seq_first, seq_count, records, compacted, "
                    "payload FROM chunks ORDER BY id").fetchall()
                if rows or want_state:
                    checkpoint = db.execute("SELECT key, value FROM checkpoint").fetchall()
                    next_seq = db.execute("SELECT stream, next_seq FROM streams").fetchall()
                    state = RunState({str(k): bytes(v) for k, v in checkpoint},
                                     {str(k): int(v) for k, v in next_seq})
            finally:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the cloud pipeline's outbox {self.path}: "
                               f"{exc}") from None
        return [Chunk(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in rows], state

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def reset(directory: Path, state: RunState) -> None:
    """Replace the run's folder with a fresh outbox holding ``state`` (no chunks)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(outbox_file(directory), isolation_level=None)
        try:
            schema.create(db)
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO streams(stream, priority, compact, next_seq) "
                           "VALUES (?, 0, 0, ?)", sorted(state.next_seq.items()))
            db.executemany("INSERT INTO checkpoint(key, value) VALUES (?, ?)",
                           sorted(state.checkpoint.items()))
            db.execute("COMMIT")
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot lay out the cloud pipeline's outbox in {directory}: "
                           f"{exc}") from None
