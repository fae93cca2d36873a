"""Uplink building blocks: full-jitter backoff, interval sets and gaps, the ledger, the two
send lanes (control before data), the window, chunk order from a real outbox (alarms first),
wire byte counting on a real socket, and the outbox hand-over between engine and uplink."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgewise.common.backoff import Backoff
from edgewise.edge.flow import Lanes, Sent, Window
from edgewise.edge.frames import MAX_PAYLOAD, take
from edgewise.edge.ledger import IntervalSet, Ledger, uncovered
from edgewise.edge.wire import tcp_bytes
from edgewise.errors import ConfigError, StorageError
from edgewise.outbox import Outbox, PendingChunk
from edgewise.outbox.view import OutboxSnapshot, StreamRow
from edgewise.outbox.view import PendingChunk as Pending
from edgewise.sync import protocol as P

# -- backoff --------------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_from_base_up_to_the_cap() -> None:
    b = Backoff(0.5, 30.0)
    assert [b.ceiling(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert b.ceiling(10_000) == 30.0  # no overflow for a node offline for weeks
    assert b.delay(4, rng=lambda: 1.0) == 4.0
    assert b.delay(4, rng=lambda: 0.0) == 0.0


def test_backoff_is_full_jitter_uniform_between_zero_and_the_ceiling() -> None:
    b = Backoff(0.5, 30.0)
    rng = random.Random(7)
    for attempt, ceiling in ((1, 0.5), (3, 2.0), (20, 30.0)):
        draws = [b.delay(attempt, rng.random) for _ in range(20_000)]
        assert min(draws) >= 0.0 and max(draws) <= ceiling
        assert min(draws) < 0.01 * ceiling and max(draws) > 0.99 * ceiling  # the whole range
        assert statistics.fmean(draws) == pytest.approx(ceiling / 2, rel=0.02)


@pytest.mark.parametrize("base, cap", [(0, 1), (-1, 1), (2, 1)])
def test_backoff_rejects_bad_settings(base: float, cap: float) -> None:
    with pytest.raises(ConfigError, match="0 < base <= cap"):
        Backoff(base, cap)


# -- intervals and gaps ---------------------------------------------------------------------------


def test_interval_set_merges_covers_and_trims() -> None:
    s = IntervalSet()
    for a, b in [(10, 20), (30, 40), (20, 25), (0, 5), (24, 31), (50, 50)]:
        s.add(a, b)
    assert list(s) == [(0, 5), (10, 40)]
    assert s.covers(12, 40) and s.covers(0, 5) and not s.covers(4, 11) and not s.covers(40, 41)
    s.trim_below(12)
    assert list(s) == [(12, 40)]
    s.trim_below(100)
    assert list(s) == []


def test_uncovered_parts_of_a_range() -> None:
    assert uncovered(0, 100, []) == [(0, 100)]
    assert uncovered(0, 100, [(10, 20), (15, 30), (50, 60), (90, 200)]) == [
        (0, 10), (30, 50), (60, 90)]
    assert uncovered(20, 40, [(0, 25), (35, 36)]) == [(25, 35), (36, 40)]
    assert uncovered(5, 5, []) == []


def snapshot(next_seq: dict[str, int], chunks: list[tuple[int, str, int, int]]) -> OutboxSnapshot:
    return OutboxSnapshot(
        {s: StreamRow(5, n, n, 0, 0, 0) for s, n in next_seq.items()},
        [Pending(cid, s, first, count, count) for cid, s, first, count in chunks],
    )


def test_ledger_keeps_the_highest_numbers_the_cloud_may_have_heard_of() -> None:
    ledger = Ledger("node-1")
    assert ledger.record_sent("a", 0, 10) and ledger.record_sent("a", 10, 10)
    assert not ledger.record_sent("a", 5, 10)  # below the highest: nothing to save
    assert ledger.record_gap("a", 30, 5) and not ledger.record_gap("a", 0, 3)
    assert ledger.record_gap("b", 0, 3)
    ledger.trim({"a": 12, "c": 7})  # the cloud's marks count too
    back = Ledger.from_bytes(ledger.to_bytes())
    assert back.node == "node-1"
    assert back.floors() == {"a": 35, "b": 3, "c": 7}
    assert back.marks == {"a": 12, "c": 7}
    with pytest.raises(StorageError, match="ledger is unreadable"):
        Ledger.from_bytes(b"\x93garbage")


def test_a_ledger_of_the_earlier_format_reads_as_its_highest_numbers() -> None:
    import msgpack

    old = msgpack.packb({"format": 1, "sent": {"a": [[0, 20], [30, 40]]},
                         "gaps": {"a": [[45, 5]], "b": [[0, 3]]}})
    back = Ledger.from_bytes(old)
    assert back.node is None and back.floors() == {"a": 50, "b": 3}


# -- lanes and window -----------------------------------------------------------------------------


async def test_control_frames_always_go_before_data_frames() -> None:
    lanes = Lanes()
    for i in range(3):
        lanes.put_data(b"d%d" % i)
    lanes.put_control(b"c0")
    got = [await lanes.get(), await lanes.get()]
    lanes.put_control(b"c1")  # queued behind two data frames: still goes first
    got += [await lanes.get() for _ in range(3)]
    assert got == [(b"c0", True), (b"d0", False), (b"c1", True), (b"d1", False),
                   (b"d2", False)]
    waiter = asyncio.create_task(lanes.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    lanes.put_data(b"late")
    assert await asyncio.wait_for(waiter, 1) == (b"late", False)


async def test_window_bounds_bytes_and_chunks_and_refills_in_bulk() -> None:
    w = Window(max_bytes=1000, max_chunks=3)
    w.add(1, Sent("s", 0, 1, 1, 600))
    assert not w.full and w.room() == 400
    w.add(2, Sent("s", 1, 1, 1, 500))
    assert w.full and w.bytes == 1100
    waiter = asyncio.create_task(w.wait_room())
    await asyncio.sleep(0)
    assert w.release(2) is not None and w.bytes == 600
    await asyncio.sleep(0)
    assert waiter.done()  # 400 free >= a quarter of 1000
    w.add(3, Sent("s", 2, 1, 1, 200))  # 200 free: below the refill mark
    waiter = asyncio.create_task(w.wait_room())
    await asyncio.sleep(0)
    assert not waiter.done()
    w.release(3)
    await asyncio.wait_for(waiter, 1)
    for i in range(4, 6):
        w.add(i, Sent("s", i, 1, 1, 1))
    assert len(w.chunks) == 3 and w.full  # bounded by count too
    assert w.release(99) is None
    with pytest.raises(ConfigError):
        Window(0, 1)


# -- chunks from a real outbox --------------------------------------------------------------------


def _cols(n: int) -> dict[str, np.ndarray]:
    return {"sensor": np.array(["s1"] * n, dtype=object), "ts": np.arange(n, dtype=float),
            "value": np.full(n, 1.5)}


def test_take_sends_alarms_before_aggregates_oldest_first_and_encodes_batches(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "o.db", sync="normal") as ob:
        ob.register_stream("aggregates", 5)
        ob.register_stream("alarms", 9)
        for _ in range(3):
            ob.commit([PendingChunk("aggregates", _cols(4), 4)])
        ob.commit([PendingChunk("alarms", _cols(2), 2)])
        ob.commit([PendingChunk("aggregates", _cols(4), 4), PendingChunk("alarms", _cols(1), 1)])
        taken = take(ob, 1 << 20, set())
        order = [(c.stream, c.seq_first) for c, _ in taken]
        assert order == [("alarms", 0), ("alarms", 2), ("aggregates", 0), ("aggregates", 4),
                         ("aggregates", 8), ("aggregates", 12)]
        msg = P.decode(taken[0][1])
        assert msg == {"t": "batch", "id": taken[0][0].id, "stream": "alarms", "seq": 0,
                       "count": 2, "records": 2, "compacted": False,
                       "payload": taken[0][0].payload}
        # in-flight chunks are skipped; the byte budget stops after the first chunk over it
        exclude = {c.id for c, _ in taken[:3]}
        rest = take(ob, 1, exclude)
        assert [(c.stream, c.seq_first) for c, _ in rest] == [("aggregates", 4)]


def test_take_marks_a_chunk_too_large_for_one_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 700_000
    cols = {"value": rng.random(n)}  # incompressible float64
    with Outbox(tmp_path / "o.db", sync="normal") as ob:
        ob.register_stream("raw", 1)
        ob.commit([PendingChunk("raw", cols, n)])
        [(chunk, frame)] = take(ob, 1 << 30, set())
    assert len(chunk.payload) > MAX_PAYLOAD and frame is None


# -- bytes on the wire ----------------------------------------------------------------------------


def test_tcp_bytes_counts_payload_sent_and_received() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    try:
        cli.sendall(b"x" * 12_345)
        got = 0
        while got < 12_345:
            got += len(peer.recv(65536))
        peer.sendall(b"y" * 777)
        assert cli.recv(1000) == b"y" * 777
        counted = tcp_bytes(cli)
        if counted is None:
            pytest.skip("TCP_INFO is Linux only")
        for _ in range(100):  # the last ACK may trail the data by a moment
            counted = tcp_bytes(cli)
            if counted == (12_345, 777):
                break
            import time

            time.sleep(0.01)
        assert counted == (12_345, 777)
    finally:
        for s in (cli, peer, srv):
            s.close()


# -- gaps: every eviction reaches the cloud, chunks in flight included (finding 10) ---------------


def _evict_all_but_the_newest(ob: Outbox, newest: PendingChunk) -> None:
    """Shrink the bound so that only ``newest`` fits, then commit it: the older chunks of its
    priority are evicted."""
    from edgewise.sync import codec

    if hasattr(ob, "capacity"):  # the bound is bytes on disk: find the one that fits it
        from edgewise.outbox.disk import row_cost

        need = row_cost(len(codec.encode(newest.columns)))
        lo, hi = 0, 1 << 34
        while lo < hi:
            mid = (lo + hi) // 2
            ob.max_bytes = mid
            if ob.capacity() >= need:
                hi = mid
            else:
                lo = mid + 1
        ob.configure(lo, "normal")
    else:  # an outbox whose bound counts payload bytes only
        ob.configure(len(codec.encode(newest.columns)), "normal")
    report = ob.commit([newest])
    assert report.chunks == 1 and report.dropped


async def queued_gaps(lanes: Lanes) -> list[tuple[str, int, int, str]]:
    """The ``gap`` frames queued on a session's lanes (stream, seq, count, reason)."""
    gaps = []
    while lanes._data:
        frame, _ = await lanes.get()
        msg = P.decode(frame)
        if msg["t"] == P.GAP:
            gaps.append((msg["stream"], msg["seq"], msg["count"], msg["reason"]))
    return gaps


@contextlib.asynccontextmanager
async def running_transfer(ob: Outbox, tmp_path: Path) -> AsyncIterator[Any]:
    """A `Transfer` on ``ob`` with its acker running (cancelled on exit)."""
    from edgewise.edge.transfer import Transfer
    from edgewise.edge.uplink_store import UplinkStore

    transfer = Transfer(ob, UplinkStore(tmp_path / "uplink"), 0.01)
    acker = transfer.start_acker()
    try:
        yield transfer
    finally:
        acker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acker


async def test_chunks_evicted_while_in_flight_are_reported_as_gaps(tmp_path: Path) -> None:
    """Five chunks are sent, the link dies before any ack, the outbox evicts them: the next
    session reports all five ranges as lost (the cloud keeps whatever of them it stored)."""
    from edgewise.outbox.view import OutboxView

    with Outbox(tmp_path / "o.db", sync="normal") as ob, OutboxView(ob.path) as view:
        ob.register_stream("raw", 1)
        for i in range(5):
            ob.commit([PendingChunk("raw", _cols(100 + i), 100)])
        async with running_transfer(ob, tmp_path) as transfer:
            await transfer.welcome({"raw": 0}, view.snapshot())
            window, lanes = transfer.begin(1 << 20, 512)
            feeder = asyncio.create_task(transfer.feeder(window, lanes))
            for _ in range(200):
                if len(window.chunks) == 5:
                    break
                await asyncio.sleep(0.01)
            feeder.cancel()
            with pytest.raises(asyncio.CancelledError):
                await feeder
            assert len(window.chunks) == 5  # sent, in flight; then the link dies, no ack
            transfer.end()
            _evict_all_but_the_newest(ob, PendingChunk("raw", _cols(200), 200))
            # the next session: the cloud's mark is still 0
            await transfer.welcome({"raw": 0}, view.snapshot())
            window, lanes = transfer.begin(1 << 20, 512)
            await transfer.report_gaps(view.snapshot())
            gaps = await queued_gaps(lanes)
    assert gaps == [("raw", 0, 500, "dropped: outbox full")]


async def test_a_drop_committed_after_the_snapshot_is_still_reported(tmp_path: Path) -> None:
    """The outbox counts a drop before its transaction commits: a snapshot read at that moment
    misses the lost range. The uplink must look again on its next tick instead of taking the
    count as reported (seen as a hole of one chunk, neither stored nor a gap, in a full run)."""
    from edgewise.outbox.view import OutboxView

    with Outbox(tmp_path / "o.db", sync="normal") as ob, OutboxView(ob.path) as view:
        ob.register_stream("raw", 1)
        for i in range(3):
            ob.commit([PendingChunk("raw", _cols(100 + i), 100)])
        async with running_transfer(ob, tmp_path) as transfer:
            await transfer.welcome({"raw": 0}, view.snapshot())
            _window, lanes = transfer.begin(1 << 20, 512)
            await transfer.report_new_gaps(lambda: asyncio.to_thread(view.snapshot, True),
                                           force=True)  # the session's start: nothing lost
            stale = view.snapshot(True)  # read before the eviction commits
            _evict_all_but_the_newest(ob, PendingChunk("raw", _cols(200), 200))
            assert sum(s.dropped for s in ob.stats().values()) == 300

            async def stale_then_fresh() -> OutboxSnapshot:
                nonlocal stale
                snap, stale = stale, None
                return snap if snap is not None else view.snapshot(True)

            for _ in range(3):  # three ticks
                await transfer.report_new_gaps(stale_then_fresh)
            gaps = await queued_gaps(lanes)
    assert gaps == [("raw", 0, 300, "dropped: outbox full")]


async def test_a_refused_chunk_id_of_an_earlier_outbox_file_does_not_hold_back_a_new_chunk(
        tmp_path: Path) -> None:
    """Chunk ids start at 1 again in a new outbox file (quarantined, moved away): a chunk id
    refused in the old file must not keep the new file's chunk of that id from being sent."""
    from edgewise.edge.uplink_store import UplinkStore

    store = UplinkStore(tmp_path / "uplink")
    await store.refuse(1, Sent("alarms", 500, 10, 10, 99), "refused by the test")
    await store.refuse(2, Sent("raw", 40, 10, 10, 99), "refused by the test")
    again = UplinkStore(tmp_path / "uplink")  # read back from refused.json
    assert set(again.refused) == {1, 2}
    again.prune_refused({1: ("alarms", 0), 2: ("raw", 40)})  # 1 is another chunk now
    assert set(again.refused) == {2}
