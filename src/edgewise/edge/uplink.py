"""The uplink: one long-lived WebSocket session carrying the outbox to the control plane.

Protocol: docs/decisions/0004-device-protocol.md, messages in `edgewise.sync.protocol`.
Per session: ``hello`` → ``welcome`` (the cloud's mark per stream: chunks below it are stored,
acknowledged locally without resending) → four tasks until the link drops:

* **feeder**: takes chunks with `Outbox.peek` (highest priority first, oldest first) while the
  unacknowledged bytes stay under the window, and queues them as ``batch`` frames;
* **sender**: the only writer of the socket; two lanes with strict priority, so control
  (``report``, ``heartbeat``) always goes before data (``batch``, ``gap``). A data frame
  already on the wire is not interrupted: control waits at most one chunk;
* **receiver**: ``ack`` releases the window (acker), ``refuse`` marks a chunk as never to be
  sent again, ``desired`` pokes the twin, ``revoked`` stops the agent (`Revoked`, maybe
  decommissioned and told to wipe; also read after a failed send), ``error`` ends the session;
* **ticker**: heartbeats (with the node's health: `edge.health`), reports, gaps, wire bytes.

The **acker** runs across sessions: it records the acknowledged sequence ranges, then deletes
the chunks with the engine's own `Outbox.ack` (so the engine's counters stay right), off the
event loop. A chunk stays excluded from sending until its deletion is done.

**Gaps.** What the outbox evicts or loses (`edgewise.outbox.numbering`) above the cloud's mark
is reported as a ``gap``, again after a reconnect until the mark has passed it. A persisted
`Ledger` (fsynced *before* the frames it describes are sent) remembers the highest numbers the
cloud may have heard of, so a replaced outbox continues above them.

**Reconnect**: `edgewise.common.backoff` (full jitter; a session up for ``healthy_s`` forgets
earlier failures); everything unacknowledged is sent again (the cloud dedupes by seq).

**Bytes**: ``wire_sent`` / ``wire_received``: the session socket's TCP payload bytes (Linux
``TCP_INFO``, sampled every 0.25 s and at the end); ``ws_sent`` / ``ws_received``: our frames'
bytes. HTTPS requests (enrolment, renewal, desired state) are not counted.

This module keeps the connection: link state, the connect loop, the session with its sender,
receiver and ticker, reports and the status block. Its parts live beside it:

* `edgewise.edge.transfer` (`Transfer`): the outbox side, across sessions: feeder, acker,
  ``ack`` and ``refuse`` bookkeeping, the cloud's marks and the gaps;
* `edgewise.edge.uplink_store` (`UplinkStore`): refused chunk ids and the ledger, on disk;
* `edgewise.edge.frames`: ``batch`` and ``gap`` frames, outbox reads, the welcome's marks;
* `edgewise.edge.ledger`, `edgewise.edge.flow` (`Lanes`, `Window`), `edgewise.edge.wire`
  (`WireMeter`) and `edgewise.common.backoff` (`Backoff`, `Retry`).

`Uplink` shows its parts' counters, marks, refused chunks and ledger as its own attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import aiohttp

from edgewise import __version__
from edgewise.common.backoff import Backoff, Retry
from edgewise.edge import status_model as sm
from edgewise.edge.device_http import LinkDown, retry_after
from edgewise.edge.flow import Lanes
from edgewise.edge.health import HealthSource, heartbeat
from edgewise.edge.identity import (
    ConfigError,
    EnrolmentRefused,
    NodeIdentity,
    ReenrolRequired,
    Revoked,
    describe_network_error,
)
from edgewise.edge.ledger import Ledger
from edgewise.edge.transfer import Transfer
from edgewise.edge.uplink_store import UplinkStore
from edgewise.edge.wire import WireMeter
from edgewise.errors import PeerError, TransportError
from edgewise.outbox import Outbox
from edgewise.outbox.view import OutboxSnapshot, OutboxView
from edgewise.sync import protocol as P

log = logging.getLogger(__name__)

T = TypeVar("T")


class TwinHooks(Protocol):
    def applied_version(self) -> int: ...

    def on_desired(self, version: int, jitter: float = 0.0,
                   state: dict[str, Any] | None = None) -> None: ...

    def report(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class UplinkConfig:
    window_bytes: int = 2 * 1024 * 1024  # unacknowledged payload bytes in flight
    window_chunks: int = 512  # and at most this many chunks
    backoff: Backoff = field(default_factory=Backoff)
    healthy_s: float = 10.0  # a session welcomed and up this long forgets earlier failures
    heartbeat_s: float = 30.0  # protocol heartbeat with health (offline after 90 s silent)
    ping_s: float = 20.0  # WebSocket ping; no pong in ping_s / 2 closes the link
    report_s: float = 30.0  # reported state (its counters); a change is reported at once
    connect_timeout_s: float = 10.0
    # the whole upgrade, from connecting to the end of the answer's head: the answer comes from
    # across the network, so a server (or a proxy before it) that never finishes it, silent or
    # a byte at a time, must not hold the uplink (aiohttp bounds its size, not its time)
    upgrade_timeout_s: float = 20.0
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


class _Kept(Generic[T]):
    """An attribute of `Uplink` kept by one of its parts: read and written there."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Uplink | None, owner: type | None = None) -> T:
        if obj is None:  # on the class
            return self  # type: ignore[return-value]
        return getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Uplink, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class Uplink:
    """Keeps one session to the control plane up, forever; see the module docstring.

    ``run()`` returns only if the node needs re-enrolment (after logging it and setting
    ``problem``; the agent keeps running its pipeline) and raises `Revoked` or
    `EnrolmentRefused`, which stop the agent.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        outbox: Outbox,
        view: OutboxView,
        twin: TwinHooks,
        state_dir: str | os.PathLike[str],
        config: UplinkConfig | None = None,
    ) -> None:
        self.identity = identity
        self.outbox = outbox  # the agent's one outbox, open for its lifetime
        self.view = view
        self.twin = twin
        self.config = config or UplinkConfig()
        self.state_dir = Path(state_dir)
        self.store = UplinkStore(self.state_dir)  # refused chunk ids and the ledger
        self.transfer = Transfer(outbox, self.store, self.config.poll_s)
        self.meter = WireMeter()
        self.health: HealthSource | None = None  # for each heartbeat (the agent sets it)
        # link state
        self.state = "starting"
        self.state_since = time.time()
        self.last_error: str | None = None
        self.next_attempt_at: float | None = None
        self.problem: str | None = None
        self.attempts = 0
        self.sessions = 0
        # counters (those of the outbox side are kept by the transfer, below)
        self.ws_sent = self.ws_received = 0
        self.frames_sent = self.frames_received = 0
        self.reports_sent = 0
        self._report_soon = False

    # kept by the store and the transfer; read (and set) here as before
    refused: _Kept[dict[int, dict[str, Any]]] = _Kept("store")
    ledger: _Kept[Ledger] = _Kept("store")
    marks: _Kept[dict[str, int]] = _Kept("transfer")
    chunks_sent: _Kept[int] = _Kept("transfer")
    records_sent: _Kept[int] = _Kept("transfer")
    chunks_resent: _Kept[int] = _Kept("transfer")
    chunks_acked: _Kept[int] = _Kept("transfer")
    records_acked: _Kept[int] = _Kept("transfer")
    acked_locally: _Kept[int] = _Kept("transfer")
    gaps_sent: _Kept[dict[str, int]] = _Kept("transfer")

    # -- status -----------------------------------------------------------------------------
    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
        if error is not None:
            self.last_error = error

    def request_report(self) -> None:
        """Send a report soon (the twin applied something)."""
        self._report_soon = True

    def status(self) -> sm.UplinkStatus:
        self.meter.sample()
        window = self.transfer.window
        refused: dict[str, sm.RefusedStream] = {}
        for r in self.refused.values():
            s = refused.setdefault(r["stream"], sm.RefusedStream(chunks=0, records=0))
            s.chunks, s.records, s.last_reason = s.chunks + 1, s.records + r["records"], r["reason"]
        return sm.UplinkStatus(
            link=sm.LinkStatus(
                state=self.state,
                since=self.state_since,
                last_error=self.last_error,
                next_attempt_at=self.next_attempt_at,
                sessions=self.sessions,
                attempts=self.attempts,
                url=self.identity.cloud + P.SESSION_PATH if self.identity.cloud else None,
            ),
            bytes=sm.BytesStatus(
                wire_sent=self.meter.sent if self.meter.available else None,
                wire_received=self.meter.received if self.meter.available else None,
                ws_sent=self.ws_sent,
                ws_received=self.ws_received,
                counted="wire_*: TCP payload bytes of the session socket, TLS included "
                        "(Linux TCP_INFO); ws_*: WebSocket message payloads",
            ),
            window=sm.WindowStatus(
                limit_bytes=self.config.window_bytes,
                inflight_bytes=window.bytes if window else 0,
                inflight_chunks=len(window.chunks) if window else 0,
                acking_chunks=len(self.transfer.acking),
            ),
            uplink=sm.UplinkCounters(
                chunks_sent=self.chunks_sent,
                records_sent=self.records_sent,
                chunks_resent=self.chunks_resent,
                chunks_acked=self.chunks_acked,
                records_acked=self.records_acked,
                acked_below_mark=self.acked_locally,
                gaps_reported=dict(self.gaps_sent),
                reports_sent=self.reports_sent,
                refused=refused,
                cloud_marks=dict(self.marks),
            ),
        )

    # -- main loop --------------------------------------------------------------------------
    async def run(self) -> None:
        acker = self.transfer.start_acker()
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
        retry = self._retry = Retry(self.config.backoff, self.config.healthy_s)
        while True:
            self.attempts += 1
            self.next_attempt_at = None
            # after a failure the state stays "offline" (with the error) while retrying
            if self.state != "offline":
                if not self.identity.enrolled:
                    self._set_state("enrolling")
                elif self.identity.expired():
                    self._set_state("re-authenticating")
                else:
                    self._set_state("connecting")
            pace = None
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
                pace = getattr(exc, "retry_after", None)  # a 429's Retry-After, if any
                msg = _short(exc)
                self._set_state("offline", msg)
                if msg != self._down_logged:  # lost and regained both at WARNING
                    log.warning("link to %s down: %s", self.identity.cloud, msg)
                    self._down_logged = msg
                    if self._down_since is None:
                        self._down_since = time.time()
            delay = retry.failed(pace)
            self.next_attempt_at = time.time() + delay
            await asyncio.sleep(delay)

    _retry: Retry | None = None
    _down_logged: str | None = None  # the error last logged as "link down"
    _down_since: float | None = None  # when the link was logged down (None: not down)

    async def _session(self) -> None:
        cfg = self.config
        url = "wss://" + self.identity.cloud.removeprefix("https://") + P.SESSION_PATH
        ctx = self.identity.ssl_context()
        timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout_s, sock_connect=cfg.connect_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout) as http:
            upgrade = asyncio.timeout(cfg.upgrade_timeout_s)
            try:
                async with upgrade:
                    ws = await http.ws_connect(
                        url, ssl=ctx, heartbeat=cfg.ping_s, autoping=True,
                        max_msg_size=P.MAX_FRAME_BYTES,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                    )
            except TimeoutError:
                if not upgrade.expired():
                    raise  # aiohttp's own connect timeout: described as it is
                raise LinkDown(f"no answer to the session upgrade within "
                               f"{cfg.upgrade_timeout_s:g} s") from None
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 403:
                    decommissioned, wipe = P.decommission_order(
                        (exc.headers or {}).get(P.DECOMMISSIONED_HEADER))
                    raise Revoked("the session upgrade was refused with 403",
                                  decommissioned=decommissioned, wipe=wipe) from None
                down = LinkDown(f"session upgrade refused: {exc.status} {exc.message}")
                down.retry_after = retry_after(exc.headers) if exc.status == 429 else None
                raise down from None
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
                    self.transfer.end()

    async def _send_now(self, ws: aiohttp.ClientWebSocketResponse, msg: dict[str, Any]) -> None:
        frame = P.encode(msg)
        await ws.send_bytes(frame)
        self.ws_sent += len(frame)
        self.frames_sent += 1

    async def _run_session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        cfg = self.config
        snap = await asyncio.to_thread(self.view.snapshot, True)
        try:
            await self._send_now(ws, {
                "t": P.HELLO, "agent": f"edgewise/{__version__}",
                "streams": {name: row.priority for name, row in snap.streams.items()},
                "applied_version": self.twin.applied_version(),
            })
        except (aiohttp.ClientError, ConnectionError) as exc:  # closed while we connected
            await self._last_word(ws, LinkDown(f"cannot send: {describe_network_error(exc)}"))
        welcome = await self._receive_one(ws, cfg.welcome_timeout_s)
        if welcome["t"] != P.WELCOME:
            raise PeerError(f"expected welcome, got {welcome['t']}")
        if self._retry is not None:
            self._retry.connected()
        self.sessions += 1
        await self.transfer.welcome(welcome["streams"], snap, welcome["node_id"])
        self._set_state("connected", None)
        self.next_attempt_at = None
        if self._down_since is not None:  # the loss was a WARNING: so is its end
            log.warning("link to %s up again after %.1f s, as node %s", self.identity.cloud,
                        time.time() - self._down_since, welcome["node_id"])
            self._down_since = self._down_logged = None
        else:
            log.info("connected to %s as node %s", self.identity.cloud, welcome["node_id"])
        window, lanes = self.transfer.begin(cfg.window_bytes, cfg.window_chunks)
        await self.transfer.report_new_gaps(self._gap_snapshot, force=True)
        self.twin.on_desired(int(welcome["desired_version"]))
        self._queue_report()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._sender(ws, lanes))
                tg.create_task(self._receiver(ws))
                tg.create_task(self.transfer.feeder(window, lanes))
                tg.create_task(self._ticker())
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _gap_snapshot(self) -> OutboxSnapshot:
        return await asyncio.to_thread(self.view.snapshot, True)

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
                raise Revoked(decoded["reason"],
                              decommissioned=decoded.get("decommissioned") is True,
                              wipe=decoded.get("wipe") is True)
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

    async def _last_word(self, ws: aiohttp.ClientWebSocketResponse, down: LinkDown) -> None:
        """A send failed: what the cloud said before it closed ends the session (``revoked``:
        `Revoked`); else ``down`` is raised."""
        with contextlib.suppress(LinkDown, PeerError, TimeoutError):
            async with asyncio.timeout(self.config.close_grace_s):
                while True:
                    await self._receive_one(ws, None)
        raise down

    async def _receiver(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await self._receive_one(ws, None)
            await self._handle(msg)

    async def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == P.ACK:
            self.transfer.on_ack(msg["ids"])
        elif kind == P.REFUSE:
            await self.transfer.on_refuse(msg["id"], msg["reason"])
        elif kind == P.DESIRED:
            self.twin.on_desired(msg["version"], float(msg.get("jitter_s", 0.0)),
                                 msg.get("state"))
        elif kind == P.WELCOME:
            log.warning("ignoring a second welcome on the same session")
        else:
            raise PeerError(f"the control plane sent a {kind} message, which only nodes send")

    async def _ticker(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        last_hb = last_report = loop.time()
        while True:
            await asyncio.sleep(cfg.tick_s)
            now = loop.time()
            self.meter.sample()
            if now - last_hb >= cfg.heartbeat_s:
                last_hb = now
                self._queue_control(await heartbeat(self.health))
            if self._report_soon or now - last_report >= cfg.report_s:
                last_report = now
                self._queue_report()
            await self.transfer.report_new_gaps(self._gap_snapshot)

    def _queue_control(self, msg: dict[str, Any]) -> None:
        if self.transfer.lanes is not None:
            self.transfer.lanes.put_control(P.encode(msg))

    def _queue_report(self) -> None:
        self._report_soon = False
        try:
            report = self.twin.report()
        except Exception as exc:  # a report that cannot be built must not end the session
            log.warning("cannot build the reported state: %s", exc)
            return
        self._queue_control({"t": P.REPORT, "report": report})
        self.reports_sent += 1
