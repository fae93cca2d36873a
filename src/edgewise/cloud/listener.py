"""The listening port: TLS handshakes under a deadline and a cap, then aiohttp.

aiohttp's `web.TCPSite` hands the TLS context to ``loop.create_server``, which neither limits
how many handshakes run at once nor lets us see a handshake that fails. `GatedSite` binds the
listening sockets itself and accepts connections as plain sockets (`Gate.accept_ready`); a
connection admitted to its handshake becomes a TLS transport through
``loop.connect_accepted_socket`` (``ssl_handshake_timeout``). So it knows every connection from
accept to close, and a connection waiting for its handshake is a bare socket with its
ClientHello unread in the kernel: no transport, no buffers. (An earlier version accepted
through ``loop.create_server`` and paused the new transport in ``connection_made``; uvloop
starts reading right after ``connection_made``, so the ClientHello was lost and the handshake
hung until its timeout.) This works the same on asyncio's loop and on uvloop
(`edgewise.common.eventloop`):

* **admission.** A token bucket (``handshake_rate`` per s, ``handshake_burst``) paces the
  handshakes: a connection accepted when the bucket is empty waits in a FIFO (at most
  ``handshake_queue``; beyond it, closed at once with a reset) with its ClientHello unread, and
  its handshake starts when a token is back, so a reconnect storm becomes a queue instead of
  handshake timeouts and retries. The handshake timeout runs from the start of the handshake.
* **cap.** A connection is *unauthenticated* from its handshake's start until it ends with a
  verified client certificate (a node); connections without one (operators, enrolment,
  health checks) stay counted until they close. Beyond ``max_unauthenticated`` a new
  connection is closed at once, before the handshake costs anything (about 230 KB of TLS
  buffers each). (Making it wait for a slot instead was tried twice, and reconnect storms got
  slower or collapsed: the work let through overran what follows the handshake.)
* **queue wait.** A connection that waited ``queue_wait`` (5 s) from its accept for a token
  is closed (counted as ``expired``): its node is about to give up on its connect (10 s), and
  a handshake started for it would be wasted.
* **handshake timeout.** A handshake not finished within ``handshake_timeout`` is aborted.
* **read timeout.** After the handshake, and again from the first byte after an idle spell,
  a request head must be complete within ``read_timeout`` (slowloris; a TLS connection that
  sends nothing). `track_requests` (a middleware) tells the connection when a request has
  reached the application; while one runs (a WebSocket session runs for its whole life) the
  timer is off. Bodies are read under the same timeout by `request_body`.
* **idle timeout** between requests is aiohttp's own ``keepalive_timeout`` (`app.start`).

The counters (`Gate.refused`, ``queued``, ``handshake_failures``, ``read_timeouts``,
``unauthenticated``, ``expired``) are exported as metrics by `app`. Running out of
descriptors at ``accept`` (EMFILE) stops accepting for `ACCEPT_PAUSE` s and is logged, as
asyncio's own server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from edgewise.cloud.ratelimit import TokenBucket
from edgewise.common.tls import lean_read_buffer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCEPT_BATCH = 100  # connections accepted per readiness of the listening socket, at most
ACCEPT_PAUSE = 1.0  # s without accepting after running out of descriptors or memory
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class Gate:
    """Admits connections, runs their TLS handshakes and hands them to aiohttp."""

    def __init__(self, server: web.Server, ssl_context: ssl.SSLContext, *,
                 handshake_timeout: float, read_timeout: float,
                 max_unauthenticated: int, handshake_rate: float = 300.0,
                 handshake_burst: int = 100, handshake_queue: int = 4096,
                 queue_wait: float = 5.0) -> None:
        self.server = server
        # admission: a token bucket paces handshakes; connections beyond it wait in a FIFO
        # (accepted sockets, their ClientHello unread) instead of timing out
        self.bucket = TokenBucket(handshake_rate, handshake_burst)
        self.handshake_queue = handshake_queue
        self.queue_wait = queue_wait  # s a connection may wait from accept, at most
        self.queued = 0  # connections that waited for a token (in all)
        self.expired = 0  # closed after waiting queue_wait without a start
        # (socket, when accepted), oldest first
        self._waiting: deque[tuple[socket.socket, float]] = deque()
        self._drain_at: asyncio.TimerHandle | None = None
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.read_timeout = read_timeout
        self.max_unauthenticated = max_unauthenticated
        self.unauthenticated = 0  # connections counted against the cap now
        self.refused = 0  # closed at accept: the cap was reached
        self.handshake_failures = 0  # handshakes that failed or timed out
        self.read_timeouts = 0  # connections closed because a request head was too slow
        self.accept_errors = 0  # accept() failed for want of descriptors or memory
        self._handshakes: set[asyncio.Task[None]] = set()

    # -- accepting ------------------------------------------------------------------------
    def accept_ready(self, listening: socket.socket) -> None:
        """The listening socket is readable: accept what is there (a bounded number)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # out of descriptors or memory: stop accepting for a moment (as asyncio does)
                self.accept_errors += 1
                log.error("cannot accept connections (%s); trying again in %g s",
                          exc.strerror or exc, ACCEPT_PAUSE)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listening.fileno())
                loop.call_later(ACCEPT_PAUSE, self._resume_accepting, listening)
                return
            sock.setblocking(False)
            self.admit(sock)

    def _resume_accepting(self, listening: socket.socket) -> None:
        if listening.fileno() >= 0:  # not closed meanwhile
            asyncio.get_running_loop().add_reader(listening.fileno(), self.accept_ready,
                                                  listening)

    def admit(self, sock: socket.socket) -> None:
        """A connection just accepted: its handshake starts now, later, or never."""
        if self.unauthenticated >= self.max_unauthenticated:  # the cap: closed at once
            # (waiting for a slot instead was tried twice and made 5,000- and 10,000-node
            # storms slower or collapse: docs/benchmarks.md, "The cap's wait, tried again")
            self.refused += 1
            _abort(sock)
            return
        if not self._waiting and self.bucket.take() == 0.0:
            self._start(sock)
            return
        if len(self._waiting) >= self.handshake_queue:
            self.refused += 1
            _abort(sock)
            return
        self.queued += 1
        self._waiting.append((sock, time.monotonic()))
        self._schedule()

    def _start(self, sock: socket.socket) -> None:
        self.unauthenticated += 1
        task = asyncio.get_running_loop().create_task(self._handshake(sock))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _schedule(self) -> None:
        """Drain when a token is back or the oldest waiter's time is up, whichever comes
        first; at the cap, at that time (`release` drains sooner when a slot frees)."""
        if self._drain_at is None and self._waiting:
            delay = self._waiting[0][1] + self.queue_wait - time.monotonic()
            if self.unauthenticated < self.max_unauthenticated:
                delay = min(delay, self.bucket.wait())
            self._drain_at = asyncio.get_running_loop().call_later(max(delay, 0.001),
                                                                   self._drain)

    def _drain(self) -> None:
        """Start waiting handshakes as tokens and the cap allow, oldest first; close those
        that waited `queue_wait` (their node is about to give up on its connect)."""
        self._drain_at = None
        now = time.monotonic()
        while self._waiting:
            sock, since = self._waiting[0]
            if now - since >= self.queue_wait:
                self._waiting.popleft()
                self.expired += 1
                _abort(sock)
                continue
            if _gone(sock):  # the peer gave up while waiting
                self._waiting.popleft()
                sock.close()
                continue
            if self.unauthenticated >= self.max_unauthenticated:
                break  # `release` drains again when a slot frees
            if self.bucket.take() > 0.0:
                break
            self._waiting.popleft()
            self._start(sock)
        self._schedule()

    def release(self) -> None:
        self.unauthenticated -= 1
        if self._waiting:  # a slot: drain now, not at a waiter's expiry
            if self._drain_at is not None:
                self._drain_at.cancel()
                self._drain_at = None
            self._schedule()

    async def _handshake(self, sock: socket.socket) -> None:
        conn = _Connection(self)
        loop = asyncio.get_running_loop()
        try:
            tls, _ = await loop.connect_accepted_socket(
                lambda: conn, sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout)
        # from here the loop's transport owns the socket and closes it when the handshake
        # fails or is cancelled (uvloop's closes the descriptor itself: closing it here too
        # could close a descriptor reused by another connection meanwhile)
        except asyncio.CancelledError:
            self.release()
            raise
        except Exception as exc:  # any failed handshake ends the same way
            self.release()
            self.handshake_failures += 1
            log.debug("TLS handshake failed: %r", exc)
            return
        transport = cast(asyncio.Transport, tls)
        ssl_object = transport.get_extra_info("ssl_object")
        has_cert = ssl_object is not None and ssl_object.getpeercert(binary_form=True)
        if has_cert:  # verified by the TLS layer against our CA: a node, not counted
            self.release()
        conn.start(transport, counted=not has_cert)

    def close(self) -> None:
        """Abort the handshakes still running and those waiting (the server is stopping)."""
        if self._drain_at is not None:
            self._drain_at.cancel()
            self._drain_at = None
        while self._waiting:
            _abort(self._waiting.popleft()[0])
        for task in list(self._handshakes):
            task.cancel()


def _abort(sock: socket.socket) -> None:
    """Close at once with a reset (nothing of the connection is kept, as transport.abort)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _gone(sock: socket.socket) -> bool:
    """Whether the peer of a waiting connection has closed or reset it (its ClientHello,
    if any, stays unread: MSG_PEEK)."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class _Listening:
    """The listening sockets of a `GatedSite`, read by `Gate.accept_ready`: what aiohttp's
    runner needs of a server (``sockets``, ``close``)."""

    def __init__(self, sockets: list[socket.socket], gate: Gate) -> None:
        self.sockets = sockets
        loop = asyncio.get_running_loop()
        for sock in sockets:
            loop.add_reader(sock.fileno(), gate.accept_ready, sock)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        return None


async def _listen(host: str, port: int, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port`` (every address it resolves to,
    as ``loop.create_server`` binds them)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Connection(asyncio.Protocol):
    """The application protocol of one TLS connection: aiohttp's request handler behind the
    read timeout and the cap's bookkeeping."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.handler: RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.busy = 0  # requests the application is handling now
        self._early: list[bytes] = []  # data that came with the end of the handshake
        self._lost = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self, transport: asyncio.Transport, *, counted: bool) -> None:
        if self._lost:  # gone before the handshake's end was processed
            if counted:
                self.gate.release()
            return
        self.transport, self.counted = transport, counted
        handler = self.gate.server()
        self.handler = handler
        handler.connection_made(transport)
        self._arm()
        early, self._early = self._early, []
        for data in early:
            handler.data_received(data)

    # -- the read timeout -----------------------------------------------------------------
    def _arm(self) -> None:
        if self._timer is None and not self._lost:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.gate.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.busy == 0 and self.transport is not None and not self._lost:
            self.gate.read_timeouts += 1
            self.transport.abort()

    def request_started(self) -> None:
        self.busy += 1
        self._disarm()

    def request_finished(self) -> None:
        self.busy -= 1  # the next request's first byte starts the timer again

    # -- asyncio.Protocol, passed on to aiohttp -------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            self._early.append(data)
            return
        if self.busy == 0:
            self._arm()
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        if self.counted:
            self.counted = False
            self.gate.release()
        if self.handler is not None:
            self.handler.connection_lost(exc)


@web.middleware
async def track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection a request is being handled (no read timeout meanwhile)."""
    transport = request.transport
    conn = transport.get_protocol() if transport is not None else None
    if not isinstance(conn, _Connection):  # e.g. a test server without the gate
        return await handler(request)
    conn.request_started()
    try:
        return await handler(request)
    finally:
        conn.request_finished()


class GatedSite(web.BaseSite):
    """Like `web.TCPSite` with TLS, with the handshake done by a `Gate` (see above)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext, handshake_timeout: float, read_timeout: float,
                 max_unauthenticated: int, backlog: int = 4096, reuse_port: bool = False,
                 **admission: Any) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port = host, port
        self._reuse_port = reuse_port  # several processes on one port (`cloud serve --processes`)
        self._tls = ssl_context
        self._limits: dict[str, Any] = {"handshake_timeout": handshake_timeout,
                                        "read_timeout": read_timeout,
                                        "max_unauthenticated": max_unauthenticated,
                                        **admission}
        self.gate: Gate | None = None

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        lean_read_buffer()  # 16 KiB TLS reads: 256 KiB less per session (edgewise.common.tls)
        await super().start()
        server = self._runner.server
        assert server is not None
        self.gate = Gate(server, self._tls, **self._limits)
        sockets = await _listen(self._host, self._port, self._backlog, self._reuse_port)
        self._server = _Listening(sockets, self.gate)  # type: ignore[assignment]

    async def stop(self) -> None:
        await super().stop()
        if self.gate is not None:
            self.gate.close()
