"""Enrolments' store writes, grouped (issue 11): `EnrolWriter`.

Each enrolment used to be its own write transaction. On SQLite the store has one write
connection, so a storm of enrolments (hundreds admitted at once) queued for it ahead of the
group commit, the node writes and the maintenance round, and a waiter gave up after the pool's
wait (``store_wait``, 30 s): enrolments got 503, ingest batches failed, nodes reconnected.

`EnrolWriter` is one task: an enrolment hands it its request (token hash, node id, the signed
certificate) and awaits the answer; the task writes whatever is waiting, up to ``max_group`` at
once, in ONE transaction (`Store.enrol_nodes`, a savepoint per enrolment: a used-up token or a
key already enrolled refuses that enrolment alone, the others are stored). So enrolments hold
at most one place in the store's queue, whatever their number, and one fsync serves a group.
The newest TUF root, which every answer carries, is read once per group, before its write (a
failure there fails the group before anything is stored).

A transaction that fails as a whole (the store is down, the pool's wait ran out) fails the
enrolments of that group with its `StorageError` (503: nothing of them was stored, they retry)
and nothing else. Admission (`retry_after`): the enrolments waiting here are bounded by what
the writer stores in ``target_wait`` seconds at its measured rate (at least ``max_group``, at
most ``max_pending``); above that the device API answers 429 with ``Retry-After`` (the backlog
over that rate), so a storm waits outside, not in memory or in the store's queue, and no
queued enrolment outlives the node's request timeout (15 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from aiohttp import web

from edgewise.cloud.store import Store
from edgewise.cloud.store.identity import EnrolRequest
from edgewise.cloud.store.records import NodeInfo
from edgewise.errors import EdgewiseError, StorageError

log = logging.getLogger(__name__)

_Waiter = tuple[EnrolRequest, "asyncio.Future[tuple[NodeInfo, bytes | None]]"]


class EnrolWriter:
    """See the module docstring. The task starts with the first enrolment; `close` ends it."""

    def __init__(self, store: Store, *, max_group: int = 64, max_pending: int = 1024,
                 target_wait: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.max_group = max_group
        self.max_pending = max_pending
        self.target_wait = target_wait
        self.clock = clock
        self.rate: float | None = None  # enrolments stored per second, smoothed
        self.groups = 0  # group transactions done
        self.failures = 0  # group transactions that failed as a whole
        self.refused = 0  # enrolments told to come back later (429)
        self._queue: deque[_Waiter] = deque()
        self._writing = 0  # enrolments in the transaction under way
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue) + self._writing

    def limit(self) -> int:
        """How many enrolments may wait here now."""
        by_rate = self.max_group if self.rate is None else int(self.rate * self.target_wait)
        return max(self.max_group, min(self.max_pending, by_rate))

    def retry_after(self) -> float:
        """0.0 when one more enrolment may wait here; else the seconds after which to retry
        (counted in `refused`)."""
        backlog = len(self)
        if backlog < self.limit():
            return 0.0
        self.refused += 1
        rate = self.rate or self.max_group / self.target_wait
        return max(1.0, math.ceil(backlog / rate))

    async def enrol(self, request: EnrolRequest) -> tuple[NodeInfo, bytes | None]:
        """Store one enrolment with the next group: the node and the newest TUF root. Raises
        the error that refused it (token errors, `KeyInUse`, `StorageError`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="edgewise-enrolments")
        fut: asyncio.Future[tuple[NodeInfo, bytes | None]] = \
            asyncio.get_running_loop().create_future()
        self._queue.append((request, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group = [self._queue.popleft()
                         for _ in range(min(self.max_group, len(self._queue)))]
                self._writing = len(group)
                try:
                    await self._write(group)
                finally:
                    self._writing = 0

    async def _write(self, group: list[_Waiter]) -> None:
        started = self.clock()
        try:
            root = await self.store.tuf_metadata("root")  # None until `cloud keys init`
            results = await self.store.enrol_nodes([r for r, _ in group])
        except asyncio.CancelledError:
            self._fail(group, StorageError("the control plane is shutting down"))
            raise
        except Exception as exc:
            self.failures += 1
            if isinstance(exc, EdgewiseError):
                log.warning("a group of %d enrolments failed (answered 503; they retry): %s",
                            len(group), exc)
            else:
                log.exception("a group of %d enrolments failed", len(group))
                exc = StorageError(f"enrolment not stored: {exc!r}")
            self._fail(group, exc)
            return
        self.groups += 1
        elapsed = max(self.clock() - started, 1e-3)
        if len(group) >= 8:  # a small group says little about the rate
            sample = len(group) / elapsed
            self.rate = sample if self.rate is None else 0.7 * self.rate + 0.3 * sample
        for (_, fut), result in zip(group, results, strict=True):
            if fut.done():  # the caller went away; the node may retry (idempotent per key)
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result((result, root))

    @staticmethod
    def _fail(group: list[_Waiter], exc: Exception) -> None:
        for _, fut in group:
            if not fut.done():
                fut.set_exception(exc)

    async def close(self) -> None:
        """Stop the task; enrolments still waiting fail (503: nothing of them was stored)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(StorageError("the control plane is shutting down"))


ENROL_WRITER = web.AppKey("enrol_writer", EnrolWriter)
