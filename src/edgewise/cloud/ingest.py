"""Exactly-once ingest: decide what a batch is, check its payload, group-commit, then ack.

Three parts, pure decisions inside and I/O around them:

* `StreamTracker` (pure): per (node, stream) the *contiguous* mark (every seq below it is stored
  or declared lost) and the settled ranges above it (chunks or gaps that arrived out of order).
  `classify` says whether a batch ``[seq, seq+count)`` is new, a duplicate (wholly below the
  mark, or exactly a stored range: acknowledge, do not store), or inconsistent (overlaps settled
  sequence numbers any other way, or was declared lost: refuse). A gap declares lost only the
  parts of its range that are not settled yet (`unsettled`); it is never refused.
* `check_payload`: every payload is checked with `edgewise.sync.codec.check` (exactly what
  `codec.decode` will accept, in bounded memory whatever the payload holds) before it is
  stored: the zstd frame must declare its content size, at most `MAX_DECODED_BYTES`, checked
  before inflating; the chunk must keep the codec's limits; and its record count must be the
  one the batch claims. Payloads declaring more than `INLINE_DECODED_BYTES` are checked in a
  worker thread, at most ``SessionLimits.check_threads`` at a time, so the event loop never
  does more than a small, bounded part of it.
* `GroupCommitter`: one task per application. Sessions submit their writes; everything that
  arrives within ``linger`` (50 ms in the app, `CloudConfig.commit_linger`) goes into one
  transaction (`Store.commit_ingest`), and only then are the submitters' futures resolved, so a
  session acknowledges a batch only after its durable commit. The primary key (node, stream,
  seq_first) is the last guard: a row already stored is never stored again. One node's writes
  never fail another's: ranges are checked when submitted (`check_writes`), and a group whose
  commit fails anyway is committed again in halves, down to the one node whose writes fail (see
  `GroupCommitter._isolate`). A write submitted ``after`` one that failed fails too, so a mark
  never moves past a lost chunk.

A node has one live session at a time (the session registry closes the old one and waits for
its commits before the new one loads its marks), so the trackers of a session are the truth
for that node while it lives.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import zstandard

from edgewise.cloud.metrics import Metrics
from edgewise.cloud.store import ChunkWrite, GapWrite, IngestResult, MarkWrite, SeqRange, Store
from edgewise.errors import PeerError
from edgewise.sync import codec
from edgewise.sync.protocol import MAX_SEQ

log = logging.getLogger(__name__)

MAX_DECODED_BYTES = 64 * 1024 * 1024  # per payload, checked before decompressing
MAX_ABOVE = 10_000  # out-of-order ranges kept per stream before batches are refused
MAX_STREAM_CHARS = 128
INLINE_DECODED_BYTES = 16 * 1024  # payloads declaring more are checked in a worker thread

NEW, DUPLICATE, CONFLICT = "new", "duplicate", "conflict"


@dataclass(frozen=True)
class Verdict:
    kind: str  # NEW | DUPLICATE | CONFLICT
    reason: str = ""


def check_stream_name(stream: Any) -> str:
    if (not isinstance(stream, str) or not 1 <= len(stream) <= MAX_STREAM_CHARS
            or not stream.isprintable()):
        raise PeerError(f"stream name must be 1-{MAX_STREAM_CHARS} printable characters, "
                        f"got {stream!r:.80}")
    return stream


@dataclass
class StreamTracker:
    """What is settled in one stream: ``[0, contiguous)`` plus ``above`` (sorted, disjoint)."""

    contiguous: int = 0
    above: list[SeqRange] = field(default_factory=list)

    def classify(self, seq: int, count: int, *, gap: bool = False) -> Verdict:
        end = seq + count
        if end <= self.contiguous:
            return Verdict(DUPLICATE)
        if seq < self.contiguous:
            return Verdict(CONFLICT, f"seq {seq}..{end - 1} straddles the contiguous mark "
                                     f"{self.contiguous} (already settled below it)")
        i = bisect.bisect_right(self.above, seq, key=lambda r: r.first)
        for r in self.above[max(i - 1, 0):]:
            if r.first >= end:
                break
            if r.end <= seq:
                continue
            if r.first == seq and r.count == count and r.gap == gap:
                return Verdict(DUPLICATE)
            what = "declared lost by a gap" if r.gap else "stored"
            return Verdict(CONFLICT, f"seq {seq}..{end - 1} overlaps {r.first}..{r.end - 1}, "
                                     f"already {what}")
        if len(self.above) >= MAX_ABOVE and seq != self.contiguous:
            return Verdict(CONFLICT, f"more than {MAX_ABOVE} ranges out of order above seq "
                                     f"{self.contiguous}; send the missing chunks or a gap")
        return Verdict(NEW)

    def unsettled(self, seq: int, count: int) -> list[tuple[int, int]]:
        """The parts of ``[seq, seq+count)`` not yet settled, as ``(first, count)``: what a
        gap message newly declares lost (a node may report a range the cloud partly holds,
        e.g. a chunk stored whose ack was lost before the node evicted it)."""
        lo, end = max(seq, self.contiguous), seq + count
        parts: list[tuple[int, int]] = []
        i = bisect.bisect_right(self.above, lo, key=lambda r: r.first)
        for r in self.above[max(i - 1, 0):]:
            if r.first >= end:
                break
            if r.end <= lo:
                continue
            if r.first > lo:
                parts.append((lo, r.first - lo))
            lo = max(lo, r.end)
        if lo < end:
            parts.append((lo, end - lo))
        return parts

    def settle(self, seq: int, count: int, *, gap: bool = False) -> None:
        """Record ``[seq, seq+count)`` as settled (call after `classify` said NEW)."""
        if seq == self.contiguous:
            self.contiguous += count
        else:
            bisect.insort(self.above, SeqRange(seq, count, gap), key=lambda r: r.first)
        while self.above and self.above[0].first == self.contiguous:
            self.contiguous = self.above.pop(0).end


def declared_size(payload: bytes) -> int:
    """The decompressed size a payload's zstd frame declares; `PeerError` if it declares
    none or more than `MAX_DECODED_BYTES` (nothing is inflated to find out)."""
    try:
        size = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise PeerError(f"payload is not a zstd frame: {exc}") from None
    if size < 0:
        raise PeerError("payload does not declare its decompressed size")
    if size > MAX_DECODED_BYTES:
        raise PeerError(f"payload decompresses to {size} bytes; the limit is {MAX_DECODED_BYTES}")
    return size


def check_payload(payload: bytes, records: int) -> None:
    """Check one chunk payload (bounded); raises `PeerError` with the reason."""
    size = declared_size(payload)
    try:
        codec.check(payload, records=records, limit=size)
    except codec.CountMismatch as exc:
        raise PeerError(f"payload holds {exc.found} records, the batch says "
                        f"{exc.expected}") from None


async def check_payload_async(payload: bytes, records: int,
                              slots: asyncio.Semaphore | None = None) -> None:
    """`check_payload`, in a worker thread (one of ``slots``) unless the payload declares at
    most `INLINE_DECODED_BYTES`: then the check is cheap enough for the event loop."""
    if declared_size(payload) <= INLINE_DECODED_BYTES:
        check_payload(payload, records)
        return
    if slots is None:
        await asyncio.to_thread(check_payload, payload, records)
        return
    # the slot is held until the thread is done, even if the caller is cancelled meanwhile
    # (a thread cannot be stopped): so no more than ``slots`` checks ever run at once
    await slots.acquire()
    try:
        fut = asyncio.get_running_loop().run_in_executor(None, check_payload, payload, records)
    except BaseException:
        slots.release()
        raise

    def done(f: asyncio.Future[None]) -> None:
        slots.release()
        if not f.cancelled():
            f.exception()  # retrieved here: the caller may be gone

    fut.add_done_callback(done)
    await asyncio.shield(fut)


def check_writes(chunks: Iterable[ChunkWrite], gaps: Iterable[GapWrite],
                 marks: Iterable[MarkWrite]) -> None:
    """Raise `PeerError` unless every range fits the store: ``0 <= seq``, ``count >= 1``,
    ``seq + count <= MAX_SEQ``, ``0 <= records <= count``, ``0 <= contiguous <= MAX_SEQ``."""
    for w in (*chunks, *gaps):
        first, count = w.seq_first, w.seq_count
        if not (first >= 0 and count >= 1 and first + count <= MAX_SEQ):
            raise PeerError(f"seq {first} count {count} of {w.node_id}/{w.stream} does not fit "
                            "the store")
        if isinstance(w, ChunkWrite) and not 0 <= w.records <= count:
            raise PeerError(f"{w.records} records for {count} sequence numbers")
    for m in marks:
        if not 0 <= m.contiguous <= MAX_SEQ:
            raise PeerError(f"mark {m.contiguous} of {m.node_id}/{m.stream} does not fit "
                            "the store")


AfterCommit = Callable[[list[ChunkWrite], Set[tuple[str, str, int]]], Awaitable[object]]


@dataclass
class _Item:
    chunks: list[ChunkWrite]
    gaps: list[GapWrite]
    marks: list[MarkWrite]
    future: asyncio.Future[IngestResult]
    nbytes: int
    after: asyncio.Future[IngestResult] | None = None

    def nodes(self) -> frozenset[str]:
        return frozenset(w.node_id for w in (*self.chunks, *self.gaps, *self.marks))


class GroupCommitter:
    """One transaction for everything submitted within ``linger`` seconds (up to
    ``max_items`` submissions or ``max_bytes`` of payload), then the futures resolve.

    Use as ``async with GroupCommitter(store, metrics):``; `submit` from sessions.
    """

    def __init__(self, store: Store, metrics: Metrics, *, linger: float = 0.002,
                 max_items: int = 512, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.store = store
        self.metrics = metrics
        self.linger = linger
        self.max_items = max_items
        self.max_bytes = max_bytes
        # called after each durable group commit with (chunks, the keys the store inserted):
        # data out (`dataout.sender.ForwarderSet.forward_committed`)
        self.after_commit: AfterCommit | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GroupCommitter:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="edgewise-group-commit")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(PeerError("the control plane is shutting down"))

    def submit(self, chunks: Iterable[ChunkWrite] = (), gaps: Iterable[GapWrite] = (),
               marks: Iterable[MarkWrite] = (), *,
               after: asyncio.Future[IngestResult] | None = None) -> asyncio.Future[IngestResult]:
        """Queue writes for the next group commit; the future resolves after it (or raises).

        Writes that do not fit the store (`check_writes`) fail at once, alone. With ``after``
        (the submitter's previous future) these writes fail if those failed: a session's
        writes are stored in order or not at all, so its mark never passes a lost chunk.
        """
        if self._queue is None or self._task is None or self._task.done():
            raise PeerError("the control plane is not accepting data (shutting down)")
        fut: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        item = _Item(list(chunks), list(gaps), list(marks), fut, 0, after)
        try:
            check_writes(item.chunks, item.gaps, item.marks)
        except PeerError as exc:
            fut.set_exception(exc)
            return fut
        item.nbytes = sum(len(c.payload) for c in item.chunks)
        self._queue.put_nowait(item)
        return fut

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            group = [await queue.get()]
            nbytes = group[0].nbytes
            deadline = loop.time() + self.linger
            while len(group) < self.max_items and nbytes < self.max_bytes:
                if queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    item = queue.get_nowait()
                group.append(item)
                nbytes += item.nbytes
            await self._commit(group)

    async def _commit(self, group: list[_Item]) -> None:
        live: list[_Item] = []
        for it in group:
            before = it.after
            if (before is not None and before.done() and not before.cancelled()
                    and before.exception() is not None):
                it.future.set_exception(PeerError("an earlier write of this session failed"))
            else:
                live.append(it)
        self.metrics.commit_size.observe(len(group))
        try:
            try:
                await self._write(live)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                writers: dict[frozenset[str], list[_Item]] = {}
                for it in live:
                    if it.chunks or it.gaps or it.marks:
                        writers.setdefault(it.nodes(), []).append(it)
                log.error("group commit of %d batches of %d nodes failed: %s", len(live),
                          len(writers), exc)
                await self._isolate(list(writers.values()), exc)
                for it in live:  # nothing to write: never the cause
                    if not it.future.done():
                        it.future.set_result(IngestResult())
        except asyncio.CancelledError:
            for it in group:
                if not it.future.done():
                    it.future.set_exception(PeerError("the control plane is shutting down"))
            raise

    async def _write(self, items: list[_Item]) -> None:
        """Commit ``items`` in one transaction and resolve their futures; raises if the store
        does (the futures are then left alone)."""
        chunks = [c for it in items for c in it.chunks]
        gaps = [g for it in items for g in it.gaps]
        marks: dict[tuple[str, str], MarkWrite] = {}
        for it in items:
            for m in it.marks:
                old = marks.get((m.node_id, m.stream))
                if old is None or m.contiguous >= old.contiguous:
                    marks[(m.node_id, m.stream)] = m
        started = time.perf_counter()
        if chunks or gaps or marks:
            result = await self.store.commit_ingest(chunks, gaps, list(marks.values()))
            self.metrics.commits.observe(time.perf_counter() - started)
        else:
            result = IngestResult()
        for it in items:
            if not it.future.done():
                it.future.set_result(result)
        if self.after_commit is not None and chunks:
            try:  # forwarding is best effort after the acks; it never fails the ingest
                await self.after_commit(chunks, result.chunks)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("data out after a group commit failed")

    async def _isolate(self, units: list[list[_Item]], exc: Exception) -> None:
        """A commit of ``units`` (each the items of one node) failed with ``exc``: commit its
        halves apart, and the failing half's halves, down to the one node whose writes fail;
        only that node's items fail. If both halves fail, the cause is not one node (the
        database is down, say): everything fails, after two more attempts, not one per node.
        So one bad node costs at most 2·log2(nodes) extra commits."""
        if len(units) <= 1:
            for it in (it for unit in units for it in unit):
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        mid = len(units) // 2
        failed: list[tuple[list[list[_Item]], Exception]] = []
        for half in (units[:mid], units[mid:]):
            try:
                await self._write([it for unit in half for it in unit])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failed.append((half, e))
        if len(failed) == 2:
            for half, e in failed:
                for it in (it for unit in half for it in unit):
                    if not it.future.done():
                        it.future.set_exception(e)
            return
        for half, e in failed:
            if len(half) > 1:
                log.warning("the writes of %d nodes fail again; halving: %s", len(half), e)
            await self._isolate(half, e)


def utcnow() -> datetime:
    return datetime.now(UTC)
