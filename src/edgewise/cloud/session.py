"""The device session: one WebSocket per node carrying batches up and control messages down.

Protocol: docs/decisions/0004-device-protocol.md, messages in `edgewise.sync.protocol`.

Per session two coroutines share one `asyncio.TaskGroup`:

* the reader takes one frame at a time: ``hello`` (first, within `SessionLimits.hello_timeout`),
  then ``batch`` → `ingest` (classify, decode-check, submit to the group commit), ``gap`` →
  record as lost what is not settled yet in its range and move the mark, ``report`` → queue
  the reported state for the group writer (`node_writes`), ``heartbeat`` → last seen (the
  node's ``online`` status is queued once its hello is read; nothing is written before).
  Anything malformed gets ``error`` and the session is closed.
* acknowledgements need no task: each submitted write's future calls `Session._settle` when
  its group commit ends, which takes the finished writes from the head of the session's queue
  in order and sends one ``ack`` with the chunk ids they made durable: a batch is
  acknowledged only after its commit.
* the sender owns the socket's write side; its queue is bounded, and everything the cloud sends
  is control (ack, refuse, desired, revoked, error), so there is nothing to prioritise.

Memory per session is bounded: frames above 4 MiB are refused by aiohttp (close code 1009),
a frame is decoded within `protocol`'s budgets (cheap enough for the event loop), a payload
is checked within the codec's (in a worker thread, one of ``SessionLimits.check_threads``,
unless it is small), uncommitted payload bytes and pending commits are capped (the reader
stops reading, so TCP pushes back), the send queue is bounded. A session's writes are
submitted each ``after`` the one before, so they are committed in order or not at all.

The registry of live sessions (one per node), the maintenance task and `handle_session` (the
upgrade) are in `sessions`; a session sees its registry only as a `SessionHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import WSCloseCode, WSMsgType, web
from cryptography import x509

from edgewise.cloud import ingest
from edgewise.cloud.ingest import CONFLICT, DUPLICATE, GroupCommitter, StreamTracker
from edgewise.cloud.metrics import Metrics, tcp_bytes
from edgewise.cloud.node_writes import NodeWrites
from edgewise.cloud.ratelimit import ByteQuota
from edgewise.cloud.store import ChunkWrite, GapWrite, IngestResult, MarkWrite, Store
from edgewise.errors import PeerError, StorageError
from edgewise.security.tls import public_key_fingerprint
from edgewise.sync import protocol
from edgewise.sync.hlc import Clock
from edgewise.sync.twin_state import ReportedState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    hello_timeout: float = 10.0  # s for the first frame
    heartbeat: float = 30.0  # s between WebSocket pings; no pong in time closes the session
    max_inflight_bytes: int = 16 * 1024 * 1024  # payload bytes waiting for their commit
    max_pending_commits: int = 1024
    send_queue: int = 4096  # frames
    check_threads: int = 2  # payload checks running at once, for all sessions of a process
    ingest_bytes_per_s: float = 8 * 1024 * 1024  # a node's payload quota; over it: backpressure
    ingest_burst_bytes: float = 64 * 1024 * 1024  # taken at once (a backlog after an outage)


class SessionHost(Protocol):
    """What a session uses of its registry (`sessions.SessionRegistry`)."""

    store: Store
    committer: GroupCommitter
    metrics: Metrics
    limits: SessionLimits
    clock: Clock
    checks: asyncio.Semaphore  # `check_threads` slots
    node_writes: NodeWrites  # status and reports, written in groups

    def mark_seen(self, node_id: str) -> None: ...

    def node_health(self, node_id: str, heartbeat: dict[str, Any]) -> None: ...

    async def quarantine_at_hello(self, node_id: str) -> bool: ...

    def hello_done(self) -> None: ...


_CLOSE = object()


@dataclass
class _Pending:
    future: asyncio.Future[IngestResult]
    ids: list[int]
    nbytes: int
    records: int
    duplicate: bool


class Session:
    """One node's live session. Made and run by `handle_session`."""

    def __init__(self, node_id: str, cert: x509.Certificate, ws: web.WebSocketResponse,
                 registry: SessionHost, request: web.Request,
                 fingerprint: str | None = None) -> None:
        self.node_id = node_id
        # what the registry checks of the certificate every maintenance round (`enforce`),
        # read once: at 10,000 sessions the key hash alone was 1.7% of the busy loop
        self.serial: int = cert.serial_number
        self.fingerprint = fingerprint or public_key_fingerprint(cert)
        self.not_after = cert.not_valid_after_utc
        self.ws = ws
        self.registry = registry
        self.limits = registry.limits
        self.metrics = registry.metrics
        self.sock = request.transport.get_extra_info("socket") if request.transport else None
        self.wire: tuple[int, int] | None = None  # TCP bytes (sent, received) at the end
        self._send: asyncio.Queue[Any] = asyncio.Queue(self.limits.send_queue)
        self._acks: deque[_Pending] = deque()  # submitted, in order, not yet acknowledged
        self._store_failed = False  # a commit of this session failed: no more acks
        self._trackers: dict[str, StreamTracker] = {}  # per stream: what is settled
        self._last: asyncio.Future[IngestResult] | None = None  # the last write submitted
        self._inflight = 0
        self._pending = 0
        self._room = asyncio.Event()
        self._closing = False  # nothing more is sent but the final frames
        self._close_sent = False
        self.replaced = False
        self.hello_read = False  # the node's hello was read and answered
        # its node is quarantined: its chunks are stored flagged, apart from trusted data
        # (docs/security.md, "What quarantine allows"); kept current by the registry
        self.quarantined = False
        self.opened = time.monotonic()  # when its node must have attested by (`sessions`)
        self.opened_at = time.time()  # wall clock: which of two processes' sessions is newer
        # its writes are done and it submits no more (the reader has stopped and every commit
        # it submitted has ended): what a newer session of the node waits for (`attach`)
        self.settled = asyncio.Event()
        self.finished = asyncio.Event()  # the session is over, its socket closed
        self.quota = ByteQuota(self.limits.ingest_bytes_per_s, self.limits.ingest_burst_bytes)

    # -- outgoing -----------------------------------------------------------------------------
    def _enqueue(self, msg: dict[str, Any]) -> None:
        if self._closing:
            return
        try:
            self._send.put_nowait(protocol.encode(msg))
        except asyncio.QueueFull:
            self._close_now("error", "the node is not reading its session (send queue full)")

    def _close_now(self, kind: str | None, reason: str,
                   code: int = WSCloseCode.POLICY_VIOLATION,
                   extra: dict[str, Any] | None = None) -> None:
        """Send ``error``/``revoked`` (if ``kind``, with ``extra`` fields) and close;
        idempotent."""
        if self._close_sent:
            return
        self._close_sent = True
        if kind is not None:
            frame = protocol.encode({"t": kind, "reason": reason, **(extra or {})})
            # make room: the closing message must go out even if the queue is full
            while self._send.full():
                self._send.get_nowait()
            self._send.put_nowait(frame)
            if kind == protocol.ERROR:
                self.metrics.session_errors.labels(reason.split(":")[0][:40]).inc()
        self._closing = True
        while self._send.full():
            self._send.get_nowait()
        self._send.put_nowait((_CLOSE, code, reason))
        self._room.set()

    def fail(self, reason: str) -> None:
        log.info("session of %s closed: %s", self.node_id, reason)
        self._close_now(protocol.ERROR, reason)

    def revoke(self, reason: str, *, decommissioned: bool = False, wipe: bool = False) -> None:
        """Send ``revoked`` (saying whether the node was decommissioned and must wipe itself)
        and close."""
        extra = {"decommissioned": True, "wipe": wipe} if decommissioned else None
        self._close_now(protocol.REVOKED, reason, extra=extra)

    def replace(self, elsewhere: bool = False) -> None:
        """A newer session of the node takes over (here, or in another control-plane process
        if ``elsewhere``): close this one. Before its hello is read a session has written
        nothing and never will (its reader stops after the hello once it is closing), so it
        is settled at once."""
        self.replaced = True
        if not self.hello_read:
            self.settled.set()
        where = " (at another control-plane process)" if elsewhere else ""
        self._close_now(protocol.ERROR, f"replaced by a newer session of this node{where}",
                        WSCloseCode.GOING_AWAY)

    def poke_desired(self, version: int, jitter: float = 0.0,
                     state: dict[str, Any] | None = None) -> None:
        """Tell the node desired ``version`` is stored; with ``jitter`` (s) it waits a random
        part of that before it fetches (a push to many nodes, `pokes.fetch_jitter`). With
        ``state`` (the version's wire map, small: `pokes.inline_state`) the state goes in the
        poke itself and the node need not fetch (`protocol`, inline desired state)."""
        msg: dict[str, Any] = {"t": protocol.DESIRED, "version": version}
        if state is not None:
            msg["state"] = state
        if jitter > 0:
            msg["jitter_s"] = round(min(jitter, protocol.MAX_JITTER_S), 3)
        self._enqueue(msg)

    async def _sender(self) -> None:
        while True:
            item = await self._send.get()
            if isinstance(item, tuple) and item[0] is _CLOSE:
                _, code, reason = item
                self.wire = tcp_bytes(self.sock)
                with contextlib.suppress(Exception):
                    await self.ws.close(code=code, message=reason[:120].encode())
                return
            try:
                await self.ws.send_bytes(item)
            except (ConnectionError, RuntimeError):
                self._closing = True
                self.wire = tcp_bytes(self.sock)
                return
            self.metrics.bytes_out.inc(len(item))

    # -- acknowledgements ---------------------------------------------------------------------
    def _settle(self, _done: object = None) -> None:
        """Acknowledge the writes at the head of the queue whose commits have ended, in order:
        one ``ack`` with their chunk ids. The done-callback of every submitted future (no task
        of its own: at 10,000 nodes each task wake-up per batch counts); the first failed
        commit fails the session, and neither it nor anything after it is acknowledged."""
        acks = self._acks
        ids: list[int] = []
        while acks and acks[0].future.done():
            q = acks.popleft()
            self._inflight -= q.nbytes
            self._pending -= 1
            fut = q.future
            exc = (asyncio.CancelledError("the commit was cancelled") if fut.cancelled()
                   else fut.exception())
            if exc is not None and not self._store_failed:
                self._store_failed = True
                self.fail(f"storage failure: {exc}")
            if self._store_failed:  # read (not left unretrieved), never acknowledged
                continue
            ids.extend(q.ids)
            if q.duplicate:
                self.metrics.batches_duplicate.inc(len(q.ids))
            elif q.ids:
                self.metrics.batches_stored.inc(len(q.ids))
                self.metrics.records.inc(q.records)
        self._room.set()
        if ids:
            self._enqueue({"t": protocol.ACK, "ids": ids})

    async def _settle_all(self) -> None:
        """Wait for every commit submitted and acknowledge what they stored."""
        while self._acks:
            await asyncio.wait([q.future for q in self._acks])
            self._settle()  # its callbacks ran first; this makes sure

    async def _submit(self, p: _Pending) -> None:
        self._last = p.future
        self._inflight += p.nbytes
        self._pending += 1
        self._acks.append(p)
        p.future.add_done_callback(self._settle)
        while not self._closing and (self._inflight > self.limits.max_inflight_bytes
                                     or self._pending > self.limits.max_pending_commits):
            self._room.clear()
            await self._room.wait()

    # -- incoming -----------------------------------------------------------------------------
    async def _frame(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message, or None when the session is over (closed, or failed here)."""
        try:
            msg = await self.ws.receive(timeout=timeout)
        except TimeoutError:
            self.fail(f"no hello within {self.limits.hello_timeout:g} s" if timeout
                      else "receive timed out")
            return None
        if msg.type == WSMsgType.BINARY:
            self.metrics.bytes_in.inc(len(msg.data))
            try:
                return protocol.decode(msg.data)
            except PeerError as exc:
                self.fail(f"malformed frame: {exc}")
                return None
        if msg.type == WSMsgType.TEXT:
            self.fail("malformed frame: text frames are not part of the protocol; "
                      "send msgpack in binary frames")
            return None
        if msg.type == WSMsgType.ERROR:
            # aiohttp has already closed with 1009 for an oversized frame
            self.metrics.session_errors.labels("transport").inc()
            log.info("session of %s: %s", self.node_id, self.ws.exception())
        self._closing = True
        return None

    def _tracker(self, stream: str) -> StreamTracker:
        tr = self._trackers.get(stream)
        if tr is None:
            tr = self._trackers[stream] = StreamTracker()
        return tr

    async def _hello(self) -> bool:
        msg = await self._frame(self.limits.hello_timeout)
        if msg is None:
            return False
        if msg["t"] != protocol.HELLO:
            self.fail(f"malformed frame: the first message must be hello, not {msg['t']}")
            return False
        try:
            for name, prio in msg["streams"].items():
                ingest.check_stream_name(name)
                if isinstance(prio, bool) or not isinstance(prio, int):
                    raise PeerError(f"priority of stream {name!r} must be an integer")
        except PeerError as exc:
            self.fail(f"malformed frame: hello: {exc}")
            return False
        store = self.registry.store
        self.quarantined = await self.registry.quarantine_at_hello(self.node_id)
        # marks, settled ranges and the desired version: one read transaction (a storm)
        streams, desired_version = await store.session_start(self.node_id)
        for name, (contiguous, above) in streams.items():
            self._trackers[name] = StreamTracker(contiguous, above)
        marks = {name: 0 for name in msg["streams"]}
        marks.update({name: tr.contiguous for name, tr in self._trackers.items()})
        self.hello_read = True
        self.registry.hello_done()
        self.registry.node_writes.status(self.node_id, "online")  # written with the next group
        self._enqueue({
            "t": protocol.WELCOME, "node_id": self.node_id, "streams": marks,
            "desired_version": desired_version,
        })
        return True

    async def _batch(self, msg: dict[str, Any]) -> None:
        cid, seq, count, records = msg["id"], msg["seq"], msg["count"], msg["records"]
        try:
            stream = ingest.check_stream_name(msg["stream"])
        except PeerError as exc:
            self._refuse(cid, str(exc))
            return
        tracker = self._tracker(stream)
        verdict = tracker.classify(seq, count)
        if verdict.kind == CONFLICT:
            self._refuse(cid, verdict.reason)
            return
        committer = self.registry.committer
        if verdict.kind == DUPLICATE:
            self.metrics.duplicate_records.inc(records)
            await self._submit(_Pending(committer.submit(after=self._last), [cid], 0, 0, True))
            return
        payload = msg["payload"]
        wait = self.quota.take(len(payload))
        if wait > 0:  # over the node's quota: read its next frame later (its window fills)
            await asyncio.sleep(wait)
        started = time.perf_counter()
        try:
            await ingest.check_payload_async(payload, records, self.registry.checks)
        except PeerError as exc:
            self._refuse(cid, str(exc))
            return
        finally:
            self.metrics.payload_checks.observe(time.perf_counter() - started)
        tracker.settle(seq, count)
        now = datetime.now(UTC)
        fut = committer.submit(
            [ChunkWrite(self.node_id, stream, seq, count, records, msg["compacted"], payload,
                        now, self.quarantined)],
            marks=[MarkWrite(self.node_id, stream, tracker.contiguous, now)], after=self._last,
        )
        await self._submit(_Pending(fut, [cid], len(payload), records, False))

    def _refuse(self, cid: int, reason: str) -> None:
        self.metrics.batches_refused.inc()
        self._enqueue({"t": protocol.REFUSE, "id": cid, "reason": reason})

    async def _gap(self, msg: dict[str, Any]) -> bool:
        seq, count = msg["seq"], msg["count"]
        try:
            stream = ingest.check_stream_name(msg["stream"])
        except PeerError as exc:
            self.fail(f"malformed frame: gap: {exc}")
            return False
        tracker = self._tracker(stream)
        parts = tracker.unsettled(seq, count)
        if not parts:
            return True  # all of it is settled already (stored, or reported lost before)
        now = datetime.now(UTC)
        reason = msg["reason"][:500]
        for first, n in parts:
            tracker.settle(first, n, gap=True)
        fut = self.registry.committer.submit(
            gaps=[GapWrite(self.node_id, stream, first, n, reason, now) for first, n in parts],
            marks=[MarkWrite(self.node_id, stream, tracker.contiguous, now)], after=self._last,
        )
        self.metrics.gap_records.inc(sum(n for _, n in parts))
        await self._submit(_Pending(fut, [], 0, 0, False))
        return True

    async def _report(self, msg: dict[str, Any]) -> bool:
        try:
            reported = ReportedState.from_wire(msg["report"])
        except PeerError as exc:
            self.fail(f"malformed frame: report: {exc}")
            return False
        # merged and stored with the next group write (`node_writes`), not one transaction each
        self.registry.node_writes.report(self.node_id, reported, self.registry.clock.now())
        self.registry.mark_seen(self.node_id)
        return True

    async def _reader(self) -> None:
        if not await self._hello():
            return
        while not self._closing:
            msg = await self._frame()
            if msg is None:
                return
            kind = msg["t"]
            if kind == protocol.BATCH:
                await self._batch(msg)
            elif kind == protocol.GAP:
                if not await self._gap(msg):
                    return
            elif kind == protocol.REPORT:
                if not await self._report(msg):
                    return
            elif kind == protocol.HEARTBEAT:
                self.registry.mark_seen(self.node_id)
                if "health" in msg:  # kept in memory, written with the last-seen times
                    self.registry.node_health(self.node_id, msg)
            else:
                self.fail(f"malformed frame: unexpected message type {kind!r} from a node")
                return

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self._sender())
                try:
                    await self._reader()
                except StorageError as exc:
                    self.fail(f"storage failure: {exc}")
                finally:
                    # commits already submitted finish (and are acked if the socket is open)
                    # before the session ends: a new session then sees them in the store
                    await self._settle_all()
                    self.settled.set()  # a newer session need not wait for the close below
                    self._close_now(None, "session ended", WSCloseCode.OK)
                    await sender
        finally:
            self._closing = True
            self.settled.set()
            self.finished.set()
