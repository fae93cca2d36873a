"""The uplink: one long-lived WebSocket session carrying the outbox to the control plane.

Protocol: docs/decisions/0004-device-protocol.md, messages in `edgewise.sync.protocol`.

Per session: ``hello`` → ``welcome`` (the cloud's contiguous mark per stream: chunks wholly
below it are already stored, so they are acknowledged locally without resending) → then four
tasks until the link drops:

* **feeder**: takes chunks with `Outbox.peek` (highest priority first, oldest first) while the
  unacknowledged bytes stay under the window, and queues them as ``batch`` frames;
* **sender**: the only writer of the socket; two lanes with strict priority, so control
  (``report``, ``heartbeat``) always goes before data (``batch``, ``gap``). A data frame
  already on the wire is not interrupted: control waits at most one chunk;
* **receiver**: ``ack`` releases the window and hands the ids to the acker, ``refuse`` marks a
  chunk as never to be sent again (persisted, counted in status), ``desired`` pokes the twin,
  ``revoked`` stops the agent (`Revoked`), ``error`` ends the session;
* **ticker**: heartbeats, periodic reports, gap detection, wire byte sampling.

The **acker** runs across sessions: it records the acknowledged sequence ranges, then deletes
the chunks with the engine's own `Outbox.ack` (so the engine's counters stay right), off the
event loop. A chunk stays excluded from sending until its deletion is done.

**Gaps.** The outbox counts dropped records, not their sequence numbers, and the cloud treats
a gap that overlaps anything it stored as a protocol violation (the session is closed). So the
uplink keeps a small persisted `Ledger` (``DATA/uplink/ledger.msgpack``, written with fsync
*before* the frames it describes are sent): per stream the sequence ranges ever sent (a superset
of what the cloud may hold above its mark) and the exact gap ranges reported. A gap is a range
from the cloud's mark up to ``next_seq`` that is neither pending in the outbox, nor sent, nor
reported. Reported gaps above the cloud's mark are sent again, unchanged, after a reconnect (the
cloud treats an identical gap as a duplicate). A chunk that was in flight when a link died and
is evicted before it could be resent is neither stored-for-sure nor reported; the cloud's mark
waits at it (docs/agent.md, "Known limits").

**Reconnect**: exponential backoff with full jitter (`Backoff`); everything unacknowledged is
sent again (the cloud dedupes by (node, stream, seq)).

**Bytes**: ``wire_sent`` / ``wire_received`` are the TCP payload bytes of the session socket
(TLS records, WebSocket framing and our frames) from the kernel's ``TCP_INFO``
(``tcpi_bytes_acked`` / ``tcpi_bytes_received``, Linux), sampled every 0.25 s and at the end of
a session; ``ws_sent`` / ``ws_received`` are the WebSocket message payload bytes (our msgpack
frames), counted everywhere. HTTPS requests (enrolment, renewal, desired state) are not counted.

This module keeps the session itself; its parts live beside it: `edgewise.edge.backoff`
(`Backoff`), `edgewise.edge.ledger` (`Ledger`, `IntervalSet`, `find_gaps`),
`edgewise.edge.flow` (`Lanes`, `Window`, `Sent`), `edgewise.edge.wire` (`WireMeter`,
`tcp_bytes`) and `edgewise.edge.outbox_access` (`OutboxAccess`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from edgewise import __version__
from edgewise.edge.backoff import Backoff
from edgewise.edge.flow import Lanes, Sent, Window
from edgewise.edge.identity import (
    ConfigError,
    EnrolmentRefused,
    NodeIdentity,
    ReenrolRequired,
    Revoked,
    describe_network_error,
)
from edgewise.edge.ledger import Ledger, find_gaps
from edgewise.edge.outbox import Chunk, Outbox
from edgewise.edge.outbox_access import OutboxAccess
from edgewise.edge.status import OutboxSnapshot, OutboxView
from edgewise.edge.wire import WireMeter
from edgewise.errors import PeerError, StorageError, TransportError
from edgewise.sync import protocol as P
from edgewise.sync.twin_state import save_atomic

log = logging.getLogger(__name__)

FRAME_OVERHEAD = 512  # bytes of msgpack around a batch payload, generously
MAX_PAYLOAD = P.MAX_FRAME_BYTES - FRAME_OVERHEAD


class LinkDown(TransportError):
    """The session ended: closed by the control plane, reset, or timed out."""


class TwinHooks(Protocol):
    def applied_version(self) -> int: ...

    def on_desired(self, version: int) -> None: ...

    def report(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class UplinkConfig:
    window_bytes: int = 2 * 1024 * 1024  # unacknowledged payload bytes in flight
    window_chunks: int = 512  # and at most this many chunks
    backoff: Backoff = field(default_factory=Backoff)
    heartbeat_s: float = 15.0  # protocol heartbeat
    ping_s: float = 20.0  # WebSocket ping; no pong in ping_s / 2 closes the link
    report_s: float = 10.0  # reported state
    connect_timeout_s: float = 10.0
    welcome_timeout_s: float = 10.0
    poll_s: float = 0.01  # how often the feeder looks for new chunks when idle
    close_grace_s: float = 2.0  # after a failed send, time for the receiver to read a last word
    tick_s: float = 0.25


def _short(exc: BaseException) -> str:
    if isinstance(exc, TransportError | PeerError | ConfigError):
        return str(exc) or type(exc).__name__
    return describe_network_error(exc)


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real (not cancellation) exception of a task group, however nested."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


class Uplink:
    """Keeps one session to the control plane up, forever; see the module docstring.

    ``run()`` returns only if the node needs re-enrolment (after logging it and setting
    ``problem``; the agent keeps running its pipeline) and raises `Revoked` or
    `EnrolmentRefused`, which stop the agent.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        access: OutboxAccess,
        view: OutboxView,
        twin: TwinHooks,
        state_dir: str | os.PathLike[str],
        config: UplinkConfig | None = None,
    ) -> None:
        self.identity = identity
        self.access = access
        self.view = view
        self.twin = twin
        self.config = config or UplinkConfig()
        self.state_dir = Path(state_dir)
        self.meter = WireMeter()
        # link state
        self.state = "starting"
        self.state_since = time.time()
        self.last_error: str | None = None
        self.next_attempt_at: float | None = None
        self.problem: str | None = None
        self.attempts = 0
        self.sessions = 0
        # counters
        self.ws_sent = self.ws_received = 0
        self.frames_sent = self.frames_received = 0
        self.chunks_sent = self.records_sent = self.chunks_resent = 0
        self.chunks_acked = self.records_acked = 0
        self.acked_locally = 0  # chunks below the cloud's mark, acknowledged without sending
        self.gaps_sent: dict[str, int] = {}  # stream -> sequence numbers reported as gaps
        self.reports_sent = 0
        self.refused: dict[int, dict[str, Any]] = self._load_refused()
        self.ledger = self._load_ledger()
        self._ledger_lock: asyncio.Lock | None = None
        # across sessions
        self._sent: dict[int, Sent] = {}  # every chunk sent and not yet deleted
        self._ever_sent: set[int] = set()
        self._acking: set[int] = set()
        self._ack_queue: asyncio.Queue[list[int]] | None = None
        self._window: Window | None = None
        self._lanes: Lanes | None = None
        self._report_soon = False
        self.marks: dict[str, int] = {}

    # -- status -----------------------------------------------------------------------------
    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
        if error is not None:
            self.last_error = error

    def request_report(self) -> None:
        """Send a report soon (the twin applied something)."""
        self._report_soon = True

    def status(self) -> dict[str, Any]:
        self.meter.sample()
        window = self._window
        refused: dict[str, dict[str, Any]] = {}
        for r in self.refused.values():
            s = refused.setdefault(r["stream"], {"chunks": 0, "records": 0, "last_reason": ""})
            s["chunks"] += 1
            s["records"] += r["records"]
            s["last_reason"] = r["reason"]
        return {
            "link": {
                "state": self.state,
                "since": self.state_since,
                "last_error": self.last_error,
                "next_attempt_at": self.next_attempt_at,
                "sessions": self.sessions,
                "attempts": self.attempts,
                "url": self.identity.cloud + P.SESSION_PATH if self.identity.cloud else None,
            },
            "bytes": {
                "wire_sent": self.meter.sent if self.meter.available else None,
                "wire_received": self.meter.received if self.meter.available else None,
                "ws_sent": self.ws_sent,
                "ws_received": self.ws_received,
                "counted": "wire_*: TCP payload bytes of the session socket, TLS included "
                           "(Linux TCP_INFO); ws_*: WebSocket message payloads",
            },
            "window": {
                "limit_bytes": self.config.window_bytes,
                "inflight_bytes": window.bytes if window else 0,
                "inflight_chunks": len(window.chunks) if window else 0,
                "acking_chunks": len(self._acking),
            },
            "uplink": {
                "chunks_sent": self.chunks_sent,
                "records_sent": self.records_sent,
                "chunks_resent": self.chunks_resent,
                "chunks_acked": self.chunks_acked,
                "records_acked": self.records_acked,
                "acked_below_mark": self.acked_locally,
                "gaps_reported": dict(self.gaps_sent),
                "reports_sent": self.reports_sent,
                "refused": refused,
                "cloud_marks": dict(self.marks),
            },
        }

    # -- refused chunks (persisted: never sent again, also after a restart) ----------------
    @property
    def _refused_path(self) -> Path:
        return self.state_dir / "refused.json"

    def _load_refused(self) -> dict[int, dict[str, Any]]:
        try:
            raw = json.loads(self._refused_path.read_text())
            return {int(k): v for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", self._refused_path, exc)
            return {}

    async def _save_refused(self) -> None:
        data = json.dumps({str(k): v for k, v in self.refused.items()}).encode()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(save_atomic, self._refused_path, data)

    async def _refuse(self, chunk_id: int, sent: Sent | None, reason: str) -> None:
        stream = sent.stream if sent else "?"
        records = sent.records if sent else 0
        log.warning("chunk %d of stream %s (%d records) refused: %s; it will not be sent again",
                    chunk_id, stream, records, reason)
        self.refused[chunk_id] = {"stream": stream, "records": records, "reason": reason[:300]}
        try:
            await self._save_refused()
        except StorageError as exc:
            log.warning("cannot persist refused chunk ids: %s", exc)

    # -- the ledger (persisted before the frames it describes are sent) ---------------------
    @property
    def _ledger_path(self) -> Path:
        return self.state_dir / "ledger.msgpack"

    def _load_ledger(self) -> Ledger:
        try:
            data = self._ledger_path.read_bytes()
        except FileNotFoundError:
            return Ledger()
        except OSError as exc:
            raise StorageError(f"cannot read {self._ledger_path}: {exc.strerror}") from None
        try:
            return Ledger.from_bytes(data)
        except StorageError as exc:
            log.error("%s (%s); starting a new one: a gap reported now may overlap what the "
                      "cloud holds", exc, self._ledger_path)
            return Ledger()

    async def _save_ledger(self) -> None:
        if self._ledger_lock is None:
            self._ledger_lock = asyncio.Lock()
        async with self._ledger_lock:  # one writer; each write is the state at its start
            data = self.ledger.to_bytes()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(save_atomic, self._ledger_path, data)

    # -- main loop --------------------------------------------------------------------------
    async def run(self) -> None:
        self._ack_queue = asyncio.Queue()
        acker = asyncio.create_task(self._acker(), name="uplink-acker")
        try:
            await self._connect_loop()
        finally:
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acker
            self.meter.detach()
            if self.problem is None:
                self._set_state("stopped")

    async def _connect_loop(self) -> None:
        attempt = 0
        last_logged = None
        while True:
            self.attempts += 1
            self.next_attempt_at = None
            self._welcomed = False
            # after a failure the state stays "offline" (with the error) while retrying
            if self.state != "offline":
                if not self.identity.enrolled:
                    self._set_state("enrolling")
                elif self.identity.expired():
                    self._set_state("re-authenticating")
                else:
                    self._set_state("connecting")
            try:
                await self.identity.ensure_usable()
                await self._session()
            except (Revoked, EnrolmentRefused):
                raise
            except ReenrolRequired as exc:
                self.problem = str(exc)
                self._set_state("needs re-enrolment", str(exc))
                log.error("uplink stopped: %s", exc)
                return
            except (TransportError, PeerError, ConfigError, aiohttp.ClientError, OSError,
                    TimeoutError) as exc:
                msg = _short(exc)
                self._set_state("offline", msg)
                if msg != last_logged:
                    log.warning("link to %s down: %s", self.identity.cloud, msg)
                    last_logged = msg
            attempt = 1 if self._welcomed else attempt + 1
            delay = self.config.backoff.delay(attempt)
            self.next_attempt_at = time.time() + delay
            await asyncio.sleep(delay)

    _welcomed = False

    async def _session(self) -> None:
        cfg = self.config
        url = "wss://" + self.identity.cloud.removeprefix("https://") + P.SESSION_PATH
        ctx = self.identity.ssl_context()
        timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout_s, sock_connect=cfg.connect_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                ws = await http.ws_connect(
                    url, ssl=ctx, heartbeat=cfg.ping_s, autoping=True,
                    max_msg_size=P.MAX_FRAME_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 403:
                    raise Revoked("the session upgrade was refused with 403") from None
                raise LinkDown(f"session upgrade refused: {exc.status} {exc.message}") from None
            except aiohttp.ClientConnectorCertificateError as exc:
                raise ConfigError(
                    f"the control plane at {self.identity.cloud} presented a certificate that "
                    f"does not verify against {self.identity.ca_path} ({exc.certificate_error})"
                ) from None
            async with ws:
                self.meter.attach(ws.get_extra_info("socket"))
                try:
                    await self._run_session(ws)
                finally:
                    self.meter.detach()
                    self._window = None
                    self._lanes = None

    async def _send_now(self, ws: aiohttp.ClientWebSocketResponse, msg: dict[str, Any]) -> None:
        frame = P.encode(msg)
        await ws.send_bytes(frame)
        self.ws_sent += len(frame)
        self.frames_sent += 1

    async def _run_session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        cfg = self.config
        snap = await asyncio.to_thread(self.view.snapshot, True)
        await self._send_now(ws, {
            "t": P.HELLO, "agent": f"edgewise/{__version__}",
            "streams": {name: row.priority for name, row in snap.streams.items()},
            "applied_version": self.twin.applied_version(),
        })
        welcome = await self._receive_one(ws, cfg.welcome_timeout_s)
        if welcome["t"] != P.WELCOME:
            raise PeerError(f"expected welcome, got {welcome['t']}")
        self._welcomed = True
        self.sessions += 1
        self.marks = self._marks(welcome["streams"])
        self._check_marks(snap)
        await self._ack_below_marks(snap)
        self._prune_refused(snap)
        self.ledger.trim(self.marks)
        self._set_state("connected", None)
        self.next_attempt_at = None
        log.info("connected to %s as node %s", self.identity.cloud, welcome["node_id"])
        window = self._window = Window(cfg.window_bytes, cfg.window_chunks)
        lanes = self._lanes = Lanes()
        again = self.ledger.gaps_above(self.marks)  # reported before, not yet below the mark
        for stream, seq, count in again:
            lanes.put_data(_gap_frame(stream, seq, count))
        await self._report_gaps(await self._gap_snapshot())
        self.twin.on_desired(int(welcome["desired_version"]))
        self._queue_report()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._sender(ws, lanes))
                tg.create_task(self._receiver(ws))
                tg.create_task(self._feeder(window, lanes))
                tg.create_task(self._ticker())
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _gap_snapshot(self) -> OutboxSnapshot:
        return await asyncio.to_thread(self.view.snapshot, True)

    @staticmethod
    def _marks(streams: dict[Any, Any]) -> dict[str, int]:
        marks = {}
        for name, v in streams.items():
            if isinstance(v, dict):
                v = v.get("contiguous", v.get("mark"))
            if not isinstance(name, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PeerError(f"welcome: stream {name!r} has no valid contiguous mark ({v!r})")
            marks[name] = v
        return marks

    def _check_marks(self, snap: OutboxSnapshot) -> None:
        for name, mark in self.marks.items():
            row = snap.streams.get(name)
            if row is not None and mark > row.next_seq:
                log.error(
                    "the control plane holds stream %s up to seq %d but this node's outbox is "
                    "at %d: the outbox was reset, and new records would be taken as "
                    "duplicates. Enrol this node again or restore its data directory",
                    name, mark, row.next_seq,
                )

    async def _ack_below_marks(self, snap: OutboxSnapshot) -> None:
        ids = []
        for c in snap.chunks:
            mark = self.marks.get(c.stream)
            if mark is not None and c.seq_first + c.seq_count <= mark and c.id not in self._acking:
                ids.append(c.id)
        if ids:
            self.acked_locally += len(ids)
            self._acking.update(ids)
            assert self._ack_queue is not None
            self._ack_queue.put_nowait(ids)

    def _prune_refused(self, snap: OutboxSnapshot) -> None:
        pending = {c.id for c in snap.chunks}
        gone = [cid for cid in self.refused if cid not in pending]
        for cid in gone:  # evicted from the outbox since: counted as dropped there
            del self.refused[cid]

    async def _receive_one(
        self, ws: aiohttp.ClientWebSocketResponse, timeout: float | None
    ) -> dict[str, Any]:
        try:
            msg = await ws.receive(timeout=timeout)
        except TimeoutError:
            raise LinkDown(f"no welcome from the control plane within {timeout} s") from None
        if msg.type == aiohttp.WSMsgType.BINARY:
            self.ws_received += len(msg.data)
            self.frames_received += 1
            decoded = P.decode(msg.data)
            if decoded["t"] == P.REVOKED:
                raise Revoked(decoded["reason"])
            if decoded["t"] == P.ERROR:
                raise LinkDown(f"the control plane ended the session: {decoded['reason']}")
            return decoded
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.CLOSED):
            raise LinkDown(f"the control plane closed the session (code {ws.close_code})")
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise LinkDown(f"session failed: {ws.exception()}")
        raise PeerError(f"unexpected {msg.type.name} frame on the device session")

    # -- tasks of a session -----------------------------------------------------------------
    async def _sender(self, ws: aiohttp.ClientWebSocketResponse, lanes: Lanes) -> None:
        while True:
            frame, _control = await lanes.get()
            try:
                await ws.send_bytes(frame)
            except (aiohttp.ClientError, ConnectionError) as exc:
                # the cloud may be closing with a last word (revoked, error) still unread:
                # give the receiver a moment to read it before the session ends
                await asyncio.sleep(self.config.close_grace_s)
                raise LinkDown(f"cannot send: {describe_network_error(exc)}") from None
            self.ws_sent += len(frame)
            self.frames_sent += 1

    async def _receiver(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await self._receive_one(ws, None)
            await self._handle(msg)

    async def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == P.ACK:
            self._on_ack(msg["ids"])
        elif kind == P.REFUSE:
            cid = msg["id"]
            sent = self._window.release(cid) if self._window else None
            sent = sent or self._sent.pop(cid, None)
            self._sent.pop(cid, None)
            await self._refuse(cid, sent, msg["reason"])
        elif kind == P.DESIRED:
            self.twin.on_desired(msg["version"])
        elif kind == P.WELCOME:
            log.warning("ignoring a second welcome on the same session")
        else:
            raise PeerError(f"the control plane sent a {kind} message, which only nodes send")

    def _on_ack(self, ids: list[Any]) -> None:
        done = []
        for cid in ids:
            if isinstance(cid, bool) or not isinstance(cid, int):
                raise PeerError(f"ack with a chunk id that is not an integer: {cid!r:.40}")
            sent = self._window.release(cid) if self._window else None
            sent = sent or self._sent.get(cid)
            if sent is None or cid in self._acking:
                continue  # not ours to delete (never sent by this process) or already going
            self.chunks_acked += 1
            self.records_acked += sent.records
            self._acking.add(cid)
            done.append(cid)
        if done:
            assert self._ack_queue is not None
            self._ack_queue.put_nowait(done)

    async def _acker(self) -> None:
        assert self._ack_queue is not None
        queue = self._ack_queue
        while True:
            ids = await queue.get()
            while not queue.empty():
                ids.extend(queue.get_nowait())
            try:
                await self.access.call(lambda ob, ids=ids: ob.ack(ids))
            except StorageError as exc:
                log.error("cannot delete acknowledged chunks: %s (they will be sent again and "
                          "deduplicated by the cloud)", exc)
            finally:
                for cid in ids:
                    self._acking.discard(cid)
                    self._sent.pop(cid, None)

    async def _feeder(self, window: Window, lanes: Lanes) -> None:
        cfg = self.config
        idle_sig: tuple[int, int, int] | None = None
        while True:
            await window.wait_room()
            ob = self.access.current()
            if ob is None:
                await asyncio.sleep(cfg.poll_s * 10)
                continue
            sig = _signature(ob)
            if sig == idle_sig:
                await asyncio.sleep(cfg.poll_s)
                continue
            exclude = set(window.chunks) | self._acking | set(self.refused)
            taken = await self.access.call(functools.partial(_take, room=window.room(),
                                                             exclude=exclude))
            fresh = [(c, f) for c, f in taken if c.id not in window.chunks
                     and c.id not in self._acking and c.id not in self.refused]
            if not fresh:
                idle_sig = sig
                continue
            idle_sig = None
            grew = False
            for chunk, frame in fresh:
                if frame is not None:
                    grew |= self.ledger.record_sent(chunk.stream, chunk.seq_first,
                                                    chunk.seq_count)
            if grew:
                await self._save_ledger()
            for chunk, frame in fresh:
                sent = Sent(chunk.stream, chunk.seq_first, chunk.seq_count, chunk.records,
                            len(chunk.payload))
                if frame is None:
                    await self._refuse(chunk.id, sent, f"chunk of {len(chunk.payload)} bytes is "
                                       f"over the {P.MAX_FRAME_BYTES} byte frame limit")
                    continue
                window.add(chunk.id, sent)
                if chunk.id in self._ever_sent:
                    self.chunks_resent += 1
                self._ever_sent.add(chunk.id)
                self._sent[chunk.id] = sent
                self.chunks_sent += 1
                self.records_sent += chunk.records
                lanes.put_data(frame)

    async def _ticker(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        last_hb = last_report = loop.time()
        last_dropped = -1
        while True:
            await asyncio.sleep(cfg.tick_s)
            now = loop.time()
            self.meter.sample()
            if now - last_hb >= cfg.heartbeat_s:
                last_hb = now
                self._queue_control({"t": P.HEARTBEAT, "ts": time.time()})
            if self._report_soon or now - last_report >= cfg.report_s:
                last_report = now
                self._queue_report()
            ob = self.access.current()
            if ob is not None:
                dropped = sum(s.dropped for s in ob.stats().values())
                if dropped != last_dropped:
                    if last_dropped >= 0:
                        await self._report_gaps(await self._gap_snapshot())
                    last_dropped = dropped

    def _queue_control(self, msg: dict[str, Any]) -> None:
        if self._lanes is not None:
            self._lanes.put_control(P.encode(msg))

    def _queue_report(self) -> None:
        self._report_soon = False
        try:
            report = self.twin.report()
        except Exception as exc:  # a report that cannot be built must not end the session
            log.warning("cannot build the reported state: %s", exc)
            return
        self._queue_control({"t": P.REPORT, "report": report})
        self.reports_sent += 1

    async def _report_gaps(self, snap: OutboxSnapshot) -> None:
        """Find new gaps, record them in the ledger (saved), then queue them."""
        if self._lanes is None:
            return
        gaps = find_gaps(snap, self.marks, self.ledger.covered())
        if not gaps:
            return
        for stream, seq, count in gaps:
            self.ledger.record_gap(stream, seq, count)
        await self._save_ledger()
        for stream, seq, count in gaps:
            log.warning("stream %s: %d records (seq %d..%d) were dropped under outbox pressure; "
                        "reporting the gap", stream, count, seq, seq + count - 1)
            if self._lanes is not None:
                self._lanes.put_data(_gap_frame(stream, seq, count))
            self.gaps_sent[stream] = self.gaps_sent.get(stream, 0) + count


def _gap_frame(stream: str, seq: int, count: int) -> bytes:
    return P.encode({"t": P.GAP, "stream": stream, "seq": seq, "count": count,
                     "reason": "dropped: outbox full"})


def _signature(ob: Outbox) -> tuple[int, int, int]:
    """Changes whenever the outbox gains, loses or rewrites a chunk (in-memory, no SQL)."""
    produced = pending = dropped = 0
    for s in ob.stats().values():
        produced += s.produced
        pending += s.pending_chunks
        dropped += s.dropped + s.compacted
    return produced, pending, dropped


def _take(ob: Outbox, room: int, exclude: set[int]) -> list[tuple[Chunk, bytes | None]]:
    """Next chunks to send and their frames (encoded here, in the worker thread)."""
    out: list[tuple[Chunk, bytes | None]] = []
    for c in ob.peek(max_bytes=max(room, 1), exclude=exclude):
        if len(c.payload) > MAX_PAYLOAD:
            out.append((c, None))
            continue
        out.append((c, P.encode({
            "t": P.BATCH, "id": c.id, "stream": c.stream, "seq": c.seq_first,
            "count": c.seq_count, "records": c.records, "compacted": c.compacted,
            "payload": c.payload,
        })))
    return out
