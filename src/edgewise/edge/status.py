"""What the agent is doing, for `edgewise agent status`, written so it works when it is stopped.

The values are typed (`edgewise.edge.status_model`): the agent writes an `AgentStatus`, and
`read_status` returns a `NodeStatus`.

Two sources, each read without disturbing the running agent:

* ``DATA/status.json``: written atomically (temp file + ``os.replace``) every second by the
  running agent: link state, bytes on the wire, window, refused chunks, twin and engine state,
  certificate, the outbox's condition. No fsync: it is a view, not a record, and a crash loses
  at most a second of it. The file is padded with spaces to a multiple of 4 KiB plus 4 KiB, so
  that on a full disk (no room for a temp file) the agent still writes it, over its own bytes.
* the outbox database, through `edgewise.outbox.view.OutboxView` (read-only). Per stream
  produced, acknowledged, pending, dropped, compacted come from here, so they are exact even
  when the agent is not running.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from edgewise.common.files import write_atomic
from edgewise.edge.status_model import (
    AgentStatus,
    CertificateStatus,
    LinkStatus,
    NodeStatus,
    StreamStatus,
)
from edgewise.errors import StorageError
from edgewise.outbox.view import OutboxSnapshot, OutboxView, outbox_file

STATUS_FILE = "status.json"
ENGINE_DIR = "engine"
STALE_AFTER_S = 5.0  # a status file older than this means the agent is not running
PAD = 4096  # status.json is padded to a multiple of this, plus this, with spaces


def outbox_path(data_dir: str | os.PathLike[str]) -> Path:
    """The agent's outbox database: ``DATA/engine/outbox.db``."""
    return outbox_file(Path(data_dir) / ENGINE_DIR)


# -- the status file ----------------------------------------------------------------------------


def write_status(data_dir: str | os.PathLike[str], status: AgentStatus) -> None:
    """Replace ``DATA/status.json`` atomically (readers see the old or the new file); not
    fsynced: a view rewritten every second, not a record."""
    data = json.dumps(status.to_json(), default=str, separators=(",", ":")).encode()
    path = Path(data_dir) / STATUS_FILE
    try:
        write_atomic(path, data + b" " * (PAD - len(data) % PAD + PAD), durable=False)
    except StorageError:
        if not _write_in_place(path, data):
            raise


def _write_in_place(path: Path, data: bytes) -> bool:
    """A full disk: write over the file's own bytes (needs no new blocks); False if it is
    missing or too small."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            return False
        os.pwrite(fd, data + b" " * (size - len(data)), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def load_status(data_dir: str | os.PathLike[str]) -> AgentStatus:
    """``DATA/status.json`` as the agent wrote it; empty when missing or unreadable (see
    `AgentStatus.parse` for damaged values)."""
    try:
        raw = json.loads((Path(data_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        raw = None
    return AgentStatus.parse(raw)


def _pid_alive(pid: int | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(data_dir: str | os.PathLike[str], now: float | None = None) -> NodeStatus:
    """Everything `edgewise agent status` shows (``.to_json()``: one JSON-able dict).

    Per-stream counts come from the outbox database (exact, also when the agent is stopped);
    link, bytes, window, twin and engine from the status file, marked stale when the agent
    has not refreshed it for `STALE_AFTER_S` seconds or its process is gone.
    """
    from edgewise.edge.identity import read_cert_info

    data = Path(data_dir)
    now = time.time() if now is None else now
    agent = load_status(data)
    updated = agent.updated_at
    age = now - updated if updated is not None else None
    running = (
        age is not None and age <= STALE_AFTER_S and agent.state not in ("stopped", "failed")
        and _pid_alive(agent.pid)
    )
    problem = agent.problem
    try:
        with OutboxView(outbox_path(data)) as view:
            snap = view.snapshot(chunks=False)
    except StorageError as exc:  # damaged: the agent quarantines it when it starts
        snap = OutboxSnapshot()
        problem = problem or (f"{exc}; `edgewise agent run --data {data}` moves it aside and "
                              "starts a new outbox (what it held is reported as lost)")
    streams = {}
    for name, row in sorted(snap.streams.items(), key=lambda kv: (-kv[1].priority, kv[0])):
        streams[name] = StreamStatus(
            priority=row.priority,
            produced=row.produced,
            acknowledged=row.acked,
            pending=row.pending_records,
            pending_chunks=row.pending_chunks,
            pending_bytes=row.pending_bytes,
            dropped=row.dropped,
            compacted=row.compacted,
            refused=agent.refused_records(name),
        )
    cert = read_cert_info(data)
    link = agent.link
    if not running:
        stale = {"state": "agent not running"}
        link = LinkStatus(**stale) if link is None else link.model_copy(update=stale)
    return NodeStatus(
        data_dir=str(data),
        running=running,
        status_age_s=None if age is None else round(age, 3),
        state=agent.state if agent.state is not None else "never started",
        node_id=agent.node_id or _node_id(data),
        cloud=agent.cloud,
        streams=streams,
        link=link,
        bytes=agent.bytes,
        window=agent.window,
        uplink=agent.uplink,
        twin=agent.twin,
        engine=agent.engine,
        certificate=CertificateStatus(**cert.to_json()) if cert else None,
        certificate_expires_in_s=(
            None if cert is None
            else round((cert.not_after - datetime.fromtimestamp(now, UTC)).total_seconds())
        ),
        problem=problem,
        outbox=agent.outbox,
        release=agent.release,
    )


def _node_id(data: Path) -> str | None:
    try:
        return (data / "identity" / "node_id").read_text().strip() or None
    except (OSError, ValueError):  # missing, unreadable or not text: the id is unknown
        return None
