"""Sessions' small writes (node status, reported state) as periodic group writes (issue 11).

A session used to write to the store for every status change (``online`` when it attached,
before the node's hello was even read; ``offline`` when it ended) and for every ``report``
message: one transaction each, on the event loop's path. `NodeWrites` collects them instead
and one task writes everything collected every ``interval`` seconds in ONE transaction
(`Store.write_node_batch`):

* **status**: the newest per node wins (``online`` after its hello, ``offline`` at its end);
* **reports**: coalesced per node: the newest report's applied version, status and counters,
  and its setpoints merged by HLC last-writer-wins with the reports before it (the same rule
  the store applies, so the stored result is the one sequential merges would give); each write
  that lost on the way is kept for the audit log (at most `MAX_LOSSES` per node, the rest
  counted in `dropped`).
* **bounded**: at most ``max_nodes`` nodes wait for a write; a write for one more node is
  dropped and counted (`dropped`; the node's next report or session writes it again).

A failed group write is logged and counted (`failures`); its writes are put back unless newer
ones for the same node arrived meanwhile, and tried again at the next interval.
Heartbeats were batched already (`SessionRegistry.mark_seen`, written every maintenance round).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edgewise.cloud.store import NodeReport, Store
from edgewise.errors import StorageError
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import AuditRecord
from edgewise.sync.twin_state import ReportedState

log = logging.getLogger(__name__)

MAX_LOSSES = 1000  # audit records kept per node between two group writes


@dataclass
class _Pending:
    status: tuple[str, datetime] | None = None
    report: NodeReport | None = None
    losses: list[AuditRecord] = field(default_factory=list)


class NodeWrites:
    """See the module docstring. ``async with`` runs the writer task; `close` writes what is
    left."""

    def __init__(self, store: Store, *, interval: float = 1.0,
                 max_nodes: int = 200_000) -> None:
        self.store = store
        self.interval = interval
        self.max_nodes = max_nodes
        self.writes = 0  # group writes done
        self.failures = 0  # group writes that failed
        self.dropped = 0  # status changes, reports or audit records not kept (bounds)
        self._pending: dict[str, _Pending] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def _slot(self, node_id: str) -> _Pending | None:
        slot = self._pending.get(node_id)
        if slot is None:
            if len(self._pending) >= self.max_nodes:
                self.dropped += 1
                return None
            slot = self._pending[node_id] = _Pending()
        return slot

    def status(self, node_id: str, status: str, when: datetime | None = None) -> None:
        """Queue the node's status (``online`` / ``offline``) and last-seen time."""
        slot = self._slot(node_id)
        if slot is not None:
            slot.status = (status, when or datetime.now(UTC))

    def report(self, node_id: str, reported: ReportedState, at: HLC) -> None:
        """Queue a node's report (``at``: the cloud's clock when it arrived)."""
        slot = self._slot(node_id)
        if slot is None:
            return
        own = reported.setpoints  # what the node itself holds: its newest report's
        if slot.report is not None:
            merged, losses = slot.report.state.setpoints.merge(reported.setpoints, at=at)
            room = max(MAX_LOSSES - len(slot.losses), 0)
            slot.losses += losses[:room]
            self.dropped += max(len(losses) - room, 0)
            reported = ReportedState(reported.applied_version, reported.status,
                                     dict(reported.counters), merged)
        slot.report = NodeReport(reported, at, own)

    async def flush(self) -> int:
        """Write everything queued in one transaction; how many nodes. Raises `StorageError`
        (the writes are queued again)."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        statuses = {n: p.status for n, p in batch.items() if p.status is not None}
        reports = {n: p.report for n, p in batch.items() if p.report is not None}
        losses = {n: p.losses for n, p in batch.items() if p.losses}
        try:
            await self.store.write_node_batch(statuses, reports, losses)
        except StorageError:
            self.failures += 1
            for node_id, old in batch.items():  # newer writes win over the failed ones
                new = self._pending.get(node_id)
                if new is None:
                    if len(self._pending) < self.max_nodes:
                        self._pending[node_id] = old
                    else:
                        self.dropped += 1
                    continue
                if new.status is None:
                    new.status = old.status
                if new.report is None:
                    new.report, new.losses = old.report, old.losses
            raise
        self.writes += 1
        return len(batch)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except StorageError as exc:
                log.warning("node status and report writes failed (tried again in %g s): %s",
                            self.interval, exc)

    async def __aenter__(self) -> NodeWrites:
        self._task = asyncio.create_task(self.run(), name="edgewise-node-writes")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(StorageError):
            await self.flush()
