"""Send-side flow control of an uplink session: the two-lane send queue and the window.

`Lanes` orders frames (control strictly before data); `Window` bounds the unacknowledged
chunks of a session by bytes and by count, and tells the feeder when to refill; `Sent` is
what the node remembers of a chunk it sent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from edgewise.edge.identity import ConfigError


class Lanes:
    """Two send queues with strict priority: every control frame before any data frame."""

    def __init__(self) -> None:
        self._control: deque[bytes] = deque()
        self._data: deque[bytes] = deque()
        self._ready = asyncio.Event()

    def put_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self._ready.set()

    def put_data(self, frame: bytes) -> None:
        self._data.append(frame)
        self._ready.set()

    def get_nowait(self) -> tuple[bytes, bool] | None:
        if self._control:
            return self._control.popleft(), True
        if self._data:
            return self._data.popleft(), False
        return None

    async def get(self) -> tuple[bytes, bool]:
        """The next frame and whether it is control."""
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            self._ready.clear()
            await self._ready.wait()

    def __len__(self) -> int:
        return len(self._control) + len(self._data)


@dataclass
class Sent:
    """What the node remembers of a chunk it sent."""

    stream: str
    seq_first: int
    seq_count: int
    records: int
    nbytes: int


class Window:
    """Unacknowledged chunks of the current session, bounded by bytes and by count.

    Refilled in bulk: once full, the feeder waits until a quarter of the byte budget is free
    (or nothing is in flight), so it reads the outbox in few, large steps.
    """

    def __init__(self, max_bytes: int, max_chunks: int) -> None:
        if max_bytes <= 0 or max_chunks <= 0:
            raise ConfigError("the uplink window must allow at least one byte and one chunk")
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self.refill = max(max_bytes // 4, 1)
        self.chunks: dict[int, Sent] = {}
        self.bytes = 0
        self._ready = asyncio.Event()
        self._ready.set()

    def room(self) -> int:
        return self.max_bytes - self.bytes

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes or len(self.chunks) >= self.max_chunks

    def _refillable(self) -> bool:
        return len(self.chunks) < self.max_chunks and (
            not self.chunks or self.room() >= self.refill)

    def add(self, chunk_id: int, sent: Sent) -> None:
        self.chunks[chunk_id] = sent
        self.bytes += sent.nbytes
        if not self._refillable():
            self._ready.clear()

    def release(self, chunk_id: int) -> Sent | None:
        sent = self.chunks.pop(chunk_id, None)
        if sent is not None:
            self.bytes -= sent.nbytes
            if self._refillable():
                self._ready.set()
        return sent

    async def wait_room(self) -> None:
        """Until the window can take a refill."""
        while not self._refillable():
            self._ready.clear()
            await self._ready.wait()
