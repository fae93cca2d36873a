"""Group commit: collects what the engine produced and writes it to the outbox in one go.

At most one commit is in flight. While it runs (in a dedicated writer thread, so the event loop
never waits on fsync) new output accumulates; when it finishes, everything accumulated is cut,
the engine's state is snapshotted at that same instant, and the next commit starts. Under load
commits grow; when idle they are small and immediate. Source positions travel with the records
they produced, and sources are acknowledged only after the commit is durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgewise.edge.outbox import CommitReport, Outbox, PendingChunk
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import DeadLetter

log = logging.getLogger(__name__)


class Committer:
    """Owned by the engine; use `add`, `dead`, `position`, then `kick` or `drain`."""

    def __init__(
        self,
        outbox: Outbox,
        snapshot: Callable[[dict[str, Any]], dict[str, bytes]],
        on_durable: Callable[[dict[str, Any], CommitReport], None],
        max_pending_records: int = 65536,
        min_interval: float = 0.0,
    ) -> None:
        self.outbox = outbox
        self._snapshot = snapshot
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

    def add(self, stream: str, batch: Batch) -> None:
        if batch.n:
            self._chunks.setdefault(stream, []).append(batch)
            self._pending_records += batch.n
            self._dirty = True

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

    def kick(self) -> None:
        """Start a commit if none is running and there is something to write."""
        if self.error is not None:
            raise self.error
        if self._inflight is not None or not self._dirty:
            return
        loop = asyncio.get_running_loop()
        wait = self._last_start + self.min_interval - loop.time()
        if wait > 0 and not self.overloaded:
            if self._timer is None:
                self._timer = loop.call_later(wait, self._kick_later)
            return
        self._last_start = loop.time()
        chunks = [
            PendingChunk(stream, Batch.concat(parts).columns, sum(p.n for p in parts))
            for stream, parts in self._chunks.items()
        ]
        dead = self._dead
        positions = {k: self._positions[k] for k in self._changed}
        checkpoint = self._snapshot(dict(self._positions))
        self._chunks, self._dead, self._changed = {}, [], set()
        self._pending_records = 0
        self._dirty = False
        self._inflight = loop.create_task(
            self._commit(chunks, dead, checkpoint, positions)
        )

    def _kick_later(self) -> None:
        self._timer = None
        if self.error is None:
            self.kick()

    async def _commit(
        self,
        chunks: list[PendingChunk],
        dead: list[DeadLetter],
        checkpoint: dict[str, bytes],
        positions: dict[str, Any],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(
                self._executor, self.outbox.commit, chunks, dead, checkpoint
            )
        except BaseException as exc:  # surfaced on the next kick()/drain()
            self.error = exc
            self._inflight = None
            return
        self.commits += 1
        self._inflight = None
        try:
            self._on_durable(positions, report)
        finally:
            self.kick()

    async def wait(self) -> None:
        """Wait for the commit in flight (if any)."""
        while self._inflight is not None:
            await asyncio.shield(self._inflight)
        if self.error is not None:
            raise self.error

    async def drain(self) -> None:
        """Commit everything pending (now, whatever the interval) and wait until it is durable."""
        await self.wait()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last_start = 0.0
        self.kick()
        await self.wait()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._executor.shutdown(wait=True)
