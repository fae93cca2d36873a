"""The outbox: group commit with the checkpoint, priorities, bounds, compaction, ack, reopen."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edgewise.errors import StorageError
from edgewise.outbox import Outbox, PendingChunk
from edgewise.outbox import store as outbox_mod
from edgewise.outbox.disk import row_cost
from edgewise.outbox.policy import Eviction, StoredChunk, choose_evictions
from edgewise.outbox.store import compact_columns
from edgewise.pipeline.component import DeadLetter
from edgewise.sync import codec


def raw(n: int, sensors: int = 4, seed: int = 0, t0: float = 1000.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = np.empty(n, dtype=object)
    names[:] = [f"s{i % sensors}" for i in range(n)]
    return {
        "sensor": names,
        "ts": t0 + np.arange(n) / 10,
        "value": np.round(rng.uniform(0, 100, n), 2),
    }


def chunk(stream: str, cols: dict[str, np.ndarray]) -> PendingChunk:
    return PendingChunk(stream, cols, len(next(iter(cols.values()))))


def letter(i: int) -> DeadLetter:
    return DeadLetter("src", f"line {i}: bad", b"x" * i, i)


def seq_ranges(ob: Outbox, stream: str) -> list[tuple[int, int]]:
    return ob.db.execute(
        "SELECT seq_first, seq_count FROM chunks WHERE stream=? ORDER BY seq_first", (stream,)
    ).fetchall()


@pytest.fixture
def ob(tmp_path: Path):
    with Outbox(tmp_path / "outbox.db") as o:
        o.register_stream("alarms", 9)
        o.register_stream("agg", 5)
        o.register_stream("bulk", 1)
        yield o


def test_group_commit_writes_chunks_dead_letters_and_checkpoint_together(ob: Outbox) -> None:
    report = ob.commit(
        [chunk("agg", raw(100)), chunk("alarms", raw(3, seed=1))],
        [letter(1), letter(2)],
        {"engine": b"state-1"},
    )
    assert (report.chunks, report.records, report.dead_letters) == (2, 103, 2)
    assert report.bytes == len(codec.encode(raw(100))) + len(codec.encode(raw(3, seed=1)))
    assert ob.load_checkpoint() == {"engine": b"state-1"}
    assert [d["reason"] for d in ob.dead_letters()] == ["line 2: bad", "line 1: bad"]
    assert ob.dead_letter_count == 2
    got = ob.read_stream("agg")
    for k, v in raw(100).items():
        assert got[k].tolist() == v.tolist()
    st = ob.stats()
    agg = st["agg"]
    assert (agg.produced, agg.pending_records, agg.pending_chunks) == (100, 100, 1)
    assert (st["alarms"].produced, st["alarms"].pending_records) == (3, 3)
    assert ob.used_bytes == report.bytes

    ob.commit([chunk("agg", raw(50, seed=2))], None, {"engine": b"state-2"})
    assert seq_ranges(ob, "agg") == [(0, 100), (100, 50)]
    assert ob.load_checkpoint() == {"engine": b"state-2"}


def test_a_failed_commit_leaves_nothing_behind(ob: Outbox) -> None:
    ob.commit([chunk("agg", raw(10))], [letter(1)], {"engine": b"good"})
    before = ob.stats()
    used = ob.used_bytes
    # the checkpoint value violates NOT NULL: the transaction fails after the chunks went in
    with pytest.raises(StorageError, match="outbox commit failed"):
        ob.commit([chunk("agg", raw(20)), chunk("alarms", raw(2))], [letter(2)], {"engine": None})
    assert ob.load_checkpoint() == {"engine": b"good"}
    assert seq_ranges(ob, "agg") == [(0, 10)] and seq_ranges(ob, "alarms") == []
    assert ob.dead_letter_count == 1 and len(ob.dead_letters()) == 1
    assert ob.stats() == before and ob.used_bytes == used
    # and the next commit carries on from the same sequence numbers
    ob.commit([chunk("agg", raw(5))], None, {"engine": b"next"})
    assert seq_ranges(ob, "agg") == [(0, 10), (10, 5)]


def test_commit_on_a_closed_outbox_raises_storage_error(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db").open()
    ob.register_stream("agg", 5)
    ob.close()
    with pytest.raises(StorageError, match="outbox is not open"):
        ob.commit([chunk("agg", raw(10))])


def test_commit_when_the_database_is_gone_raises_storage_error(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db").open()
    ob.register_stream("agg", 5)
    ob.db.close()  # the connection dies underneath (as on an I/O error)
    with pytest.raises(StorageError, match="outbox commit failed"):
        ob.commit([chunk("agg", raw(10))], None, {"engine": b"x"})
    with pytest.raises(StorageError):
        ob.ack([1])


def test_unregistered_stream_is_refused(ob: Outbox) -> None:
    with pytest.raises(StorageError, match="stream 'nope' is not registered"):
        ob.commit([chunk("nope", raw(3))])


def test_peek_gives_alarms_first_then_oldest_first(ob: Outbox) -> None:
    ob.commit([chunk("bulk", raw(10))])
    ob.commit([chunk("agg", raw(10))])
    ob.commit([chunk("alarms", raw(2))])
    ob.commit([chunk("agg", raw(10, seed=3))])
    ob.commit([chunk("alarms", raw(2, seed=4))])
    got = [(c.stream, c.seq_first) for c in ob.peek()]
    assert got == [("alarms", 0), ("alarms", 2), ("agg", 0), ("agg", 10), ("bulk", 0)]
    first = ob.peek()[0]
    assert codec.decode(first.payload)["value"].tolist() == raw(2)["value"].tolist()
    # a byte budget stops after the chunk that no longer fits (but always gives one)
    size = len(first.payload)
    assert [c.stream for c in ob.peek(max_bytes=1)] == ["alarms"]
    assert len(ob.peek(max_bytes=2 * size)) == 2
    assert [c.stream for c in ob.peek(exclude={first.id})][:2] == ["alarms", "agg"]


def test_ack_deletes_and_counts(ob: Outbox) -> None:
    ob.commit([chunk("agg", raw(100)), chunk("alarms", raw(3))])
    ob.commit([chunk("agg", raw(50))])
    chunks = {(c.stream, c.seq_first): c for c in ob.peek()}
    assert ob.ack([chunks[("agg", 0)].id, chunks[("alarms", 0)].id]) == 103
    assert ob.ack([chunks[("agg", 0)].id]) == 0  # twice: nothing more
    assert ob.ack([]) == 0
    st = ob.stats()
    assert (st["agg"].acked, st["agg"].pending_records, st["agg"].pending_chunks) == (100, 50, 1)
    assert (st["alarms"].acked, st["alarms"].pending_records) == (3, 0)
    assert ob.used_bytes == len(codec.encode(raw(50)))
    assert [(c.stream, c.seq_first) for c in ob.peek()] == [("agg", 100)]


def test_reopen_restores_counters_and_sequence_numbers(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        ob.register_stream("agg", 5)
        ob.commit([chunk("agg", raw(100))], [letter(1)], {"engine": b"s"})
        ob.commit([chunk("agg", raw(40))])
        ob.ack([ob.peek()[0].id])
        stats, used = ob.stats(), ob.used_bytes
    with Outbox(path) as ob:
        assert ob.stats() == stats and ob.used_bytes == used
        assert ob.dead_letter_count == 1
        assert ob.load_checkpoint() == {"engine": b"s"}
        ob.register_stream("agg", 5)  # as the engine does on every start
        ob.commit([chunk("agg", raw(7))])
        assert seq_ranges(ob, "agg") == [(100, 40), (140, 7)]
        st = ob.stats()["agg"]
        assert (st.produced, st.acked, st.pending_records) == (147, 100, 47)
    with pytest.raises(StorageError, match="already open"):
        o = Outbox(path).open()
        try:
            o.open()
        finally:
            o.close()


def bound(ob: Outbox, room: int) -> None:
    """Configure the smallest bound (bytes on disk) that leaves the chunks ``room`` bytes."""
    lo, hi = 0, 1 << 34
    while lo < hi:
        mid = (lo + hi) // 2
        ob.max_bytes = mid
        if ob.capacity() >= room:
            hi = mid
        else:
            lo = mid + 1
    ob.configure(lo, ob.sync)


def test_full_outbox_drops_lowest_priority_oldest_first(tmp_path: Path) -> None:
    cols = raw(3000)
    cost = row_cost(len(codec.encode(cols)))
    with Outbox(tmp_path / "o.db") as ob:
        for name, prio in (("alarms", 9), ("agg", 5), ("bulk", 1)):
            ob.register_stream(name, prio)
        reports = [ob.commit([chunk(s, cols)]) for s in ("bulk", "bulk", "bulk")]
        bound(ob, 3 * cost + cost // 2)  # measured with three chunks in: full now
        reports += [ob.commit([chunk(s, cols)]) for s in (
            "agg",  # drops bulk 0
            "alarms",  # drops bulk 3000
            "alarms",  # drops bulk 6000
            "alarms",  # drops agg 0: the lowest priority left
            "agg",  # nothing of lower or equal priority to drop: the newcomer goes
            "alarms",  # alarms only give way to alarms: drops the oldest alarm
        )]
        assert [r.dropped for r in reports] == [
            {}, {}, {}, {"bulk": 3000}, {"bulk": 3000}, {"bulk": 3000}, {"agg": 3000},
            {"agg": 3000}, {"alarms": 3000},
        ]
        st = ob.stats()
        assert {k: v.dropped for k, v in st.items()} == {
            "alarms": 3000, "agg": 6000, "bulk": 9000}
        assert {k: v.produced for k, v in st.items()} == {
            "alarms": 12000, "agg": 6000, "bulk": 9000}
        assert [(c.stream, c.seq_first) for c in ob.peek(1 << 30)] == [
            ("alarms", 3000), ("alarms", 6000), ("alarms", 9000)
        ]
        assert ob.chunk_bytes == 3 * cost <= ob.capacity()
        # the dropped newcomer still used its sequence numbers, and every range dropped is
        # recorded with its reason, for the uplink to report as a gap
        assert ob.db.execute("SELECT next_seq FROM streams WHERE stream='agg'").fetchone() == (
            6000,
        )
        lost = [(r.stream, r.seq_first, r.seq_count, r.reason) for r in ob.lost_ranges()]
        assert lost == [("bulk", 0, 9000, "dropped: outbox full"),
                        ("agg", 0, 6000, "dropped: outbox full"),  # merged: adjacent
                        ("alarms", 0, 3000, "dropped: outbox full")]
        # a chunk larger than the whole outbox is refused, nothing else is touched
        big = raw(60_000, seed=9)
        r = ob.commit([chunk("alarms", big)])
        assert r.dropped == {"alarms": 60_000} and r.chunks == 0
        assert len(ob.peek(1 << 30)) == 3
    with Outbox(tmp_path / "o.db") as ob:  # the counts survive a restart
        assert {k: v.dropped for k, v in ob.stats().items()} == {
            "alarms": 63000, "agg": 6000, "bulk": 9000
        }
        assert [(r.stream, r.seq_first, r.seq_count) for r in ob.lost_ranges()][-1] == (
            "alarms", 12000, 60_000)


def test_full_outbox_compacts_raw_chunks_into_aggregates(tmp_path: Path) -> None:
    a, b, c = raw(3000, seed=1), raw(3000, seed=2), raw(3000, seed=3)
    cost = max(row_cost(len(codec.encode(x))) for x in (a, b, c))
    with Outbox(tmp_path / "o.db") as ob:
        ob.register_stream("raw", 3, compact=True)
        ob.commit([chunk("raw", a)])
        ob.commit([chunk("raw", b)])
        bound(ob, 2 * cost + cost // 2)  # measured with two chunks in
        report = ob.commit([chunk("raw", c)])
        assert report.compacted == {"raw": 3000} and report.dropped == {}
        st = ob.stats()["raw"]
        assert (st.produced, st.compacted, st.dropped) == (9000, 3000, 0)
        assert (st.pending_records, st.pending_chunks) == (4 + 6000, 3)
        rows = ob.db.execute(
            "SELECT seq_first, seq_count, records, compacted FROM chunks ORDER BY seq_first"
        ).fetchall()
        assert rows == [(0, 3000, 4, 1), (3000, 3000, 3000, 0), (6000, 3000, 3000, 0)]
        assert ob.lost_ranges() == []  # compacted records are not lost: the chunk is sent
        first = next(ch for ch in ob.peek() if ch.compacted)
        agg = codec.decode(first.payload)
        assert agg["sensor"].tolist() == ["s0", "s1", "s2", "s3"]
        assert agg["count"].tolist() == [750] * 4
        for k in range(4):
            v = a["value"][k::4]
            assert agg["value_min"][k] == v.min() and agg["value_max"][k] == v.max()
            assert agg["value_mean"][k] == pytest.approx(v.mean(), abs=1e-9)
            assert agg["ts_first"][k] == a["ts"][k] and agg["ts_last"][k] == a["ts"][k::4][-1]
        assert ob.chunk_bytes <= ob.capacity()
        # acking a compacted chunk counts the raw records it stands for
        assert ob.ack([first.id]) == 3000
        assert ob.stats()["raw"].acked == 3000


def test_dead_letters_are_capped_oldest_first(ob: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_mod, "MAX_DEAD_LETTERS", 5)
    ob.commit([], [letter(i) for i in range(1, 4)])
    ob.commit([], [letter(i) for i in range(4, 9)])
    assert ob.dead_letter_count == 5
    assert [d["reason"] for d in ob.dead_letters()] == [f"line {i}: bad" for i in range(8, 3, -1)]
    assert [d["size"] for d in ob.dead_letters(limit=2)] == [8, 7]


def test_wal_mode_and_sync_setting(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", sync="normal") as ob:
        assert ob.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert ob.db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_a_file_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    bad = tmp_path / "o.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="cannot open outbox"):
        Outbox(bad).open()


def test_compact_columns_without_text_key() -> None:
    out = compact_columns({"ts": np.array([1.0, 2.0, 3.0]), "v": np.array([1, 5, 3])})
    assert out["key"].tolist() == ["*"] and out["count"].tolist() == [3]
    assert out["ts_first"].tolist() == [1.0] and out["ts_last"].tolist() == [3.0]
    assert (out["v_mean"].tolist(), out["v_min"].tolist(), out["v_max"].tolist()) == (
        [3.0], [1.0], [5.0]
    )


@pytest.mark.parametrize(
    ("stored", "used", "incoming", "prio", "cap", "expected"),
    [
        ([], 0, 10, 5, 100, ([], True)),
        ([StoredChunk(1, 1, 50, False)], 90, 10, 5, 100, ([], True)),  # just fits
        ([StoredChunk(1, 1, 50, False)], 90, 20, 5, 100, ([Eviction(1, "drop")], True)),
        ([StoredChunk(1, 1, 50, True)], 90, 20, 5, 100, ([Eviction(1, "compact")], True)),
        (  # compaction is credited with 90% of the chunk; two needed
            [StoredChunk(1, 1, 10, True), StoredChunk(2, 1, 10, True)], 100, 15, 5, 100,
            ([Eviction(1, "compact"), Eviction(2, "compact")], True),
        ),
        ([StoredChunk(1, 9, 50, False)], 90, 20, 5, 100, ([], False)),  # higher stays
        ([StoredChunk(1, 5, 50, False)], 90, 20, 5, 100, ([Eviction(1, "drop")], True)),
        ([StoredChunk(1, 1, 5, False)], 100, 20, 5, 100, ([], False)),  # not enough to free
        ([StoredChunk(1, 1, 500, False)], 0, 200, 9, 100, ([], False)),  # larger than all
    ],
)
def test_eviction_policy(stored, used, incoming, prio, cap, expected) -> None:
    assert choose_evictions(stored, used, incoming, prio, cap) == expected


def test_outbox_file_is_readable_by_plain_sqlite(ob: Outbox, tmp_path: Path) -> None:
    ob.commit([chunk("agg", raw(10))], None, {"engine": b"s"})
    con = sqlite3.connect(tmp_path / "outbox.db")
    try:
        rows = con.execute("SELECT stream, produced, next_seq FROM streams ORDER BY stream")
        assert rows.fetchall() == [("agg", 10, 10), ("alarms", 0, 0), ("bulk", 0, 0)]
    finally:
        con.close()


def test_chunk_ids_are_never_reused_after_an_ack(ob: Outbox) -> None:
    ob.commit([chunk("bulk", raw(4))])
    [first] = ob.peek()
    ob.ack([first.id])
    assert ob.peek() == []
    ob.commit([chunk("bulk", raw(4))])
    [second] = ob.peek()
    assert second.id > first.id  # the uplink keys its in-flight and refused state by id
