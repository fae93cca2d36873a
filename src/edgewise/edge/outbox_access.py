"""Hand-over of the outbox between the engine and the uplink (`OutboxAccess`).

The uplink reads and acknowledges chunks through whichever `Outbox` is published now: the
running engine's, or the agent's own when no engine runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from edgewise.edge.outbox import Outbox
from edgewise.errors import StorageError

T = TypeVar("T")


class OutboxAccess:
    """Which `Outbox` object the uplink may use now: the running engine's, or the agent's own
    when no engine runs. Calls run in a worker thread, one at a time; withdrawing waits for
    the call in progress, so the engine never closes its outbox under the uplink's feet."""

    def __init__(self) -> None:
        self._outbox: Outbox | None = None
        self._lock: asyncio.Lock | None = None
        self._ready: asyncio.Event | None = None

    def _sync(self) -> tuple[asyncio.Lock, asyncio.Event]:
        if self._lock is None or self._ready is None:
            self._lock, self._ready = asyncio.Lock(), asyncio.Event()
        return self._lock, self._ready

    def current(self) -> Outbox | None:
        return self._outbox

    async def publish(self, outbox: Outbox) -> None:
        lock, ready = self._sync()
        async with lock:
            self._outbox = outbox
            ready.set()

    async def withdraw(self) -> None:
        lock, ready = self._sync()
        async with lock:
            self._outbox = None
            ready.clear()

    async def call(self, fn: Callable[[Outbox], T]) -> T:
        """Run ``fn(outbox)`` in a thread as soon as an outbox is available."""
        lock, ready = self._sync()
        while True:
            await ready.wait()
            async with lock:
                ob = self._outbox
                if ob is None:
                    continue
                try:
                    return await asyncio.to_thread(fn, ob)
                except StorageError:
                    try:
                        ob.db  # noqa: B018 - raises when the engine closed it by itself
                    except StorageError:
                        if self._outbox is ob:
                            self._outbox = None
                            ready.clear()
                        continue
                    raise
