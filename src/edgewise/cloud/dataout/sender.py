"""Data out, the queued sender: what the ingest hands committed chunks to, and the retry loop.

The ingest calls `Forwarder.forward` *after* a chunk's durable commit, so a forwarder only ever
sees records the store has; nothing it does can lose or delay an acknowledgement to a node.
`forward` never waits on the network: it puts the chunk on a bounded queue of the forwarder's
own and returns. A worker task sends queued chunks in order, retrying while the broker is
unreachable, paced by the shared reconnect policy (`edgewise.common.backoff`: exponential
backoff from ``retry_min`` up to ``retry_max`` with full jitter; the failures are forgotten once
a connection has been up for `RESET_AFTER` seconds). When the queue is full the *oldest* queued
chunk is dropped and counted (``dropped_chunks`` / ``dropped_records``); a chunk the broker
refuses for good (e.g. larger than its payload limit) is dropped and counted too
(``refused_chunks``). Delivery to the broker is at-least-once: a chunk sent again after a lost
acknowledgement is a duplicate on MQTT, and is dropped by JetStream through its ``Nats-Msg-Id``
header.

Lifecycle: ``async with forwarder: ... await forwarder.forward(...)``, or ``await
forwarder.start()`` / ``await forwarder.stop()``. `stop` gives queued chunks ``flush_timeout``
seconds to leave, then counts what is left as dropped and cancels the worker. `ForwarderSet`
holds several behind one ``forward`` and ``forward_committed`` (what the group commit calls).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping, Sequence, Set
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgewise.cloud.dataout.render import Chunk
from edgewise.cloud.store import ChunkWrite
from edgewise.common.backoff import Backoff, Retry
from edgewise.errors import ConfigError, EdgewiseError
from edgewise.sync import codec

log = logging.getLogger(__name__)

RESET_AFTER = 30.0  # s a connection stays up before its earlier failures are forgotten


@runtime_checkable
class Forwarder(Protocol):
    """What the ingest calls after each durable commit. Must not block on the network."""

    async def forward(
        self, node_id: str, stream: str, seq_first: int, columns: Mapping[str, np.ndarray]
    ) -> None: ...


class ForwardRefused(EdgewiseError):
    """The broker refused a chunk for good (not worth retrying): it is dropped and counted."""


class QueuedForwarder(abc.ABC):
    """Bounded queue + one worker task that sends chunks in order and retries.

    Subclasses implement `_connect`, `_send` (raise `ForwardRefused` for a chunk that can never
    be sent; any other exception means "retry after reconnecting") and `_close`.
    """

    kind = "forwarder"

    def __init__(
        self,
        *,
        max_queue: int = 1000,
        retry_min: float = 0.2,
        retry_max: float = 30.0,
        flush_timeout: float = 5.0,
        reset_after: float = RESET_AFTER,
    ) -> None:
        if max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue  # chunks
        # retry_min above retry_max: every wait is up to retry_max (as min(cap, ...) gives)
        self.retry = Retry(Backoff(min(retry_min, retry_max), retry_max), reset_after)
        self.flush_timeout = flush_timeout  # seconds
        self._queue: deque[Chunk] = deque()
        self._inflight: Chunk | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._halt = False  # set by stop(): the delivery loop ends at its next turn
        self._closing = False
        self.connected = False
        self.forwarded_chunks = 0
        self.forwarded_records = 0
        self.messages = 0
        self.dropped_chunks = 0
        self.dropped_records = 0
        self.refused_chunks = 0
        self.retries = 0
        self.errors = 0
        self.last_error: str | None = None

    @property
    def where(self) -> str:
        return "?"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.kind} forwarder already started")
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._halt = False  # stop() gave up waiting: the worker ends at its next turn
        self._task = asyncio.create_task(self._run(), name=f"edgewise-forward-{self.kind}")

    async def stop(self) -> None:
        """Let queued chunks leave for up to ``flush_timeout`` s, then stop; the rest is dropped."""
        task = self._task
        if task is None:
            return
        self._closing = True
        if self._idle is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.flush_timeout)
        self._halt = True
        task.cancel()
        try:
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                # a client library swallowed the cancellation (nats-py's connect can): again;
                # the halt flag ends the delivery loop at its next turn
                task.cancel()
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        finally:
            self._task = None
            left = list(self._queue) + ([self._inflight] if self._inflight else [])
            if left:
                self.dropped_chunks += len(left)
                self.dropped_records += sum(c.records for c in left)
                log.warning(
                    "%s forwarder to %s stopped with %d chunk(s) not forwarded",
                    self.kind, self.where, len(left),
                )
            self._queue.clear()
            self._inflight = None
            with contextlib.suppress(Exception):
                await self._close()
            self.connected = False

    async def __aenter__(self) -> QueuedForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the ingest side ----------------------------------------------------------------------
    async def forward(
        self, node_id: str, stream: str, seq_first: int, columns: Mapping[str, np.ndarray]
    ) -> None:
        """Queue a committed chunk; drops (and counts) the oldest queued one when full."""
        if self._task is None or self._wake is None or self._idle is None:
            raise RuntimeError(f"{self.kind} forwarder is not started")
        chunk = Chunk(node_id, stream, seq_first, columns)
        if chunk.records == 0:
            return
        if len(self._queue) >= self.max_queue:
            old = self._queue.popleft()
            self.dropped_chunks += 1
            self.dropped_records += old.records
        self._queue.append(chunk)
        self._idle.clear()
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.where,
            "connected": self.connected,
            "queued_chunks": len(self._queue) + (1 if self._inflight else 0),
            "forwarded_chunks": self.forwarded_chunks,
            "forwarded_records": self.forwarded_records,
            "messages": self.messages,
            "dropped_chunks": self.dropped_chunks,
            "dropped_records": self.dropped_records,
            "refused_chunks": self.refused_chunks,
            "retries": self.retries,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    # -- the worker ---------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None and self._idle is not None
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._queue.popleft()
            self._inflight = chunk
            await self._deliver(chunk)
            self._inflight = None

    async def _deliver(self, chunk: Chunk) -> None:
        while True:
            if self._halt:
                raise asyncio.CancelledError  # counted as not forwarded by stop()
            try:
                if not self.connected:
                    await self._connect()
                    self.connected = True
                    self.retry.connected()
                sent = await self._send(chunk)
            except ForwardRefused as exc:
                self.refused_chunks += 1
                self.dropped_chunks += 1
                self.dropped_records += chunk.records
                self.last_error = str(exc)
                log.warning(
                    "%s forwarder to %s dropped chunk %s/%s seq %d: %s",
                    self.kind, self.where, chunk.node, chunk.stream, chunk.seq_first, exc,
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.connected = False
                with contextlib.suppress(Exception):
                    await self._close()
                delay = self.retry.failed()
                if self.retry.attempts == 1:
                    log.warning(
                        "%s forwarder cannot send to %s (%s); retrying with backoff",
                        self.kind, self.where, self.last_error,
                    )
                self.retries += 1
                await asyncio.sleep(delay)
                continue
            self.forwarded_chunks += 1
            self.forwarded_records += chunk.records
            self.messages += sent
            return

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Open the connection (raise on failure)."""

    @abc.abstractmethod
    async def _send(self, chunk: Chunk) -> int:
        """Send one chunk and wait until the broker has it; return the messages sent."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Close the connection, if any (must not raise CancelledError into `stop`)."""


class ForwarderSet:
    """Several forwarders behind one `forward` (what the ingest holds)."""

    def __init__(self, forwarders: Sequence[QueuedForwarder] = ()) -> None:
        self.forwarders = list(forwarders)

    def __bool__(self) -> bool:
        return bool(self.forwarders)

    def __len__(self) -> int:
        return len(self.forwarders)

    async def start(self) -> None:
        started: list[QueuedForwarder] = []
        try:
            for f in self.forwarders:
                await f.start()
                started.append(f)
        except BaseException:
            for f in reversed(started):
                await f.stop()
            raise

    async def stop(self) -> None:
        if self.forwarders:
            await asyncio.gather(*(f.stop() for f in self.forwarders))

    async def __aenter__(self) -> ForwarderSet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def forward(
        self, node_id: str, stream: str, seq_first: int, columns: Mapping[str, np.ndarray]
    ) -> None:
        for f in self.forwarders:
            await f.forward(node_id, stream, seq_first, columns)

    def stats(self) -> list[dict[str, Any]]:
        return [f.stats() for f in self.forwarders]

    async def forward_committed(self, chunks: Sequence[ChunkWrite],
                                inserted: Set[tuple[str, str, int]]) -> int:
        """Forward the chunks of one group commit that were actually stored.

        ``chunks`` are the `store.ChunkWrite`s given to ``Store.commit_ingest`` and
        ``inserted`` its result's ``chunks`` (keys ``(node, stream, seq_first)``), so a
        duplicate the store skipped is not forwarded again. A chunk a quarantined node sent
        is never forwarded (docs/security.md, "What quarantine allows"). Each payload is
        decoded once for every forwarder. Returns the number of chunks queued; a payload that
        does not decode (the ingest checked it, so this is a bug) is logged and skipped.
        """
        if not self.forwarders:
            return 0
        queued = 0
        for c in chunks:
            if (c.node_id, c.stream, c.seq_first) not in inserted or c.quarantined:
                continue  # skipped by the store, or kept apart: its node is quarantined
            try:
                # a stored chunk may hold millions of records: never decode on the event loop
                columns = await asyncio.to_thread(codec.decode, c.payload)
            except EdgewiseError as exc:
                log.error("not forwarding %s/%s/%d: %s", c.node_id, c.stream, c.seq_first, exc)
                continue
            await self.forward(c.node_id, c.stream, c.seq_first, columns)
            queued += 1
        return queued
