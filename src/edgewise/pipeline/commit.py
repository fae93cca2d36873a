"""Group commit: collects what the engine produced and writes it to the outbox in one go.

At most one commit is in flight. While it runs (in a dedicated writer thread, so the event loop
never waits on fsync) new output accumulates; when it finishes, everything accumulated is cut,
the engine's state is snapshotted at that same instant, and the next commit starts. Under load
commits grow; when idle they are small and immediate. Source positions travel with the records
they produced, and sources are acknowledged only after the commit is durable. When a stage fails
partway through a batch, `abandon` drops what is not yet cut: a failed run commits nothing of the
batch, like a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgewise.outbox import CommitReport, Outbox, OutboxDiskFull, PendingChunk
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import DeadLetter

log = logging.getLogger(__name__)

DISK_RETRY_S = 0.5  # a full disk: the next try
HOLD_FACTOR = 4  # a full disk: records held in memory, in units of max_pending_records
DRAIN_TRIES = 6  # a full disk at the end of a run: tries before giving up
LOST_REASON = "dropped: disk full"


class Committer:
    """Owned by the engine; use `add`, `dead`, `position`, then `kick` or `drain`."""

    def __init__(
        self,
        outbox: Outbox,
        snapshot: Callable[[dict[str, Any]], dict[str, bytes]],
        on_durable: Callable[[dict[str, Any], CommitReport], None],
        max_pending_records: int = 65536,
        min_interval: float = 0.0,
        note: Callable[[dict[str, Any]], bytes] | None = None,
    ) -> None:
        self.outbox = outbox
        self._snapshot = snapshot
        self._note = note  # the source positions alone, for the outbox's note
        self._on_durable = on_durable
        self.max_pending_records = max_pending_records
        self.min_interval = min_interval  # seconds between commit starts (bounds snapshot cost)
        self._last_start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._chunks: dict[str, list[Batch]] = {}
        self._dead: list[DeadLetter] = []
        self._positions: dict[str, Any] = {}  # latest per source, kept across commits
        self._changed: set[str] = set()
        self._pending_records = 0
        self._dirty = False
        self._inflight: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        self.error: BaseException | None = None
        self.commits = 0
        # a full disk (see the module docstring)
        self._lost: dict[str, int] = {}  # per stream: records given up, before the held ones
        self._retry_at = 0.0
        self.disk_full_since: float | None = None  # epoch seconds
        self.lost_in_memory = 0
        self.abandoned = False

    def add(self, stream: str, batch: Batch) -> None:
        if batch.n:
            self._chunks.setdefault(stream, []).append(batch)
            self._pending_records += batch.n
            self._dirty = True
            if self.disk_full_since is not None:
                self._shed()

    def dead(self, letter: DeadLetter) -> None:
        self._dead.append(letter)
        self._dirty = True

    def position(self, source_id: str, position: Any) -> None:
        if position is not None:
            self._positions[source_id] = position
            self._changed.add(source_id)
            self._dirty = True

    def mark_dirty(self) -> None:
        """State changed without output (e.g. a window absorbed records): checkpoint it."""
        self._dirty = True

    @property
    def busy(self) -> bool:
        return self._inflight is not None

    @property
    def overloaded(self) -> bool:
        return self._pending_records >= self.max_pending_records

    def kick(self, now: bool = False) -> None:
        """Start a commit if none is running and there is something to write (``now``: also
        before the retry of a full disk is due)."""
        if self.error is not None:
            raise self.error
        if self._inflight is not None or not self._dirty or self.abandoned:
            return
        loop = asyncio.get_running_loop()
        wait = max(self._last_start + self.min_interval - loop.time(),
                   0.0 if now else self._retry_at - loop.time())
        if wait > 0 and (not self.overloaded or self._retry_at > loop.time()) and not now:
            if self._timer is None:
                self._timer = loop.call_later(wait, self._kick_later)
            return
        self._last_start = loop.time()
        chunks = [PendingChunk(stream, {}, n, lost=LOST_REASON) for stream, n in self._lost.items()]
        chunks += [
            PendingChunk(stream, Batch.concat(parts).columns, sum(p.n for p in parts))
            for stream, parts in self._chunks.items()
        ]
        taken = (self._chunks, self._lost, self._dead, self._changed, self._pending_records)
        positions = {k: self._positions[k] for k in self._changed}
        checkpoint = self._snapshot(dict(self._positions))
        note = self._note(dict(self._positions)) if self._note is not None else None
        self._chunks, self._lost, self._dead, self._changed = {}, {}, [], set()
        self._pending_records = 0
        self._dirty = False
        self._inflight = loop.create_task(
            self._commit(chunks, taken, checkpoint, positions, note)
        )

    def abandon(self) -> None:
        """The engine's state is no longer consistent (a stage failed partway through a batch):
        drop everything not yet cut for a commit and start no further commit. The commit in
        flight, cut before, still completes; the restart resumes from it."""
        self.abandoned = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._chunks, self._lost, self._dead, self._changed = {}, {}, [], set()
        self._pending_records = 0
        self._dirty = False

    def _kick_later(self) -> None:
        self._timer = None
        if self.error is None:
            self.kick()

    async def _commit(
        self,
        chunks: list[PendingChunk],
        taken: tuple[dict[str, list[Batch]], dict[str, int], list[DeadLetter], set[str], int],
        checkpoint: dict[str, bytes],
        positions: dict[str, Any],
        note: bytes | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(
                self._executor, self.outbox.commit, chunks, taken[2], checkpoint, note
            )
        except OutboxDiskFull as exc:  # kept, tried again: local actions go on meanwhile
            self._inflight = None
            self._put_back(taken)
            if self.disk_full_since is None:
                self.disk_full_since = time.time()
                log.error("%s; keeping the records in memory and trying again every %.1f s",
                          exc, DISK_RETRY_S)
            self._retry_at = loop.time() + DISK_RETRY_S
            self._shed()
            self.kick()
            return
        except BaseException as exc:  # surfaced on the next kick()/drain()
            self.error = exc
            self._inflight = None
            return
        self.commits += 1
        self._inflight = None
        if self.disk_full_since is not None:
            log.warning("the outbox stores again after %.1f s of a full disk",
                        time.time() - self.disk_full_since)
            self.disk_full_since = None
            self._retry_at = 0.0
        self._publish()
        try:
            self._on_durable(positions, report)
        finally:
            self.kick()

    def _put_back(self, taken: tuple[dict[str, list[Batch]], dict[str, int],
                                     list[DeadLetter], set[str], int]) -> None:
        """The records of a commit that was not stored go back in front of the newer ones."""
        chunks, lost, dead, changed, pending = taken
        for stream, parts in chunks.items():
            self._chunks[stream] = parts + self._chunks.get(stream, [])
        for stream, n in lost.items():
            self._lost[stream] = self._lost.get(stream, 0) + n
        self._dead = dead + self._dead
        self._changed |= changed
        self._pending_records += pending
        self._dirty = True

    def _shed(self) -> None:
        """A full disk: give up the oldest records of the lowest priority beyond the hold."""
        limit = HOLD_FACTOR * self.max_pending_records
        if self._pending_records > limit:
            prio = {name: st.priority for name, st in self.outbox.stats().items()}
            for stream in sorted(self._chunks, key=lambda s: prio.get(s, 0)):
                parts = self._chunks[stream]
                while parts and self._pending_records > limit:
                    n = parts.pop(0).n
                    self._lost[stream] = self._lost.get(stream, 0) + n
                    self._pending_records -= n
                    self.lost_in_memory += n
                if not parts:
                    del self._chunks[stream]
        self._publish()

    def _publish(self) -> None:
        h = self.outbox.health_state
        h.held_records = self._pending_records if self.disk_full_since is not None else 0
        h.lost_in_memory = self.lost_in_memory

    async def wait(self) -> None:
        """Wait for the commit in flight (if any)."""
        while self._inflight is not None:
            await asyncio.shield(self._inflight)
        if self.error is not None:
            raise self.error

    async def drain(self) -> None:
        """Commit everything pending (now, whatever the interval) and wait until it is durable.
        A full disk is tried `DRAIN_TRIES` times, then `OutboxDiskFull` is raised."""
        await self.wait()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last_start = 0.0
        for attempt in range(DRAIN_TRIES):
            self.kick(now=True)
            await self.wait()
            if self.disk_full_since is None or not self._dirty or self.abandoned:
                return
            if attempt < DRAIN_TRIES - 1:
                await asyncio.sleep(DISK_RETRY_S)
        raise OutboxDiskFull(f"the disk under {self.outbox.path.parent} is full: "
                             f"{self._pending_records} records could not be stored")

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._executor.shutdown(wait=True)
