"""The live device sessions of this process: `SessionRegistry` and `handle_session`.

`SessionRegistry` knows the live session of each node (at most one: a new session closes the
old one and waits for its commits first, not for its socket's close handshake), pokes a session
when a new desired version is stored (`notify_desired`), closes it when its node is revoked
(`revoke`), and runs the one maintenance
task of the application (batched last-seen writes, revocation reload, closing sessions whose
certificate expired or was revoked elsewhere; a node decommissioned elsewhere hears it with the
decommission order). There are no timers per node.

`handle_session` upgrades an authenticated device request to the WebSocket and runs its
`session.Session` to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSCloseCode, web
from cryptography import x509

from edgewise.cloud.ingest import GroupCommitter
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.node_writes import NodeWrites
from edgewise.cloud.session import Session, SessionLimits
from edgewise.cloud.session_admission import StartAdmission
from edgewise.cloud.store import Store
from edgewise.common import collector
from edgewise.errors import PeerError, StorageError
from edgewise.security.tls import RevocationList
from edgewise.sync import protocol
from edgewise.sync.health import clean as clean_health
from edgewise.sync.hlc import Clock

log = logging.getLogger(__name__)

class SessionRegistry:
    """The live sessions of this process, one per node; see the module docstring."""

    def __init__(self, store: Store, committer: GroupCommitter, metrics: Metrics,
                 revocations: RevocationList, *, limits: SessionLimits | None = None,
                 maintenance_interval: float = 10.0, replace_timeout: float = 2.0,
                 node_write_interval: float = 1.0) -> None:
        self.store = store
        self.committer = committer
        self.metrics = metrics
        self.revocations = revocations
        self.limits = limits or SessionLimits()
        self.maintenance_interval = maintenance_interval
        # s to wait for a replaced session's commits: well under the agent's welcome timeout
        # (10 s, `edge.uplink.UplinkConfig`), or a node whose welcome was late would give up on
        # each new session too while it waits for the one before (issue 11, the storm)
        self.replace_timeout = replace_timeout
        self.clock = Clock("cloud")
        # status and report writes, grouped (the app runs its task: ``async with``)
        self.node_writes = NodeWrites(store, interval=node_write_interval)
        self.checks = asyncio.Semaphore(self.limits.check_threads)  # payload checks at once
        # sessions upgraded whose hello is not answered yet, and upgrades in line for that
        self.admission = StartAdmission()
        self._sessions: dict[str, Session] = {}
        self._seen: dict[str, datetime] = {}
        self._health: dict[str, tuple[dict[str, Any], datetime]] = {}  # one per node
        self.health_refused = 0  # heartbeats whose health was malformed
        self._wire = [0, 0]
        # node -> its quarantine reason or None, at a session's hello: the attestation policy
        # (`attestation.api`) may quarantine a node there; the store's reason otherwise
        self.quarantine_policy: Callable[[str], Awaitable[str | None]] | None = None
        # (node, seconds its session is open) of the live sessions, every third round: the
        # attestation quarantines TPM nodes whose attestation is overdue (`attestation.api`)
        self.attestation_check: Callable[[list[tuple[str, float]]], Awaitable[None]] | None = \
            None
        # told of each session attached here (`replicas.ReplicaBus.opened`: the other
        # processes of the database close their older session of the node)
        self.on_open: Callable[[str, float], None] | None = None
        self.replaced_elsewhere = 0  # sessions closed: their node opened a newer one elsewhere

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

    async def revoke(self, node_id: str, reason: str = "the node has been revoked", *,
                     decommissioned: bool = False, wipe: bool = False) -> bool:
        """Send ``revoked`` (with the decommission fields if ``decommissioned``) to the node's
        live session and close it. True if there was one."""
        session = self._sessions.get(node_id)
        if session is None:
            return False
        session.revoke(reason, decommissioned=decommissioned, wipe=wipe)
        return True

    async def quarantine_at_hello(self, node_id: str) -> bool:
        """Whether the node's chunks are to be stored as quarantined (at its hello)."""
        if self.quarantine_policy is not None:
            return await self.quarantine_policy(node_id) is not None
        return node_id in await self.store.quarantines([node_id])

    def set_quarantined(self, node_id: str, quarantined: bool) -> None:
        """The node's quarantine changed: its live session here stores accordingly."""
        session = self._sessions.get(node_id)
        if session is not None:
            session.quarantined = quarantined

    async def refresh_quarantines(self) -> None:
        """Quarantines set or lifted by another replica reach the live sessions here."""
        ids, flagged = list(self._sessions), {}
        for i in range(0, len(ids), 1000):  # bound values per statement
            flagged.update(await self.store.quarantines(ids[i:i + 1000]))
        for node_id, session in list(self._sessions.items()):
            session.quarantined = node_id in flagged

    def hello_done(self) -> None:
        """A session's hello was answered: it no longer counts as starting."""
        self.admission.ended(welcomed=True)

    def mark_seen(self, node_id: str) -> None:
        self._seen[node_id] = datetime.now(UTC)

    def node_health(self, node_id: str, heartbeat: dict[str, Any]) -> None:
        """Keep the health a heartbeat carried (checked and bounded: `sync.health`) with the
        node's clock offset (our time minus the heartbeat's ``ts``, one-way latency
        included), the newest per node; written with the last-seen times. Malformed health
        is counted (`health_refused`) and dropped; the session goes on."""
        now = datetime.now(UTC)
        try:
            body = clean_health(heartbeat["health"])
        except PeerError as exc:
            self.health_refused += 1
            log.debug("health of %s dropped: %s", node_id, exc)
            return
        body["clock_offset_s"] = round(now.timestamp() - float(heartbeat["ts"]), 3)
        self._health[node_id] = (body, now)

    async def attach(self, session: Session) -> None:
        """Make ``session`` the node's live one: close the old one and wait until it is
        settled (``Session.settled``: its reader stopped and its submitted commits ended; at
        once if it had not read its hello), at most ``replace_timeout`` seconds (after that
        the old one is logged and left to end by itself: its late commits are harmless, stored
        chunks are skipped by primary key). The old socket's close handshake (aiohttp waits up
        to 10 s for a peer that went away) is not waited for.
        Nothing is written to the store here: the session queues ``online`` once it has read
        the node's hello (`node_writes`). Raises StorageError; the caller
        (`handle_session`) runs this inside the try/finally that finishes and detaches the
        session, so a failure here never leaves an entry that later sessions of the node
        would wait for."""
        old = self._sessions.get(session.node_id)
        self._sessions[session.node_id] = session
        self.metrics.sessions.set(len(self._sessions))
        self.metrics.sessions_opened.inc()
        if self.on_open is not None:
            self.on_open(session.node_id, session.opened_at)
        if old is not None:
            old.replace()
            try:
                await asyncio.wait_for(old.settled.wait(), self.replace_timeout)
            except TimeoutError:
                log.warning("session of %s: the session it replaces did not settle its commits "
                            "within %g s; going on without it", session.node_id,
                            self.replace_timeout)

    def opened_elsewhere(self, opened: dict[str, float]) -> int:
        """Nodes that opened a session at another process (node -> its wall-clock open
        time): close each older session of them here (one session per node across the
        processes of a database); how many were closed."""
        closed = 0
        for node_id, at in opened.items():
            session = self._sessions.get(node_id)
            if session is not None and session.opened_at < at and not session.replaced:
                session.replace(elsewhere=True)
                closed += 1
        self.replaced_elsewhere += closed
        return closed

    async def detach(self, session: Session) -> None:
        counts = session.wire
        if counts is not None:
            self.metrics.wire_bytes.labels("out").inc(counts[0])
            self.metrics.wire_bytes.labels("in").inc(counts[1])
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            self.metrics.sessions.set(len(self._sessions))
            if not session.replaced:
                self.node_writes.status(session.node_id, "offline")

    async def flush_seen(self) -> None:
        seen, self._seen = self._seen, {}
        if seen:
            await self.store.touch_nodes(seen)
        health, self._health = self._health, {}
        if health:
            await self.store.write_health(health)

    def enforce(self, now: datetime | None = None) -> int:
        """Close live sessions whose certificate is revoked or has expired; how many."""
        t = now or datetime.now(UTC)
        closed = 0
        for session in list(self._sessions.values()):
            if self.revocations.revoked(session.serial, session.fingerprint):
                session.revoke("the node's certificate has been revoked")
                closed += 1
            elif session.not_after < t:
                session.fail("certificate expired: renew it and reconnect")
                closed += 1
        return closed

    async def tell_decommissioned(self) -> int:
        """Close the live sessions of nodes decommissioned elsewhere (another replica) with the
        decommission order, before `enforce` would close them with a plain ``revoked``; how
        many. Looks up only sessions whose certificate is revoked."""
        told = 0
        for session in list(self._sessions.values()):
            if not self.revocations.revoked(session.serial, session.fingerprint):
                continue
            node = await self.store.get_node(session.node_id)
            if node is not None and node.decommissioned:
                what = "decommissioned, wipe" if node.wipe else "decommissioned"
                session.revoke(what, decommissioned=True, wipe=node.wipe)
                told += 1
        return told

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
                    await self.refresh_quarantines()
                    if self.attestation_check is not None:
                        now = time.monotonic()
                        await self.attestation_check([(n, now - s.opened)
                                                      for n, s in self._sessions.items()])
                await self.tell_decommissioned()
                self.enforce()
                collector.scale_young(len(self._sessions))  # a serving process only
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
                         cert: x509.Certificate, fingerprint: str | None = None
                         ) -> web.StreamResponse:
    """Upgrade an authenticated request to the session and run it to its end (``fingerprint``:
    the certificate's key fingerprint, if the caller has it)."""
    ws = web.WebSocketResponse(max_msg_size=protocol.MAX_FRAME_BYTES,
                               heartbeat=registry.limits.heartbeat, compress=False)
    # admitted (`session_admission`): counted as starting until its hello is answered
    # (`hello_done`) or it ends
    try:
        await ws.prepare(request)
    except ConnectionResetError:  # the node gave up before its upgrade was answered (a storm)
        registry.admission.ended(welcomed=False)
        registry.metrics.session_errors.labels("gone before the upgrade").inc()
        return web.Response(status=400)  # nobody reads it; not an error of ours to log
    except BaseException:
        registry.admission.ended(welcomed=False)
        raise
    session = Session(node_id, cert, ws, registry, request, fingerprint)
    try:
        try:
            await registry.attach(session)
        except StorageError as exc:
            log.warning("session of %s refused: storage failure while attaching: %s",
                        node_id, exc)
            registry.metrics.session_errors.labels("storage failure").inc()
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.TRY_AGAIN_LATER,
                               message=b"storage failure: try again later")
            return ws
        if not session.replaced:
            await session.run()
    finally:
        if not session.hello_read:
            registry.admission.ended(welcomed=False)
        session.settled.set()
        session.finished.set()
        await registry.detach(session)
    return ws
