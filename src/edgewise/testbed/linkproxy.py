"""A TCP proxy that plays the network between an edge node and the cloud: it can be cut
(a silent blackhole or a reset) and restored, and it can shape bandwidth and add latency.

Used by `edgewise demo`, the end-to-end partition tests and the backlog-drain benchmark. It only
ever listens and connects on the addresses it is given (loopback in our tests).

* ``blackhole``: nothing is forwarded in either direction and new connections hang, like a
  dead link: TCP on both ends sees no data and no error until its own timeouts fire.
* ``reset``: every connection is closed at once with a TCP reset, and new ones are refused
  until `restore`.
* ``rate`` (bytes/s, each direction) and ``delay`` (seconds, each way) shape what is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass

CHUNK = 16 * 1024


@dataclass
class LinkStats:
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    connections: int = 0
    resets: int = 0


class LinkProxy:
    """Use as ``async with LinkProxy(host, port) as link: ... link.port ...``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rate: float | None = None,
        delay: float = 0.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.rate = rate
        self.delay = delay
        self.stats = LinkStats()
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._mode = "up"
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the link proxy is not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def state(self) -> str:
        return self._mode

    async def __aenter__(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for client, upstream in list(self._conns):
            _abort(client)
            if upstream is not None:
                _abort(upstream)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- control ------------------------------------------------------------------------------
    def cut(self, mode: str = "blackhole") -> None:
        """Cut the link: ``blackhole`` (silence) or ``reset`` (close everything now)."""
        if mode not in ("blackhole", "reset"):
            raise ValueError("mode must be 'blackhole' or 'reset'")
        self._mode = mode
        self._open.clear()
        if mode == "reset":
            for client, upstream in list(self._conns):
                self.stats.resets += 1
                _abort(client)
                if upstream is not None:
                    _abort(upstream)

    def restore(self) -> None:
        self._mode = "up"
        self._open.set()

    # -- plumbing -----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "reset":
            _abort(writer)
            return
        # The connection runs in a task this proxy owns: cancelling asyncio's own handler task
        # makes asyncio log "Exception in callback" (its done-callback calls task.exception()).
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        await asyncio.wait({task})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._conns.add(pair)
        try:
            await self._open.wait()  # a blackholed link: the connection hangs
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._conns.discard(pair)
            pair = (writer, up_writer)
            self._conns.add(pair)
            self.stats.connections += 1
            async with asyncio.TaskGroup() as tg:  # one direction failing ends the other
                tg.create_task(self._pipe(reader, up_writer, "up"))
                tg.create_task(self._pipe(up_reader, writer, "down"))
        except* (OSError, asyncio.IncompleteReadError):  # also from _pipe's task group
            pass
        finally:
            self._conns.discard(pair)
            for w in pair:
                if w is None:
                    continue
                if self._mode == "reset":
                    _abort(w)
                else:
                    _close(w)
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        # the reader stamps each chunk with when it may leave (delay, then the rate's schedule);
        # the writer sends in order at those times, so latency does not cap throughput
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=64)

        async def read() -> None:
            next_free = 0.0
            while True:
                await self._open.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._open.wait()  # cut while we held data: it waits with the link
                due = time.monotonic() + self.delay
                if self.rate:
                    start = max(due, next_free)
                    next_free = start + len(data) / self.rate
                    due = next_free
                await queue.put((due, data))
            # end of stream: the writer sends what is queued, then EOF. Not in a `finally`: on
            # an error or cancellation the task group cancels the writer, and waiting here for
            # room in a full queue whose writer is stuck would never end.
            await queue.put(None)

        async def write() -> None:
            try:
                while (item := await queue.get()) is not None:
                    due, data = item
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await self._open.wait()
                    writer.write(data)
                    await writer.drain()
                    if direction == "up":
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(read())
            tg.create_task(write())


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), like a middlebox dropping the connection."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, RuntimeError, AttributeError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
