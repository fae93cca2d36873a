"""Ingest decisions (duplicates, overlaps, gaps), payload checks and the group commit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import zstandard

from edgewise.cloud.ingest import (
    CONFLICT,
    DUPLICATE,
    MAX_ABOVE,
    MAX_DECODED_BYTES,
    NEW,
    GroupCommitter,
    StreamTracker,
    check_payload,
    check_stream_name,
)
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.store import ChunkWrite, MarkWrite, SeqRange, Store, database_url
from edgewise.errors import PeerError, StorageError
from edgewise.sync import codec

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

    async def commit_ingest(self, chunks, gaps=(), marks=()):  # type: ignore[no-untyped-def]
        self.calls.append(len(chunks))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise StorageError("disk full")
        return await super().commit_ingest(chunks, gaps, marks)


def cw(seq: int, count: int = 1) -> ChunkWrite:
    return ChunkWrite("n1", "raw", seq, count, count, False, b"p", NOW)


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
    from edgewise.cloud.app import COMMITTER, CloudConfig, create_app
    from edgewise.cloud.forward import FORWARDERS, data_out_config
    from edgewise.security.pki import CertificateAuthority

    cfg = data_out_config({"forwarders": [
        {"type": "mqtt", "host": "127.0.0.1", "port": 1883, "topic": "t/{node}/{stream}"}]})
    ca = CertificateAuthority.create(tmp_path / "pki")
    app = create_app(CloudConfig(data_dir=tmp_path, data_out=cfg), ca)
    assert app[COMMITTER].after_commit == app[FORWARDERS].forward_committed
    assert create_app(CloudConfig(data_dir=tmp_path), ca)[COMMITTER].after_commit is None
