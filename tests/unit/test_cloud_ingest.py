"""Ingest decisions (duplicates, overlaps, gaps), payload checks and the group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from edgewise.cloud import ingest
from edgewise.cloud.ingest import (
    CONFLICT,
    DUPLICATE,
    INLINE_DECODED_BYTES,
    MAX_ABOVE,
    MAX_DECODED_BYTES,
    NEW,
    GroupCommitter,
    StreamTracker,
    check_payload,
    check_stream_name,
)
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.store import (
    ChunkWrite,
    GapWrite,
    MarkWrite,
    SeqRange,
    Store,
    database_url,
)
from edgewise.errors import PeerError, StorageError
from edgewise.sync import codec

sys.path.insert(0, str(Path(__file__).parents[1]))
import bombs  # tests/bombs.py

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def tracker(contiguous: int, *ranges: tuple[int, int, bool]) -> StreamTracker:
    return StreamTracker(contiguous, [SeqRange(f, c, g) for f, c, g in ranges])


@pytest.mark.parametrize(
    ("seq", "count", "gap", "kind", "reason"),
    [
        (0, 10, False, DUPLICATE, ""),  # wholly below the mark
        (90, 10, False, DUPLICATE, ""),  # ends exactly at the mark
        (95, 10, False, CONFLICT,
         "seq 95..104 straddles the contiguous mark 100 (already settled below it)"),
        (100, 10, False, NEW, ""),  # at the mark
        (110, 10, False, NEW, ""),  # between the mark and a stored range
        (120, 10, False, DUPLICATE, ""),  # exactly a stored range
        (120, 5, False, CONFLICT, "seq 120..124 overlaps 120..129, already stored"),
        (125, 10, False, CONFLICT, "seq 125..134 overlaps 120..129, already stored"),
        (115, 10, False, CONFLICT, "seq 115..124 overlaps 120..129, already stored"),
        (130, 10, False, NEW, ""),  # right after the stored range
        (140, 10, False, CONFLICT,
         "seq 140..149 overlaps 140..149, already declared lost by a gap"),
        (140, 10, True, DUPLICATE, ""),  # the same gap again
        (120, 10, True, CONFLICT, "seq 120..129 overlaps 120..129, already stored"),
        (100, 100, False, CONFLICT, "seq 100..199 overlaps 120..129, already stored"),
        (150, 1, False, NEW, ""),
    ],
)
def test_classify(seq: int, count: int, gap: bool, kind: str, reason: str) -> None:
    t = tracker(100, (120, 10, False), (140, 10, True))
    verdict = t.classify(seq, count, gap=gap)
    assert (verdict.kind, verdict.reason) == (kind, reason)


def test_settle_moves_the_mark_through_out_of_order_ranges() -> None:
    t = StreamTracker()
    t.settle(20, 10)
    t.settle(40, 5, gap=True)
    assert (t.contiguous, t.above) == (0, [SeqRange(20, 10), SeqRange(40, 5, True)])
    t.settle(0, 10)
    assert t.contiguous == 10
    t.settle(10, 10)  # fills the hole: the mark runs through 20..29
    assert (t.contiguous, t.above) == (30, [SeqRange(40, 5, True)])
    t.settle(30, 10)
    assert (t.contiguous, t.above) == (45, [])
    assert t.classify(0, 45).kind == DUPLICATE


def test_too_many_out_of_order_ranges_are_refused() -> None:
    t = StreamTracker(0, [SeqRange(10 + 2 * i, 1) for i in range(MAX_ABOVE)])
    assert t.classify(5, 1).kind == CONFLICT
    assert t.classify(0, 1).kind == NEW  # at the mark: always accepted, it shrinks the list


def test_stream_names() -> None:
    assert check_stream_name("alarms") == "alarms"
    for bad in ("", "x" * 129, "a\nb", 5):
        with pytest.raises(PeerError, match="stream name"):
            check_stream_name(bad)


def test_check_payload() -> None:
    good = codec.encode({"v": np.arange(7, dtype=np.int64)})
    check_payload(good, 7)
    with pytest.raises(PeerError, match="payload holds 7 records, the batch says 8"):
        check_payload(good, 8)
    with pytest.raises(PeerError, match="payload is not a zstd frame"):
        check_payload(b"garbage", 1)
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    with pytest.raises(PeerError, match="does not declare its decompressed size"):
        check_payload(undeclared, 1)
    bomb = zstandard.ZstdCompressor().compress(bytes(MAX_DECODED_BYTES + 1))
    assert len(bomb) < 10_000
    with pytest.raises(PeerError, match=f"decompresses to {MAX_DECODED_BYTES + 1} bytes"):
        check_payload(bomb, 1)
    with pytest.raises(PeerError, match="not a valid Edgewise chunk"):
        check_payload(zstandard.ZstdCompressor().compress(b"\x93\x01\x02\x03"), 1)


class CountingStore(Store):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: list[int] = []
        self.gate: asyncio.Event | None = None
        self.fail_next = False
        self.fail_always = False
        self.refuse: set[str] = set()  # nodes whose chunks the store refuses

    async def commit_ingest(self, chunks, gaps=(), marks=()):  # type: ignore[no-untyped-def]
        self.calls.append(len(chunks))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next or self.fail_always:
            self.fail_next = False
            raise StorageError("disk full")
        bad = sorted({c.node_id for c in chunks} & self.refuse)
        if bad:
            raise StorageError(f"cannot store the chunks of {bad[0]}")
        return await super().commit_ingest(chunks, gaps, marks)


def cw(seq: int, count: int = 1, node: str = "n1") -> ChunkWrite:
    return ChunkWrite(node, "raw", seq, count, count, False, b"p", NOW)


@pytest.fixture
async def store(tmp_path: Path):
    async with CountingStore(database_url(None, tmp_path)) as s:
        yield s


async def test_group_commit_one_transaction_for_a_burst(store: CountingStore) -> None:
    async with GroupCommitter(store, Metrics(), linger=0.005) as gc:
        futures = [gc.submit([cw(i)], marks=[MarkWrite("n1", "raw", i + 1, NOW)])
                   for i in range(20)]
        results = await asyncio.gather(*futures)
    assert store.calls == [20]
    assert all(r.records == 20 for r in results)
    [s] = await store.stream_stats("n1")
    assert (s.contiguous, s.stored_records) == (20, 20)


async def test_futures_resolve_only_after_the_commit(store: CountingStore) -> None:
    store.gate = asyncio.Event()
    async with GroupCommitter(store, Metrics(), linger=0.001) as gc:
        fut = gc.submit([cw(0)])
        await asyncio.sleep(0.05)
        assert store.calls == [1]
        assert not fut.done()  # the commit is still running: no ack may go out
        store.gate.set()
        result = await fut
    assert result.chunks == {("n1", "raw", 0)}


async def test_a_failed_commit_fails_its_group_and_the_committer_goes_on(
        store: CountingStore) -> None:
    store.fail_next = True
    async with GroupCommitter(store, Metrics(), linger=0.001) as gc:
        futures = [gc.submit([cw(0)]), gc.submit([cw(1)])]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert [str(r) for r in results] == ["disk full", "disk full"]
        assert (await gc.submit([cw(0)])).chunks == {("n1", "raw", 0)}
    assert await store.read_chunks("n1", "raw") != []
    with pytest.raises(PeerError, match="not accepting data"):
        gc.submit([cw(5)])


async def test_close_fails_what_is_still_queued(store: CountingStore) -> None:
    store.gate = asyncio.Event()
    gc = GroupCommitter(store, Metrics(), linger=0.001)
    async with gc:
        first = gc.submit([cw(0)])
        await asyncio.sleep(0.02)  # the first group is in its commit, waiting at the gate
        queued = gc.submit([cw(1)])
    for fut in (first, queued):
        with pytest.raises(PeerError, match="shutting down"):
            fut.result()


@pytest.mark.parametrize(
    ("seq", "count", "parts"),
    [
        (0, 100, []),  # all below the mark
        (90, 20, [(100, 10)]),  # clipped at the mark
        (100, 50, [(100, 20), (130, 10)]),  # around the stored range, up to the old gap
        (125, 30, [(130, 10), (150, 5)]),
        (120, 10, []),  # exactly the stored chunk (its ack was lost, then it was evicted)
        (155, 5, [(155, 5)]),
    ],
)
def test_gap_declares_only_what_is_unsettled(seq: int, count: int,
                                             parts: list[tuple[int, int]]) -> None:
    t = tracker(100, (120, 10, False), (140, 10, True))
    assert t.unsettled(seq, count) == parts
    for first, n in parts:
        t.settle(first, n, gap=True)
    assert t.unsettled(seq, count) == []


async def test_after_commit_gets_the_chunks_and_what_was_inserted(store: CountingStore) -> None:
    seen: list[tuple[list[int], set[tuple[str, str, int]]]] = []

    async def after(chunks, inserted):  # type: ignore[no-untyped-def]
        seen.append(([c.seq_first for c in chunks], set(inserted)))

    async with GroupCommitter(store, Metrics(), linger=0.001) as gc:
        gc.after_commit = after
        await gc.submit([cw(0), cw(1)])
        await gc.submit([cw(1)])  # a duplicate: committed again, inserts nothing
    assert seen == [([0, 1], {("n1", "raw", 0), ("n1", "raw", 1)}), ([1], set())]


def test_cloud_config_with_data_out_wires_forwarders_to_the_committer(tmp_path: Path) -> None:
    from edgewise.cloud.app import create_app
    from edgewise.cloud.config import CloudConfig
    from edgewise.cloud.dataout.config import data_out_config
    from edgewise.cloud.dataout.setup import FORWARDERS
    from edgewise.cloud.state import COMMITTER
    from edgewise.security.pki import CertificateAuthority

    cfg = data_out_config({"forwarders": [
        {"type": "mqtt", "host": "127.0.0.1", "port": 1883, "topic": "t/{node}/{stream}"}]})
    ca = CertificateAuthority.create(tmp_path / "pki")
    app = create_app(CloudConfig(data_dir=tmp_path, data_out=cfg), ca)
    assert app[COMMITTER].after_commit == app[FORWARDERS].forward_committed
    assert create_app(CloudConfig(data_dir=tmp_path), ca)[COMMITTER].after_commit is None


# -- one node's writes never fail another's ------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [cw(2**63), cw(2**63 - 1, 2), cw(0, 0), cw(-1),
     ChunkWrite("A", "raw", 0, 1, 2, True, b"p", NOW)],
    ids=["seq 2**63", "seq + count over 2**63 - 1", "count 0", "seq -1", "records > count"],
)
async def test_a_write_that_does_not_fit_the_store_fails_alone(store: CountingStore,
                                                              bad: ChunkWrite) -> None:
    bad = dataclasses.replace(bad, node_id="A")
    async with GroupCommitter(store, Metrics(), linger=0.05) as gc:
        futures = [gc.submit([bad], marks=[MarkWrite("A", "raw", 0, NOW)]),
                   gc.submit([cw(0, 5, "B")], marks=[MarkWrite("B", "raw", 5, NOW)])]
        results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[0], PeerError), results[0]
    assert not isinstance(results[1], BaseException), results[1]
    assert results[1].chunks == {("B", "raw", 0)}
    [s] = await store.stream_stats("B")
    assert (s.contiguous, s.stored_records) == (5, 5)
    assert await store.stream_stats("A") == []
    assert store.calls == [1]  # B's commit only


async def test_a_mark_that_does_not_fit_fails_alone(store: CountingStore) -> None:
    async with GroupCommitter(store, Metrics(), linger=0.01) as gc:
        bad = gc.submit(marks=[MarkWrite("A", "raw", 2**63, NOW)])
        good = gc.submit([cw(0, 1, "B")], marks=[MarkWrite("B", "raw", 1, NOW)])
        with pytest.raises(PeerError, match="mark 9223372036854775808 of A/raw"):
            await bad
        assert (await good).chunks == {("B", "raw", 0)}


async def test_a_write_the_store_refuses_fails_only_its_node(store: CountingStore) -> None:
    store.refuse = {"n5"}
    nodes = [f"n{i}" for i in range(16)]
    async with GroupCommitter(store, Metrics(), linger=0.05) as gc:
        futures = [gc.submit([cw(0, 1, n), cw(1, 1, n)], marks=[MarkWrite(n, "raw", 2, NOW)])
                   for n in nodes]
        futures.append(gc.submit())  # a duplicate's ack, nothing to write
        results = await asyncio.gather(*futures, return_exceptions=True)
    assert [str(r) for r in results[:16] if isinstance(r, BaseException)] == [
        "cannot store the chunks of n5"]
    assert not isinstance(results[16], BaseException)
    stored = {s.node_id: s.contiguous for s in await store.stream_stats()}
    assert stored == {n: 2 for n in nodes if n != "n5"}
    # one group commit, then halves down to n5: at most 2 * log2(16) more
    assert len(store.calls) <= 1 + 2 * 4, store.calls


async def test_when_every_half_fails_everything_fails_without_more_attempts(
        store: CountingStore) -> None:
    store.fail_always = True
    async with GroupCommitter(store, Metrics(), linger=0.05) as gc:
        futures = [gc.submit([cw(0, 1, f"n{i}")]) for i in range(64)]
        results = await asyncio.gather(*futures, return_exceptions=True)
    assert {str(r) for r in results} == {"disk full"}
    assert len(store.calls) == 3  # the group, then its two halves: the database is down


async def test_writes_after_a_failed_write_fail_too(store: CountingStore) -> None:
    """A session submits each write after the one before: if a chunk is not stored, no later
    write of the session may store its mark past it (the node would drop the chunk)."""
    store.refuse = {"A"}
    async with GroupCommitter(store, Metrics(), linger=0.001) as gc:
        first = gc.submit([cw(0, 1, "A")], marks=[MarkWrite("A", "raw", 1, NOW)])
        await asyncio.sleep(0.05)  # the first commit is over
        store.refuse = set()
        second = gc.submit(gaps=[GapWrite("A", "raw", 1, 1, "lost", NOW)],
                           marks=[MarkWrite("A", "raw", 2, NOW)], after=first)
        with pytest.raises(StorageError):
            await first
        with pytest.raises(PeerError, match="an earlier write of this session failed"):
            await second
        third = gc.submit([cw(0, 1, "A")], marks=[MarkWrite("A", "raw", 1, NOW)])
        assert (await third).chunks == {("A", "raw", 0)}  # a new session starts afresh
    [s] = await store.stream_stats("A")
    assert s.contiguous == 1


# -- payload checks: bounded memory, off the event loop ------------------------------------------

MB = 1024 * 1024


@pytest.mark.parametrize(
    ("make", "records", "ok"),
    [(lambda: bombs.empty_arrays(8 * MB), 1, False),
     (lambda: bombs.empty_arrays_in_a_column(1_000_000), 1_000_000, True),
     (lambda: bombs.nones(1_000_000, 2), 1_000_000, True),
     (lambda: bombs.text_table(1_000_000), 1_000_000, False)],
    ids=["empty arrays", "empty arrays in an any column", "any columns of None",
         "text table"],
)
def test_checking_a_payload_keeps_memory_small(make: Any, records: int, ok: bool) -> None:
    payload = make()
    tracemalloc.start()
    try:
        try:
            check_payload(payload, records)
            accepted = True
        except PeerError:
            accepted = False
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert accepted == ok
    assert peak < 4 * MB, peak  # decoded whole, as before: 70-500 MB


async def test_payloads_are_checked_off_the_event_loop_unless_small(
        monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[bool] = []
    running = [0, 0]  # now, most at once
    real = ingest.check_payload

    def spy(payload: bytes, records: int) -> None:
        threads.append(threading.current_thread() is threading.main_thread())
        running[0] += 1
        running[1] = max(running)
        try:
            time.sleep(0.05)
            real(payload, records)
        finally:
            running[0] -= 1

    monkeypatch.setattr(ingest, "check_payload", spy)
    small = codec.encode({"v": np.arange(10, dtype=np.int64)})
    await ingest.check_payload_async(small, 10)
    assert threads == [True]  # declares a few bytes: cheap, checked inline
    bomb = bombs.empty_arrays(64 * MB)  # 2 KB on the wire, declares 64 MiB
    assert len(bomb) < INLINE_DECODED_BYTES
    with pytest.raises(PeerError):
        await ingest.check_payload_async(bomb, 1)
    assert threads == [True, False]  # what it declares decides, not its size on the wire
    slots = asyncio.Semaphore(2)
    results = await asyncio.gather(
        *(ingest.check_payload_async(bomb, 1, slots) for _ in range(6)),
        return_exceptions=True)
    assert all(isinstance(r, PeerError) for r in results)
    assert threads[2:] == [False] * 6 and running[1] == 2  # worker threads, two at a time


async def test_a_cancelled_check_keeps_its_slot_until_its_thread_is_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(ingest, "check_payload", lambda payload, records: release.wait(5))
    slots = asyncio.Semaphore(1)
    bomb = bombs.empty_arrays(64 * MB)
    task = asyncio.create_task(ingest.check_payload_async(bomb, 1, slots))
    await asyncio.sleep(0.05)
    task.cancel()  # e.g. the session ends; the thread goes on
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots.locked()  # still taken: the thread is still checking
    release.set()
    await asyncio.wait_for(slots.acquire(), 5)
