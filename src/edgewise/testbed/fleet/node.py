"""One virtual node: enrolment, one mutual-TLS session, heartbeats, reports, telemetry, acks and
desired-state fetches, with the agent's reconnect policy; many of them share one process.

A `VirtualNode` speaks the real device protocol (docs/decisions/0004-device-protocol.md)
through the project's own client code: its key and CSR from `edgewise.security.pki`, its TLS
context from `edgewise.security.tls.client_context`, enrolment and desired-state fetches through
`edgewise.edge.device_http.device_request` (the agent's HTTPS path), frames through
`edgewise.sync.protocol`, payloads encoded by `edgewise.sync.codec`, the reported state built as
`edgewise.sync.twin_state.ReportedState`, and pacing from the agent's own `UplinkConfig`
(heartbeat, report and ping intervals, welcome timeout, full-jitter `Backoff` with its reset
after a healthy period).

What is lighter than the agent, so one process holds thousands: no outbox file (the chunks not
acknowledged yet stay in memory, in order), no pipeline (a small telemetry batch of
``records`` readings every ``telemetry_every`` seconds), one task per node (the session loop
waits on the socket until the next thing is due), one aiohttp `ClientSession` per process for
the WebSockets (the node's TLS context goes with its request). A chunk is sent again on the next
session unless the welcome's mark says it is settled, as the agent does: at least once on the
wire, exactly once in the store. A poke that carries its desired state inline is applied from
the poke without a fetch (validated as `DesiredState`); ``fetch_only`` ignores it and fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from edgewise.common.backoff import Retry
from edgewise.edge.device_http import (
    CloudRefusal,
    device_request,
    retry_after,
)
from edgewise.errors import ConfigError, PeerError, TransportError
from edgewise.security import pki
from edgewise.security.tls import client_context
from edgewise.sync import codec, protocol
from edgewise.sync.health import NodeHealth, OutboxLevel, PipelineHealth
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState
from edgewise.testbed.fleet.link import LinkDown, receive, short
from edgewise.testbed.fleet.release import NodeUpdater
from edgewise.testbed.fleet.shared import NodeSettings, Shared
from edgewise.testbed.fleet.stats import NodeResult

__all__ = ["STREAM", "LinkDown", "NodeSettings", "Shared", "VirtualNode"]

STREAM = "telemetry"
PRIORITY = 5
AGENT = "edgewise-sim/1"
MAX_JITTER_S = 60.0  # s: the most of a poke's jitter hint a node waits (as the agent)
SEND_TIMEOUT_S = 30.0  # s a frame may wait for room in the socket
RTO_S = 0.2  # Linux's minimum TCP retransmission timeout: what one lost segment costs
BUG = "bug in the simulator: "  # the failure's prefix for an unexpected exception

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    seq: int
    count: int
    payload: bytes
    sent_at: float | None = None  # monotonic time of the last send


class VirtualNode:
    """One node; `run` until the shared stop signal, then drain and report (`result`)."""

    def __init__(self, index: int, shared: Shared) -> None:
        self.index = index
        self.shared = shared
        self.node_id: str | None = None
        self.ctx: ssl.SSLContext | None = None
        self.next_seq = 0
        self.next_id = 1
        self.buf: OrderedDict[int, _Chunk] = OrderedDict()  # chunk id -> not acknowledged yet
        self.sent_upto = 0
        self.acked = 0
        self.applied_version = 0
        self.connected = False
        self.problem: str | None = None
        self._next_batch = 0.0
        self._fetching: asyncio.Task[None] | None = None
        self._wanted = 0
        self._retry: Retry | None = None
        self._drain_tries = 0  # sessions tried after the stop to hear the last acks
        self.updater = NodeUpdater(index, shared.settings.release)
        self._readings_from = 0  # next_seq when the (virtual) engine last started
        self._restart = False  # the session ends for a restart (a switch or a rollback)
        self._waiting: asyncio.Task[Any] | None = None  # this node's task, waiting in a session
        self._woken = False  # `wake` cancelled that wait
        self._sensors: np.ndarray | None = None  # the telemetry's sensor column (fixed)

    # -- enrolment ----------------------------------------------------------------------------
    async def enrol(self) -> None:
        s = self.shared.settings
        rec = self.shared.recorder
        folder = self.shared.state_dir / f"n{self.index}"
        folder.mkdir(parents=True, exist_ok=True)
        key_path = folder / "node.key"
        key = pki.load_key(key_path) if key_path.exists() else pki.generate_key(key_path)
        body = {"token": s.token_for(self.index), "csr": pki.make_csr(key).decode()}
        started = time.monotonic()
        retry = Retry(s.uplink.backoff, s.uplink.healthy_s)
        while True:
            pace = None  # a 429's Retry-After: waited out, as the agent does
            try:
                answer = await device_request(s.cloud, self.shared.enrol_ctx, "POST",
                                              "/v1/device/enrol", body, ca_path=s.ca)
                break
            except CloudRefusal as exc:
                if exc.status in (400, 401, 403, 404, 409, 410):
                    raise ConfigError(f"enrolment refused: {exc.status} {exc.reason}") from None
                rec.failure(f"enrol: {exc.status}")
                pace = exc.retry_after
            except (TransportError, PeerError) as exc:
                rec.failure(f"enrol: {short(exc)}")
            rec.count("enrol_retries")
            await self._sleep(retry.failed(pace))
            if self.shared.stop.is_set():
                raise LinkDown("stopped before enrolment")
        rec.sample("enrol_s", time.monotonic() - started)
        rec.enrolled(time.time())
        self.node_id = str(answer["node_id"])
        cert_path = folder / "node.pem"
        cert_path.write_text(answer["certificate"])
        self.ctx = client_context(s.ca, cert_path, key_path)
        self.shared.event("enrolled", self.index, self.node_id)

    # -- telemetry ----------------------------------------------------------------------------
    def _produce_due(self, now: float) -> None:
        """Make the batches due by ``now`` (also those of a time offline: the agent's outbox
        keeps what its pipeline made while the link was down)."""
        s = self.shared.settings
        while self._next_batch <= now:
            n = s.records
            t0 = time.time() - (now - self._next_batch)
            if self._sensors is None or len(self._sensors) != n:
                self._sensors = np.array([f"sim/{self.index}/{k}" for k in range(n)],
                                         dtype=object)
            cols = {
                "sensor": self._sensors,
                "ts": np.round(t0 + np.arange(n) * 0.01, 2),
                "value": np.round(20.0 + np.arange(n) * 0.25 + (self.next_seq % 7), 2),
            }
            self.buf[self.next_id] = _Chunk(self.next_seq, n, codec.encode(cols))
            self.next_id += 1
            self.next_seq += n
            self._next_batch += s.telemetry_every
            self.shared.recorder.count("batches_made")

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, msg: dict[str, Any]) -> None:
        if self.shared.settings.loss and random.random() < self.shared.settings.loss:
            await asyncio.sleep(RTO_S)
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):  # a peer that stopped reading
                await ws.send_bytes(protocol.encode(msg))
        except TimeoutError:
            raise LinkDown("send timed out: the control plane is not reading") from None

    async def _send_chunk(self, ws: aiohttp.ClientWebSocketResponse, cid: int,
                          c: _Chunk) -> None:
        c.sent_at = time.monotonic()
        await self._send(ws, {"t": protocol.BATCH, "id": cid, "stream": STREAM, "seq": c.seq,
                              "count": c.count, "records": c.count, "compacted": False,
                              "payload": c.payload})
        self.sent_upto = max(self.sent_upto, c.seq + c.count)
        self.shared.recorder.count("batches_sent")

    def _report(self) -> dict[str, Any]:
        """As the agent's twin builds it: the status, then the updater's line; the engine's
        ``readings_in`` since it last started (a switch or rollback restarts it)."""
        line = self.updater.status_line()
        return {"t": protocol.REPORT, "report": ReportedState(
            self.applied_version or None, f"running; {line}" if line else "running",
            {"records": self.next_seq, "readings_in": self.next_seq - self._readings_from,
             "alarms": 0, "dead_lettered": 0}, LwwMap()).to_wire()}

    def _release_step(self, now: float) -> bool:
        """Take the updater's due step; True if there is something new to report."""
        outcome = self.updater.advance(now, time.time())
        if outcome is None:
            return False
        rec = self.shared.recorder
        rec.count(f"release_{outcome}")
        if outcome in ("committed", "rolled_back", "refused"):
            rec.sample("apply_s", now - self.updater.started)
        if outcome in ("switched", "rolled_back"):
            self._readings_from = self.next_seq  # the engine starts again
            self._restart = self.shared.settings.release.restart
        version = (self.updater.state.last_failure.version
                   if outcome in ("rolled_back", "refused") and self.updater.state.last_failure
                   else self.updater.state.running_version or self.updater.assigned)
        self.shared.event("release", self.index, self.node_id, v=version, o=outcome)
        return True

    # -- the session --------------------------------------------------------------------------
    async def _session(self) -> None:
        s = self.shared.settings
        cfg = s.uplink
        rec = self.shared.recorder
        started = time.monotonic()
        try:
            # bounded as a whole: the session's connect timeout does not cover the wait for
            # the upgrade's answer, and a control plane may accept and never answer
            async with asyncio.timeout(cfg.connect_timeout_s + cfg.welcome_timeout_s):
                ws = await self.shared.http.ws_connect(
                    self.shared.wss, ssl=self.ctx, heartbeat=cfg.ping_s, autoping=True,
                    max_msg_size=protocol.MAX_FRAME_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0))
        except aiohttp.WSServerHandshakeError as exc:
            down = LinkDown(f"upgrade refused: {exc.status}")
            if exc.status == 429:
                down.retry_after = retry_after(exc.headers)
            raise down from None
        except TimeoutError:
            raise LinkDown("no answer to the session upgrade") from None
        async with ws:
            await self._send(ws, {"t": protocol.HELLO, "agent": AGENT,
                                  "streams": {STREAM: PRIORITY},
                                  "applied_version": self.applied_version})
            welcome = await receive(ws, cfg.welcome_timeout_s)
            if welcome is None or welcome["t"] != protocol.WELCOME:
                what = "no welcome" if welcome is None else f"{welcome['t']}: " \
                    f"{welcome.get('reason', '')}"
                raise LinkDown(f"{what}"[:80])
            rec.sample("connect_s", time.monotonic() - started)
            local = ws.get_extra_info("sockname")
            rec.count(f"from {local[0] if local else '?'}")
            mark = int(welcome["streams"].get(STREAM, 0))
            for cid in [cid for cid, c in self.buf.items() if c.seq + c.count <= mark]:
                self.acked += self.buf.pop(cid).count  # stored by an earlier session
            self.connected = True
            if self._retry is not None:
                self._retry.connected()
            self.shared.event("up", self.index, self.node_id)
            try:
                await self._run_session(ws, int(welcome["desired_version"]))
            finally:
                self.connected = False
                self.shared.event("down", self.index, self.node_id)

    def _health(self) -> dict[str, Any]:
        """A health map of the size an agent sends (`edge.health`): one pipeline, the
        chunks not acknowledged yet as the outbox of one priority."""
        return NodeHealth(
            cpu_percent=1.5, memory_bytes=60 * 2**20, disk_free_bytes=20 * 2**30,
            disk_total_bytes=32 * 2**30, outbox={5: OutboxLevel(len(self.buf), 0.0)},
            pipelines={"telemetry": PipelineHealth("running")},
            cert_expires=time.time() + 86400.0, **self.updater.health()).to_wire()

    async def _run_session(self, ws: aiohttp.ClientWebSocketResponse, desired: int) -> None:
        s = self.shared.settings
        cfg = s.uplink
        loop = asyncio.get_running_loop()
        self._poke(desired, 0.0, loop.time())
        while self._release_step(loop.time()):  # steps due while it was away
            pass
        self._restart = False
        for cid, c in list(self.buf.items()):
            await self._send_chunk(ws, cid, c)
        await self._send(ws, self._report())
        now = loop.time()
        next_hb, next_report = now + cfg.heartbeat_s, now + cfg.report_s
        draining_until: float | None = None
        while True:
            now = loop.time()
            if self.shared.stop.is_set():
                if draining_until is None:
                    draining_until = min(now + s.drain_s, self.shared.drain_deadline)
                if not self.buf or now >= draining_until:
                    return
            else:
                before = self.next_id
                self._produce_due(now)
                for cid in range(before, self.next_id):
                    await self._send_chunk(ws, cid, self.buf[cid])
            if now >= next_hb:
                next_hb = now + cfg.heartbeat_s
                await self._send(ws, {"t": protocol.HEARTBEAT, "health": self._health(),
                                      "ts": time.time()})
            if self._release_step(now):  # the agent reports a release step at once
                next_report = now
                if self._restart:  # the agent restarts on the new (or the old) release
                    with contextlib.suppress(LinkDown):
                        await self._send(ws, self._report())
                    return
            if now >= next_report:
                next_report = now + cfg.report_s
                await self._send(ws, self._report())
            due = min(next_hb, next_report, self._next_batch, self.updater.next_at)
            if draining_until is not None:
                due = min(due, draining_until, now + 0.2)
            # the stop signal cuts the wait short (`wake`), so a node wakes only when
            # something is due or arrives
            msg = await self._receive_or_wake(ws, due - loop.time())
            if msg is None:
                continue
            self._on_message(msg, loop.time())

    async def _receive_or_wake(self, ws: aiohttp.ClientWebSocketResponse, wait: float
                               ) -> dict[str, Any] | None:
        """`link.receive`, cut short (None) by `wake`. Waking cancels this task while it waits
        here: one timer per wait instead of a poll of the stop signal every second, which
        was most of a virtual node's CPU in the steady state."""
        task = asyncio.current_task()
        self._waiting = task
        try:  # at least 1 ms: aiohttp takes a timeout of 0 as none (waits for a message)
            return await receive(ws, max(0.001, wait))
        except asyncio.CancelledError:
            if not self._woken or task is None or task.uncancel() > 0:
                raise  # a cancellation of its own (the run's end): not ours to swallow
            return None
        finally:
            self._waiting = None
            self._woken = False

    def wake(self) -> None:
        """The stop signal was set: a node waiting for its next message looks at it now."""
        if self._waiting is not None and not self._woken:
            self._woken = True
            self._waiting.cancel()

    def _on_message(self, msg: dict[str, Any], now: float) -> None:
        kind = msg["t"]
        rec = self.shared.recorder
        if kind == protocol.ACK:
            t = time.monotonic()
            for cid in msg["ids"]:
                c = self.buf.pop(cid, None)
                if c is not None:
                    self.acked += c.count
                    if c.sent_at is not None:
                        ms = (t - c.sent_at) * 1000.0
                        rec.sample("ack_ms", ms)
                        self.shared.recent_acks.append(ms)
        elif kind == protocol.DESIRED:
            self._poke(int(msg["version"]), float(msg.get("jitter_s", 0.0)), now,
                       msg.get("state"))
        elif kind == protocol.REFUSE:
            rec.failure(f"refused: {msg['reason']}")
            raise LinkDown(f"chunk refused: {msg['reason']}"[:80])
        elif kind in (protocol.ERROR, protocol.REVOKED):
            raise LinkDown(f"{kind}: {msg['reason']}"[:80])

    def _poke(self, version: int, jitter: float, now: float,
              inline: dict[str, Any] | None = None) -> None:
        if version <= max(self.applied_version, self._wanted):
            return
        self._wanted = version
        if inline is not None and not self.shared.settings.fetch_only:
            try:  # the state in the poke itself (`protocol`, inline desired state)
                state: DesiredState | None = DesiredState.from_wire(inline)
            except PeerError:
                state = None  # fetched instead
            if state is not None and state.version == version:
                self.applied_version = version
                self._assign(state.release, now)
                self.shared.recorder.sample("fetch_s", 0.0)
                self.shared.recorder.count("inline_states")
                self.shared.event("desired", self.index, self.node_id, version=version)
                return
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(
                self._fetch(jitter, time.monotonic()))

    def _assign(self, release: str | None, now: float) -> None:
        """A desired state was applied: its release goes to the updater (which stages it if
        the agent's would: `machine.should_apply`)."""
        if self.updater.assign(release, now):
            self.shared.recorder.count("release_staging")
            self.shared.event("release", self.index, self.node_id, v=release, o="staging")

    async def _fetch(self, jitter: float, poked: float) -> None:
        """GET the newest desired state (after a random part of the cloud's jitter hint, as
        the agent's twin does) and take its version as applied."""
        s = self.shared.settings
        rec = self.shared.recorder
        if jitter > 0:
            await asyncio.sleep(random.random() * min(jitter, MAX_JITTER_S))
        assert self.ctx is not None
        while self._wanted > self.applied_version and not self.shared.stop.is_set():
            try:
                answer = await device_request(s.cloud, self.ctx, "GET", "/v1/device/desired",
                                              ca_path=s.ca)
            except (TransportError, PeerError) as exc:
                rec.failure(f"desired: {short(exc)}")
                await asyncio.sleep(1.0)
                continue
            version = int(answer.get("version", 0))
            if version < self._wanted:
                await asyncio.sleep(0.5)  # a replica not caught up yet
                continue
            self.applied_version = version
            try:  # validated as the agent's twin does
                state = DesiredState.from_wire(answer.get("desired"))
            except PeerError as exc:
                rec.failure(f"desired: {short(exc)}")
            else:
                self._assign(state.release, asyncio.get_running_loop().time())
            rec.sample("fetch_s", time.monotonic() - poked)
            rec.count("fetches")
            self.shared.event("desired", self.index, self.node_id, version=version)

    # -- lifetime -----------------------------------------------------------------------------
    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.shared.stop.wait(), seconds)

    async def run(self, start_delay: float = 0.0) -> NodeResult:
        rec = self.shared.recorder
        try:
            await self._sleep(start_delay)
            if self.shared.stop.is_set():
                return self.result()
            await self.enrol()
            self._next_batch = asyncio.get_running_loop().time() + \
                random.random() * self.shared.settings.telemetry_every
            retry = self._retry = Retry(self.shared.settings.uplink.backoff,
                                        self.shared.settings.uplink.healthy_s)
            first = True
            while True:
                if not first:
                    rec.count("reconnects")
                first = False
                pace = None
                try:
                    await self._session()
                    if self.shared.stop.is_set():
                        break
                    if self._restart:  # a restart for a release: connect again at once
                        rec.count("release_restarts")
                        continue
                    rec.failure("session closed")
                except LinkDown as exc:
                    rec.failure(str(exc))
                    pace = exc.retry_after
                except (aiohttp.ClientError, OSError, TimeoutError, PeerError) as exc:
                    rec.failure(short(exc))
                except Exception as exc:  # never a silent dead node: counted, and it goes on
                    if not any(k.startswith(BUG) for k in rec.failures):
                        log.exception("virtual node %d: unexpected error", self.index)
                    rec.failure(f"{BUG}{type(exc).__name__}: {exc}")
                if self.shared.stop.is_set() and not self.buf:
                    break
                if self.shared.stop.is_set():  # stopped while away: try again to drain
                    left = self.shared.drain_deadline - asyncio.get_running_loop().time()
                    if self._drain_tries >= 3 or left <= 0:
                        break
                    self._drain_tries += 1
                    await asyncio.sleep(min(retry.failed(), left))
                    continue
                await self._sleep(retry.failed(pace))
        except ConfigError as exc:
            self.problem = str(exc)
            rec.failure(str(exc))
        except LinkDown as exc:
            self.problem = str(exc)
        if self._fetching is not None:
            self._fetching.cancel()
            with contextlib.suppress(BaseException):
                await self._fetching
        return self.result()

    def result(self) -> NodeResult:
        unacked = [(c.seq, c.count) for c in self.buf.values() if c.sent_at is not None]
        return NodeResult(self.index, self.node_id, self.next_seq, self.sent_upto, self.acked,
                          unacked, self.connected, self.applied_version, self.problem,
                          self.updater.state.running_version, list(self.updater.state.failed))
