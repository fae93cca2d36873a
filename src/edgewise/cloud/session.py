"""The device session: one WebSocket per node carrying batches up and control messages down.

Protocol: docs/decisions/0004-device-protocol.md, messages in `edgewise.sync.protocol`.

Per session three coroutines share one `asyncio.TaskGroup`:

* the reader takes one frame at a time: ``hello`` (first, within `SessionLimits.hello_timeout`),
  then ``batch`` → `ingest` (classify, decode-check, submit to the group commit), ``gap`` →
  record as lost what is not settled yet in its range and move the mark, ``report`` → merge
  and store the reported state, ``heartbeat`` → last seen. Anything malformed gets ``error``
  and the session is closed.
* the acker waits for the group commits in order and sends one ``ack`` per commit with the
  chunk ids it made durable: a batch is acknowledged only after its commit.
* the sender owns the socket's write side; its queue is bounded, and everything the cloud sends
  is control (ack, refuse, desired, revoked, error), so there is nothing to prioritise.

Memory per session is bounded: frames above 4 MiB are refused by aiohttp (close code 1009),
uncommitted payload bytes and pending commits are capped (the reader stops reading, so TCP
pushes back), the send queue is bounded.

`SessionRegistry` knows the live session of each node (at most one: a new session closes the
old one and waits for its commits first), pokes a session when a new desired version is stored
(`notify_desired`), closes it when its node is revoked (`revoke`), and runs the one maintenance
task of the application (batched last-seen writes, revocation reload, closing sessions whose
certificate expired or was revoked elsewhere). There are no timers per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from cryptography import x509

from edgewise.cloud import ingest
from edgewise.cloud.ingest import CONFLICT, DUPLICATE, GroupCommitter, StreamTracker
from edgewise.cloud.metrics import Metrics, tcp_bytes
from edgewise.cloud.store import ChunkWrite, GapWrite, IngestResult, MarkWrite, Store
from edgewise.errors import PeerError, StorageError
from edgewise.security.tls import RevocationList
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
                 registry: SessionRegistry, request: web.Request) -> None:
        self.node_id = node_id
        self.cert = cert
        self.ws = ws
        self.registry = registry
        self.limits = registry.limits
        self.metrics = registry.metrics
        self.sock = request.transport.get_extra_info("socket") if request.transport else None
        self.wire: tuple[int, int] | None = None  # TCP bytes (sent, received) at the end
        self._send: asyncio.Queue[Any] = asyncio.Queue(self.limits.send_queue)
        self._acks: deque[_Pending | None] = deque()
        self._acks_ready = asyncio.Event()
        self._trackers: dict[str, StreamTracker] = {}  # per stream: what is settled
        self._inflight = 0
        self._pending = 0
        self._room = asyncio.Event()
        self._closing = False  # nothing more is sent but the final frames
        self._close_sent = False
        self.replaced = False
        self.finished = asyncio.Event()

    # -- outgoing -----------------------------------------------------------------------------
    def _enqueue(self, msg: dict[str, Any]) -> None:
        if self._closing:
            return
        try:
            self._send.put_nowait(protocol.encode(msg))
        except asyncio.QueueFull:
            self._close_now("error", "the node is not reading its session (send queue full)")

    def _close_now(self, kind: str | None, reason: str,
                   code: int = WSCloseCode.POLICY_VIOLATION) -> None:
        """Send ``error``/``revoked`` (if ``kind``) and close; idempotent."""
        if self._close_sent:
            return
        self._close_sent = True
        if kind is not None:
            frame = protocol.encode({"t": kind, "reason": reason})
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

    def revoke(self, reason: str) -> None:
        self._close_now(protocol.REVOKED, reason)

    def replace(self) -> None:
        self.replaced = True
        self._close_now(protocol.ERROR, "replaced by a newer session of this node",
                        WSCloseCode.GOING_AWAY)

    def poke_desired(self, version: int) -> None:
        self._enqueue({"t": protocol.DESIRED, "version": version})

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
            self.metrics.session_bytes.labels("out").inc(len(item))

    # -- acknowledgements ---------------------------------------------------------------------
    async def _acker(self) -> None:
        acks = self._acks
        while True:
            while not acks:
                self._acks_ready.clear()
                await self._acks_ready.wait()
            head = acks[0]
            if head is None:
                return
            await asyncio.wait([head.future])
            batch: list[_Pending] = []
            while acks and acks[0] is not None and acks[0].future.done():  # type: ignore[union-attr]
                batch.append(acks.popleft())  # type: ignore[arg-type]
            ids: list[int] = []
            for q in batch:
                try:
                    await q.future
                except Exception as exc:
                    self.fail(f"storage failure: {exc}")
                    ids = []
                    break
                finally:
                    self._inflight -= q.nbytes
                    self._pending -= 1
                    self._room.set()
                ids.extend(q.ids)
                if q.duplicate:
                    self.metrics.batches.labels("duplicate").inc(len(q.ids))
                elif q.ids:
                    self.metrics.batches.labels("stored").inc(len(q.ids))
                    self.metrics.records.inc(q.records)
            if ids:
                self._enqueue({"t": protocol.ACK, "ids": ids})

    async def _submit(self, p: _Pending) -> None:
        self._inflight += p.nbytes
        self._pending += 1
        self._acks.append(p)
        self._acks_ready.set()
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
            self.metrics.session_bytes.labels("in").inc(len(msg.data))
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
        streams = await store.load_streams(self.node_id)
        for name, info in streams.items():
            above = await store.settled_above(self.node_id, name, info.contiguous)
            self._trackers[name] = StreamTracker(info.contiguous, above)
        marks = {name: 0 for name in msg["streams"]}
        marks.update({name: tr.contiguous for name, tr in self._trackers.items()})
        self._enqueue({
            "t": protocol.WELCOME, "node_id": self.node_id, "streams": marks,
            "desired_version": await store.desired_version(self.node_id),
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
            await self._submit(_Pending(committer.submit(), [cid], 0, 0, True))
            return
        payload = msg["payload"]
        try:
            await ingest.check_payload_async(payload, records)
        except PeerError as exc:
            self._refuse(cid, str(exc))
            return
        tracker.settle(seq, count)
        now = datetime.now(UTC)
        fut = committer.submit(
            [ChunkWrite(self.node_id, stream, seq, count, records, msg["compacted"], payload,
                        now)],
            marks=[MarkWrite(self.node_id, stream, tracker.contiguous, now)],
        )
        await self._submit(_Pending(fut, [cid], len(payload), records, False))

    def _refuse(self, cid: int, reason: str) -> None:
        self.metrics.batches.labels("refused").inc()
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
            marks=[MarkWrite(self.node_id, stream, tracker.contiguous, now)],
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
        await self.registry.store.merge_reported_state(
            self.node_id, reported, at=self.registry.clock.now())
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
            else:
                self.fail(f"malformed frame: unexpected message type {kind!r} from a node")
                return

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self._sender())
                acker = tg.create_task(self._acker())
                try:
                    await self._reader()
                except StorageError as exc:
                    self.fail(f"storage failure: {exc}")
                finally:
                    # commits already submitted finish (and are acked if the socket is open)
                    # before the session ends: a new session then sees them in the store
                    self._acks.append(None)
                    self._acks_ready.set()
                    await acker
                    self._close_now(None, "session ended", WSCloseCode.OK)
                    await sender
        finally:
            self._closing = True
            self.finished.set()


class SessionRegistry:
    """The live sessions of this process, one per node; see the module docstring."""

    def __init__(self, store: Store, committer: GroupCommitter, metrics: Metrics,
                 revocations: RevocationList, *, limits: SessionLimits | None = None,
                 maintenance_interval: float = 10.0) -> None:
        self.store = store
        self.committer = committer
        self.metrics = metrics
        self.revocations = revocations
        self.limits = limits or SessionLimits()
        self.maintenance_interval = maintenance_interval
        self.clock = Clock("cloud")
        self._sessions: dict[str, Session] = {}
        self._seen: dict[str, datetime] = {}
        self._wire = [0, 0]

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, node_id: str) -> Session | None:
        return self._sessions.get(node_id)

    async def notify_desired(self, node_id: str, version: int) -> bool:
        """Poke the node's live session: desired version ``version`` is stored. True if the
        node is connected here (otherwise it learns the version from ``welcome``)."""
        session = self._sessions.get(node_id)
        if session is None:
            return False
        session.poke_desired(version)
        return True

    async def revoke(self, node_id: str, reason: str = "the node has been revoked") -> bool:
        """Send ``revoked`` to the node's live session and close it. True if there was one."""
        session = self._sessions.get(node_id)
        if session is None:
            return False
        session.revoke(reason)
        return True

    def mark_seen(self, node_id: str) -> None:
        self._seen[node_id] = datetime.now(UTC)

    async def attach(self, session: Session) -> None:
        old = self._sessions.get(session.node_id)
        self._sessions[session.node_id] = session
        self.metrics.sessions.set(len(self._sessions))
        self.metrics.sessions_opened.inc()
        if old is not None:
            old.replace()
            await old.finished.wait()
        await self.store.set_node_status(session.node_id, "online")

    async def detach(self, session: Session) -> None:
        counts = session.wire
        if counts is not None:
            self.metrics.wire_bytes.labels("out").inc(counts[0])
            self.metrics.wire_bytes.labels("in").inc(counts[1])
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            self.metrics.sessions.set(len(self._sessions))
            if not session.replaced:
                with contextlib.suppress(StorageError):
                    await self.store.set_node_status(session.node_id, "offline")

    async def flush_seen(self) -> None:
        seen, self._seen = self._seen, {}
        if seen:
            await self.store.touch_nodes(seen)

    def enforce(self, now: datetime | None = None) -> int:
        """Close live sessions whose certificate is revoked or has expired; how many."""
        t = now or datetime.now(UTC)
        closed = 0
        for session in list(self._sessions.values()):
            if self.revocations.is_revoked(session.cert):
                session.revoke("the node's certificate has been revoked")
                closed += 1
            elif session.cert.not_valid_after_utc < t:
                session.fail("certificate expired: renew it and reconnect")
                closed += 1
        return closed

    async def maintenance(self) -> None:
        """The application's one periodic task (not one per node)."""
        rounds = 0
        while True:
            await asyncio.sleep(self.maintenance_interval)
            rounds += 1
            try:
                await self.flush_seen()
                if rounds % 3 == 0:  # other replicas may have revoked nodes
                    serials, fingerprints = await self.store.list_revocations()
                    for serial in serials:
                        self.revocations.revoke_serial(serial)
                    for fp in fingerprints:
                        self.revocations.revoke_key(fp)
                self.enforce()
            except StorageError as exc:
                log.warning("maintenance: %s", exc)

    async def close_all(self) -> None:
        sessions = list(self._sessions.values())
        for s in sessions:
            s.fail("the control plane is shutting down")
        for s in sessions:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.finished.wait(), 5)
        with contextlib.suppress(StorageError):
            await self.flush_seen()


async def handle_session(request: web.Request, registry: SessionRegistry, node_id: str,
                         cert: x509.Certificate) -> web.WebSocketResponse:
    """Upgrade an authenticated request to the session and run it to its end."""
    ws = web.WebSocketResponse(max_msg_size=protocol.MAX_FRAME_BYTES,
                               heartbeat=registry.limits.heartbeat, compress=False)
    await ws.prepare(request)
    session = Session(node_id, cert, ws, registry, request)
    await registry.attach(session)
    try:
        if not session.replaced:
            await session.run()
    finally:
        session.finished.set()
        await registry.detach(session)
    return ws
