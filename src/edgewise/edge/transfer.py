"""The outbox side of the uplink: chunks sent, acknowledged and refused, the cloud's marks, gaps.

`Transfer` lives as long as its `edgewise.edge.uplink.Uplink` and outlasts the sessions; the
uplink keeps the connection and hands it each session's `Window` and `Lanes` (`begin`, `end`):

* at each ``welcome`` (`welcome`): the outbox's numbers are made those of the welcoming node id
  (`Outbox.reconcile`: adopted, moved above the cloud's marks, or renumbered after a
  re-enrolment); then the cloud's contiguous marks: chunks wholly below them are acknowledged
  locally, lost ranges below them are forgotten, refused chunks that left the outbox are
  forgotten, the ledger remembers the marks;
* the **feeder** (one per session): takes chunks with `Outbox.peek` while the window has room,
  records their ranges in the ledger (saved first) and queues them as ``batch`` frames; a chunk
  too large for one frame is refused locally;
* ``ack`` (`on_ack`) releases the window and hands the ids to the **acker**, which runs across
  sessions: it deletes the chunks with the engine's own `Outbox.ack`, off the event loop. A
  chunk stays excluded from sending until its deletion is done;
* ``refuse`` (`on_refuse`): never sent again (`edgewise.edge.uplink_store`);
* gaps (`report_gaps`): the outbox's lost ranges above the cloud's marks, each with its reason
  (chunks evicted while in flight included: the cloud records as lost only what it does not
  hold), recorded in the ledger (saved), queued as ``gap`` frames, once per session; again in
  the next session until the cloud's mark has passed them.

Frames and outbox reads: `edgewise.edge.frames`; persisted state: `edgewise.edge.uplink_store`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgewise.edge.flow import Lanes, Sent, Window
from edgewise.edge.frames import gap_frame, parse_marks, signature, take
from edgewise.edge.ledger import Ledger
from edgewise.edge.uplink_store import UplinkStore
from edgewise.errors import PeerError, StorageError
from edgewise.outbox import Outbox
from edgewise.outbox.numbering import SentBefore
from edgewise.outbox.view import OutboxSnapshot
from edgewise.sync import protocol as P

log = logging.getLogger("edgewise.edge.uplink")  # the uplink's log lines keep their name


class Transfer:
    """Sending the outbox and acknowledging it, across the sessions of one uplink."""

    def __init__(self, outbox: Outbox, store: UplinkStore, poll_s: float) -> None:
        self.outbox = outbox  # the agent's one outbox, open for its lifetime
        self.store = store
        self.poll_s = poll_s  # how often the feeder looks for new chunks when idle
        # counters
        self.chunks_sent = self.records_sent = self.chunks_resent = 0
        self.chunks_acked = self.records_acked = 0
        self.acked_locally = 0  # chunks below the cloud's mark, acknowledged without sending
        self.gaps_sent: dict[str, int] = {}  # stream -> sequence numbers reported as gaps
        self.marks: dict[str, int] = {}  # the cloud's contiguous marks, from the last welcome
        self.node_id: str | None = None  # of the last welcome
        self.renumbered = 0  # welcomes that moved or renumbered the outbox's sequence numbers
        self._queued: dict[int, tuple[int, int]] = {}  # lost range id -> range, this session
        self._counted: dict[int, tuple[int, int]] = {}  # lost range id -> range, ever
        self._ledger_failed = False
        self._dropped_seen = -1  # records dropped, as the last snapshot reported from read it
        # across sessions
        self._sent: dict[int, Sent] = {}  # every chunk sent and not yet deleted
        self._ever_sent: set[int] = set()
        self.acking: set[int] = set()  # acknowledged, being deleted
        self._ack_queue: asyncio.Queue[list[int]] | None = None
        # of the session that is up, if any
        self.window: Window | None = None
        self.lanes: Lanes | None = None

    def start_acker(self) -> asyncio.Task[None]:
        """Start the acker; it runs until cancelled."""
        self._ack_queue = asyncio.Queue()
        return asyncio.create_task(self._acker(), name="uplink-acker")

    # -- a session's start and end ----------------------------------------------------------
    async def welcome(self, streams: dict[Any, Any], snap: OutboxSnapshot,
                      node_id: str | None = None) -> None:
        """Take the marks of a ``welcome`` (raises `PeerError` if one is not valid)."""
        self.marks = parse_marks(streams)
        if node_id is not None:
            sent = None
            old = self.store.ledger
            if old.node != node_id:
                if old.node is not None:  # re-enrolled: another sequence space
                    sent = SentBefore(old.node, dict(old.high), dict(old.marks))
                    self.store.ledger = Ledger(node_id)
                self.store.ledger.node = node_id
            done = await asyncio.to_thread(self.outbox.reconcile, node_id, self.marks, sent)
            if done.unsure:
                log.warning("%d records were sent as node %s and never acknowledged before "
                            "this node enrolled again as %s: not sent again (the control plane "
                            "may hold them under %s), reported as lost", done.unsure, old.node,
                            node_id, old.node)
            self.node_id = node_id
            if done.kind in ("moved", "renumbered"):
                self.renumbered += 1
                log.warning(
                    "the outbox's sequence numbers were %s for node %s (next: %s): %s", done.kind,
                    node_id, done.streams,
                    "a new node id starts its own sequence space; what the old one stored is "
                    "not sent again" if done.kind == "renumbered" else
                    "the control plane holds more of these streams than this outbox numbered")
                snap = OutboxSnapshot()  # the numbers of ``snap`` are the old ones
        self._check_marks(snap)
        await self._ack_below_marks(snap)
        if snap.streams:
            self.store.prune_refused({c.id: (c.stream, c.seq_first) for c in snap.chunks})
        self.store.ledger.trim(self.marks)
        try:
            await asyncio.to_thread(self.outbox.forget_lost, self.marks)
        except StorageError as exc:
            log.warning("cannot forget lost ranges below the cloud's marks: %s", exc)

    def begin(self, window_bytes: int, window_chunks: int) -> tuple[Window, Lanes]:
        """The window and lanes of a new session (lost ranges are reported by `report_gaps`)."""
        window = self.window = Window(window_bytes, window_chunks)
        lanes = self.lanes = Lanes()
        self._queued = {}
        return window, lanes

    def end(self) -> None:
        self.window = None
        self.lanes = None

    # -- the cloud's marks ------------------------------------------------------------------
    def _check_marks(self, snap: OutboxSnapshot) -> None:
        for name, mark in self.marks.items():
            row = snap.streams.get(name)
            if row is not None and mark > row.next_seq:
                log.error(
                    "the control plane holds stream %s up to seq %d but this node's outbox is "
                    "at %d, and neither its outbox.seqs note nor the uplink ledger said so: "
                    "new records may be taken as duplicates. Restore the data directory or "
                    "enrol this node again", name, mark, row.next_seq,
                )

    async def _ack_below_marks(self, snap: OutboxSnapshot) -> None:
        ids = []
        for c in snap.chunks:
            mark = self.marks.get(c.stream)
            if mark is not None and c.seq_first + c.seq_count <= mark and c.id not in self.acking:
                ids.append(c.id)
        if ids:
            self.acked_locally += len(ids)
            self.acking.update(ids)
            assert self._ack_queue is not None
            self._ack_queue.put_nowait(ids)

    # -- what the receiver hears ------------------------------------------------------------
    def on_ack(self, ids: list[Any]) -> None:
        done = []
        for cid in ids:
            if isinstance(cid, bool) or not isinstance(cid, int):
                raise PeerError(f"ack with a chunk id that is not an integer: {cid!r:.40}")
            sent = self.window.release(cid) if self.window else None
            sent = sent or self._sent.get(cid)
            if sent is None or cid in self.acking:
                continue  # not ours to delete (never sent by this process) or already going
            self.chunks_acked += 1
            self.records_acked += sent.records
            self.acking.add(cid)
            done.append(cid)
        if done:
            assert self._ack_queue is not None
            self._ack_queue.put_nowait(done)

    async def on_refuse(self, cid: int, reason: str) -> None:
        sent = self.window.release(cid) if self.window else None
        sent = sent or self._sent.pop(cid, None)
        self._sent.pop(cid, None)
        await self.store.refuse(cid, sent, reason)

    async def _acker(self) -> None:
        assert self._ack_queue is not None
        queue = self._ack_queue
        while True:
            ids = await queue.get()
            while not queue.empty():
                ids.extend(queue.get_nowait())
            try:
                await asyncio.to_thread(self.outbox.ack, ids)
            except StorageError as exc:
                log.error("cannot delete acknowledged chunks: %s (they will be sent again and "
                          "deduplicated by the cloud)", exc)
            finally:
                for cid in ids:
                    self.acking.discard(cid)
                    self._sent.pop(cid, None)

    # -- sending ----------------------------------------------------------------------------
    async def feeder(self, window: Window, lanes: Lanes) -> None:
        store = self.store
        idle_sig: tuple[int, int, int] | None = None
        while True:
            await window.wait_room()
            ob = self.outbox
            sig = signature(ob)
            if sig == idle_sig:
                await asyncio.sleep(self.poll_s)
                continue
            exclude = set(window.chunks) | self.acking | set(store.refused)
            taken = await asyncio.to_thread(take, ob, room=window.room(), exclude=exclude)
            fresh = [(c, f) for c, f in taken if c.id not in window.chunks
                     and c.id not in self.acking and c.id not in store.refused]
            if not fresh:
                idle_sig = sig
                continue
            idle_sig = None
            grew = False
            for chunk, frame in fresh:
                if frame is not None:
                    grew |= store.ledger.record_sent(chunk.stream, chunk.seq_first,
                                                     chunk.seq_count)
            if grew:
                await self._save_ledger()
            for chunk, frame in fresh:
                sent = Sent(chunk.stream, chunk.seq_first, chunk.seq_count, chunk.records,
                            len(chunk.payload))
                if frame is None:
                    await store.refuse(
                        chunk.id, sent, f"chunk of {len(chunk.payload)} bytes is over the "
                        f"{P.MAX_FRAME_BYTES} byte frame limit")
                    continue
                window.add(chunk.id, sent)
                if chunk.id in self._ever_sent:
                    self.chunks_resent += 1
                self._ever_sent.add(chunk.id)
                self._sent[chunk.id] = sent
                self.chunks_sent += 1
                self.records_sent += chunk.records
                lanes.put_data(frame)

    async def _save_ledger(self) -> None:
        """Save the ledger; a failure (a full disk) is logged once and sending goes on: the
        ledger only guards a later replacement of the outbox."""
        try:
            await self.store.save_ledger()
            self._ledger_failed = False
        except StorageError as exc:
            if not self._ledger_failed:
                log.warning("cannot save the uplink ledger (%s); sending anyway", exc)
            self._ledger_failed = True

    async def report_new_gaps(self, snapshot: Callable[[], Awaitable[OutboxSnapshot]],
                              force: bool = False) -> None:
        """Report the gaps of a fresh snapshot when the outbox has dropped records since the
        last one reported from (or ``force``).

        The outbox counts a drop in memory before its transaction commits, so a snapshot taken
        right after the count moved may not hold the range yet: what is remembered is the count
        the snapshot itself read, and the next call looks again until the two agree."""
        dropped = sum(s.dropped for s in self.outbox.stats().values())
        if not force and dropped == self._dropped_seen:
            return
        snap = await snapshot()
        await self.report_gaps(snap)
        self._dropped_seen = sum(row.dropped for row in snap.streams.values())

    async def report_gaps(self, snap: OutboxSnapshot) -> None:
        """Queue a ``gap`` for each lost range above the cloud's mark not queued yet in this
        session (recorded in the ledger first, then marked as reported in the outbox)."""
        if self.lanes is None:
            return
        new = [r for r in snap.lost
               if r.seq_first + r.seq_count > self.marks.get(r.stream, 0)
               and self._queued.get(r.id) != (r.seq_first, r.seq_count)]
        if not new:
            return
        grew = False
        for r in new:
            grew |= self.store.ledger.record_gap(r.stream, r.seq_first, r.seq_count)
        if grew:
            await self._save_ledger()
        for r in new:
            first, count = r.seq_first, r.seq_count
            before = self._queued.get(r.id)
            if before is not None and before[0] == first and before[1] < count:
                first, count = first + before[1], count - before[1]  # the range grew since
            log.warning("stream %s: %d records (seq %d..%d) %s; reporting the gap", r.stream,
                        count, first, first + count - 1, r.reason)
            if self.lanes is not None:
                self.lanes.put_data(gap_frame(r.stream, first, count, r.reason))
            self._queued[r.id] = (r.seq_first, r.seq_count)
            counted = self._counted.get(r.id)
            self.gaps_sent[r.stream] = self.gaps_sent.get(r.stream, 0) + r.seq_count - (
                counted[1] if counted is not None and counted[0] == r.seq_first else 0)
            self._counted[r.id] = (r.seq_first, r.seq_count)
        if self.node_id is not None:
            try:
                await asyncio.to_thread(self.outbox.mark_reported, [r.id for r in new],
                                        self.node_id)
            except StorageError as exc:
                log.warning("cannot mark lost ranges as reported: %s", exc)
