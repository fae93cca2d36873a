"""What the uplink keeps on disk, in ``DATA/uplink/``, across sessions and restarts.

`UplinkStore` holds:

* ``refused.json``: the chunks the control plane refused (id → stream, records, reason). A
  refused chunk is never sent again, also not after a restart; it stays in the outbox, since
  the node deletes only what the cloud stored, until the outbox evicts it;
* ``ledger.msgpack``: the `Ledger` (the node id, and per stream the highest sequence number
  sent or reported as a gap and the cloud's last mark), saved with fsync *before* the frames it
  describes are sent; an outbox that is replaced continues its numbers above it. See the
  "Gaps" paragraph of `edgewise.edge.uplink`.

Both are written atomically, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from edgewise.common.files import write_atomic
from edgewise.edge.damaged import DamagedFile, reason, set_aside
from edgewise.edge.flow import Sent
from edgewise.edge.ledger import Ledger
from edgewise.errors import StorageError

log = logging.getLogger("edgewise.edge.uplink")  # the uplink's log lines keep their name


def read_refused(path: Path) -> dict[int, dict[str, Any]]:
    """``refused.json``: chunk id -> {stream, records, reason}; empty when there is none.
    Raises `OSError` (cannot read) and `DamagedFile`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        raw = json.loads(data)
        out = {int(k): v for k, v in raw.items()}
        if not all(isinstance(v, dict) and isinstance(v.get("stream"), str)
                   and isinstance(v.get("records"), int) and isinstance(v.get("seq", 0), int)
                   for v in out.values()):
            raise ValueError("not a refused chunk in each entry")
    except (ValueError, AttributeError, TypeError) as exc:
        raise DamagedFile(path, reason(exc, data), "the agent starts a new one") from None
    return out


def damaged_files(state_dir: Path) -> list[DamagedFile]:
    """The uplink's files that are present but damaged; reads only (for `agent status`)."""
    out = []
    try:
        read_refused(state_dir / "refused.json")
    except DamagedFile as exc:
        out.append(exc)
    except OSError:
        pass
    ledger = state_dir / "ledger.msgpack"
    try:
        data = ledger.read_bytes()
        Ledger.from_bytes(data)
    except StorageError as exc:
        out.append(DamagedFile(ledger, reason(exc, data), "the agent starts a new one"))
    except OSError:
        pass
    return out


class UplinkStore:
    """The refused chunk ids and the gap ledger of the uplink, loaded at construction.

    A missing or unreadable ``refused.json`` starts empty (logged). A missing ledger starts
    empty; one that cannot be read raises `StorageError`. A damaged file of either is logged,
    moved aside (``NAME.damaged``) and started again.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.refused: dict[int, dict[str, Any]] = self._load_refused()
        self.ledger = self._load_ledger()
        self._ledger_lock: asyncio.Lock | None = None

    # -- refused chunks (persisted: never sent again, also after a restart) ----------------
    @property
    def refused_path(self) -> Path:
        return self.state_dir / "refused.json"

    def _load_refused(self) -> dict[int, dict[str, Any]]:
        try:
            return read_refused(self.refused_path)
        except OSError as exc:
            log.warning("ignoring unreadable %s: %s", self.refused_path, exc.strerror or exc)
        except DamagedFile as exc:
            moved = set_aside(self.refused_path)
            log.warning("%s; %s, starting with no refused chunks: one the control plane "
                        "refused before is sent once more and refused again", exc.what,
                        f"moved to {moved.name}" if moved else "ignored")
        return {}

    async def save_refused(self) -> None:
        data = json.dumps({str(k): v for k, v in self.refused.items()}).encode()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_atomic, self.refused_path, data, 0o600)

    async def refuse(self, chunk_id: int, sent: Sent | None, reason: str) -> None:
        """Never send this chunk again: log it, record it and persist (a failure is logged)."""
        stream = sent.stream if sent else "?"
        records = sent.records if sent else 0
        log.warning("chunk %d of stream %s (%d records) refused: %s; it will not be sent again",
                    chunk_id, stream, records, reason)
        self.refused[chunk_id] = {"stream": stream, "records": records, "reason": reason[:300]}
        if sent is not None:  # which chunk: ids start again in a new outbox file
            self.refused[chunk_id]["seq"] = sent.seq_first
        try:
            await self.save_refused()
        except StorageError as exc:
            log.warning("cannot persist refused chunk ids: %s", exc)

    def prune_refused(self, pending: dict[int, tuple[str, int]]) -> None:
        """Forget refused chunks no longer in the outbox (in memory; saved with the next).
        ``pending``: chunk id -> (stream, first seq). An id whose chunk is another one (a new
        outbox file numbers its chunks from 1 again) is forgotten too."""
        gone = [cid for cid, r in self.refused.items() if cid not in pending
                or pending[cid][0] != r["stream"]
                or ("seq" in r and pending[cid][1] != r["seq"])]
        for cid in gone:  # evicted from the outbox since: counted as dropped there
            del self.refused[cid]

    # -- the ledger (persisted before the frames it describes are sent) ---------------------
    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.msgpack"

    def _load_ledger(self) -> Ledger:
        try:
            data = self.ledger_path.read_bytes()
        except FileNotFoundError:
            return Ledger()
        except OSError as exc:
            raise StorageError(f"cannot read {self.ledger_path}: {exc.strerror}") from None
        try:
            return Ledger.from_bytes(data)
        except StorageError as exc:
            moved = set_aside(self.ledger_path)
            log.error("%s is damaged (%s); %s, starting a new one (the outbox's own "
                      "outbox.seqs note still keeps its numbers)", self.ledger_path,
                      reason(exc, data),
                      f"moved to {moved.name}" if moved else "ignored")
            return Ledger()

    async def save_ledger(self) -> None:
        if self._ledger_lock is None:
            self._ledger_lock = asyncio.Lock()
        async with self._ledger_lock:  # one writer; each write is the state at its start
            data = self.ledger.to_bytes()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(write_atomic, self.ledger_path, data, 0o600)
