"""Uplink building blocks: full-jitter backoff, interval sets and gaps, the ledger, the two
send lanes (control before data), the window, chunk order from a real outbox (alarms first),
wire byte counting on a real socket, and the outbox hand-over between engine and uplink."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
from pathlib import Path

import numpy as np
import pytest

from edgewise.edge.backoff import Backoff
from edgewise.edge.flow import Lanes, Sent, Window
from edgewise.edge.ledger import IntervalSet, Ledger, find_gaps, uncovered
from edgewise.edge.outbox import Outbox, PendingChunk
from edgewise.edge.outbox_access import OutboxAccess
from edgewise.edge.status import OutboxSnapshot, StreamRow
from edgewise.edge.status import PendingChunk as Pending
from edgewise.edge.uplink import MAX_PAYLOAD, _take
from edgewise.edge.wire import tcp_bytes
from edgewise.errors import ConfigError, StorageError
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


def test_gaps_are_what_is_neither_pending_nor_sent_nor_reported_above_the_mark() -> None:
    snap = snapshot({"a": 100, "b": 50}, [(7, "a", 60, 20), (8, "a", 90, 10)])
    ledger = Ledger()
    ledger.record_sent("a", 10, 20)  # sent: may be stored above the mark
    ledger.record_gap("a", 40, 5)  # reported already
    gaps = find_gaps(snap, {"a": 5}, ledger.covered())
    assert gaps == [("a", 5, 5), ("a", 30, 10), ("a", 45, 15), ("a", 80, 10), ("b", 0, 50)]


def test_ledger_round_trip_trim_and_gaps_to_send_again() -> None:
    ledger = Ledger()
    assert ledger.record_sent("a", 0, 10) and ledger.record_sent("a", 10, 10)
    assert not ledger.record_sent("a", 5, 10)  # covered: nothing to save
    ledger.record_gap("a", 30, 5)
    ledger.record_gap("a", 40, 5)
    ledger.record_gap("b", 0, 3)
    back = Ledger.from_bytes(ledger.to_bytes())
    assert {k: list(v) for k, v in back.sent.items()} == {"a": [(0, 20)]}
    assert back.gaps == {"a": [(30, 5), (40, 5)], "b": [(0, 3)]}
    back.trim({"a": 35, "b": 3})
    assert back.gaps_above({"a": 35, "b": 3}) == [("a", 40, 5)]
    assert list(back.sent["a"]) == []
    with pytest.raises(StorageError, match="ledger is unreadable"):
        Ledger.from_bytes(b"\x93garbage")


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
        taken = _take(ob, 1 << 20, set())
        order = [(c.stream, c.seq_first) for c, _ in taken]
        assert order == [("alarms", 0), ("alarms", 2), ("aggregates", 0), ("aggregates", 4),
                         ("aggregates", 8), ("aggregates", 12)]
        msg = P.decode(taken[0][1])
        assert msg == {"t": "batch", "id": taken[0][0].id, "stream": "alarms", "seq": 0,
                       "count": 2, "records": 2, "compacted": False,
                       "payload": taken[0][0].payload}
        # in-flight chunks are skipped; the byte budget stops after the first chunk over it
        exclude = {c.id for c, _ in taken[:3]}
        rest = _take(ob, 1, exclude)
        assert [(c.stream, c.seq_first) for c, _ in rest] == [("aggregates", 4)]


def test_take_marks_a_chunk_too_large_for_one_frame(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 700_000
    cols = {"value": rng.random(n)}  # incompressible float64
    with Outbox(tmp_path / "o.db", sync="normal") as ob:
        ob.register_stream("raw", 1)
        ob.commit([PendingChunk("raw", cols, n)])
        [(chunk, frame)] = _take(ob, 1 << 30, set())
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


# -- outbox hand-over -----------------------------------------------------------------------------


async def test_outbox_access_waits_for_an_outbox_and_survives_one_closed_under_it(
    tmp_path: Path,
) -> None:
    access = OutboxAccess()
    first = Outbox(tmp_path / "o.db", sync="normal").open()
    call = asyncio.create_task(access.call(lambda ob: ob.stats()))
    await asyncio.sleep(0.05)
    assert not call.done()  # nothing published yet
    await access.publish(first)
    assert await asyncio.wait_for(call, 1) == {}
    first.close()  # the engine closed it by itself
    call = asyncio.create_task(access.call(lambda ob: ob.peek()))
    await asyncio.sleep(0.05)
    assert not call.done() and access.current() is None  # withdrawn, waiting for the next
    with Outbox(tmp_path / "o.db", sync="normal") as second:
        await access.publish(second)
        assert await asyncio.wait_for(call, 1) == []
        await access.withdraw()
        assert access.current() is None
