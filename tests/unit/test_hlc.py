"""Hybrid logical clock: the standard algorithm step by step, drift bound, sortable codecs."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.errors import EdgewiseError, PeerError
from edgewise.sync.hlc import (
    DEFAULT_MAX_DRIFT_MS,
    HLC,
    MAX_LOGICAL,
    MAX_WALL,
    Clock,
    ClockDriftError,
    ClockError,
)

SETTINGS = settings(max_examples=200, deadline=None)


class FakeTime:
    """A physical clock the test moves by hand (Unix ms)."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


nodes = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S"]),
    min_size=1,
    max_size=12,
)
stamps = st.builds(
    HLC,
    wall_ms=st.one_of(st.integers(0, 3), st.integers(0, MAX_WALL)),
    logical=st.one_of(st.integers(0, 3), st.integers(0, MAX_LOGICAL)),
    node=st.one_of(st.sampled_from(["a", "ab", "b", "a-b", "é", "z\u4e2d"]), nodes),
)


# -- order and encodings --------------------------------------------------------------------------


def test_order_is_wall_then_logical_then_node() -> None:
    ordered = [
        HLC(1, 5, "z"),
        HLC(2, 0, "z"),
        HLC(2, 1, "a"),
        HLC(2, 1, "b"),
        HLC(2, 1, "ba"),
        HLC(3, 0, "a"),
    ]
    assert sorted(reversed(ordered)) == ordered
    assert HLC(2, 1, "a") == HLC(2, 1, "a")
    assert HLC(2, 1, "a") != HLC(2, 1, "b")


def test_text_and_bytes_forms_are_exact() -> None:
    h = HLC(0x18C2F3A4B5C, 7, "node-1")
    assert h.encode() == "018c2f3a4b5c-00000007-node-1"
    assert str(h) == h.encode()
    assert h.to_bytes() == bytes.fromhex("018c2f3a4b5c00000007") + b"node-1"
    assert h.to_tuple() == (0x18C2F3A4B5C, 7, "node-1")
    assert HLC.parse("018c2f3a4b5c-00000007-node-1") == h
    assert HLC(MAX_WALL, MAX_LOGICAL, "n").encode() == "ffffffffffff-ffffffff-n"


@SETTINGS
@given(stamps)
def test_every_encoding_round_trips(h: HLC) -> None:
    assert HLC.parse(h.encode()) == h
    assert HLC.from_bytes(h.to_bytes()) == h
    assert HLC.from_tuple(msgpack.unpackb(msgpack.packb(h.to_tuple()))) == h


@SETTINGS
@given(stamps, stamps)
def test_encodings_sort_like_timestamps(a: HLC, b: HLC) -> None:
    assert (a < b) == (a.encode() < b.encode()) == (a.to_bytes() < b.to_bytes())
    assert (a == b) == (a.encode() == b.encode()) == (a.to_bytes() == b.to_bytes())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "malformed HLC"),
        ("000000000001-00000000-", "malformed HLC"),  # no node
        ("000000000001-00000000", "malformed HLC"),
        ("00000000000A-00000000-n", "malformed HLC"),  # uppercase hex is not canonical
        ("0000000000_1-00000000-n", "malformed HLC"),  # int() would accept the underscore
        (" 00000000001-00000000-n", "malformed HLC"),
        ("000000000001+00000000-n", "malformed HLC"),
        ("000000000001-00000000-bad\nnode", "non-printable"),
    ],
)
def test_parse_refuses_malformed_text(text: str, fragment: str) -> None:
    with pytest.raises(PeerError, match=fragment):
        HLC.parse(text)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([1, 2], "expected \\[wall_ms, logical, node\\]"),
        ("1,2,n", "expected \\[wall_ms, logical, node\\]"),
        ([-1, 0, "n"], "wall_ms -1 out of range"),
        ([MAX_WALL + 1, 0, "n"], "out of range"),
        ([1, MAX_LOGICAL + 1, "n"], "logical 4294967296 out of range"),
        ([1.0, 0, "n"], "wall_ms must be an integer, got float"),
        ([True, 0, "n"], "wall_ms must be an integer, got bool"),
        ([1, 0, ""], "node id must be a non-empty string"),
        ([1, 0, 5], "node id must be a non-empty string"),
        ([1, 0, "x" * 129], "longer than 128"),
    ],
)
def test_from_tuple_refuses_malformed_values(value: object, fragment: str) -> None:
    with pytest.raises(PeerError, match=fragment):
        HLC.from_tuple(value)


def test_from_bytes_refuses_malformed_values() -> None:
    with pytest.raises(PeerError, match="need more than 10"):
        HLC.from_bytes(b"\x00" * 10)
    with pytest.raises(PeerError, match="not UTF-8"):
        HLC.from_bytes(b"\x00" * 10 + b"\xff")
    with pytest.raises(PeerError, match="must be bytes"):
        HLC.from_bytes("abc")


def test_constructor_refuses_bad_values_with_value_error() -> None:
    with pytest.raises(ValueError, match="logical -1 out of range"):
        HLC(0, -1, "n")


# -- the clock ----------------------------------------------------------------------------------


def test_now_follows_physical_time_and_counts_when_it_stalls_or_goes_back() -> None:
    t = FakeTime(100)
    c = Clock("a", t)
    assert c.now() == HLC(100, 0, "a")
    assert c.now() == HLC(100, 1, "a")  # same millisecond
    t.ms = 90  # physical clock stepped back (NTP correction)
    assert c.now() == HLC(100, 2, "a")
    t.ms = 101
    assert c.now() == HLC(101, 0, "a")
    assert c.last == HLC(101, 0, "a")


def test_update_follows_the_standard_algorithm() -> None:
    t = FakeTime(100)
    c = Clock("a", t)
    assert c.now() == HLC(100, 0, "a")
    # remote ahead (within the drift bound): take its wall time, its counter + 1
    assert c.update(HLC(150, 3, "b")) == HLC(150, 4, "a")
    t.ms = 120
    assert c.now() == HLC(150, 5, "a")  # physical time has not caught up yet
    # same wall time on both sides: max of the counters + 1
    assert c.update(HLC(150, 9, "b")) == HLC(150, 10, "a")
    assert c.update(HLC(150, 2, "b")) == HLC(150, 11, "a")
    # remote behind us: our counter + 1
    assert c.update(HLC(140, 50, "b")) == HLC(150, 12, "a")
    # physical time ahead of both: counter resets
    t.ms = 151
    assert c.update(HLC(150, 99, "b")) == HLC(151, 0, "a")


def test_update_refuses_a_remote_clock_too_far_ahead_and_stays_unchanged() -> None:
    t = FakeTime(1_000_000)
    c = Clock("edge-1", t)
    c.now()
    assert c.max_drift_ms == DEFAULT_MAX_DRIFT_MS == 60_000
    ok = c.update(HLC(1_060_000, 0, "cloud"))  # exactly at the bound: accepted
    assert ok == HLC(1_060_000, 1, "edge-1")
    with pytest.raises(ClockDriftError) as info:
        c.update(HLC(1_060_001, 0, "cloud"))
    assert isinstance(info.value, PeerError)
    assert isinstance(info.value, EdgewiseError)
    assert info.value.ahead_ms == 60_001
    assert str(info.value).startswith(
        "timestamp from node 'cloud' is 60001 ms ahead of the clock of node 'edge-1' "
        "(allowed: 60000 ms)"
    )
    assert c.last == HLC(1_060_000, 1, "edge-1")
    assert c.now() == HLC(1_060_000, 2, "edge-1")


def test_a_refused_timestamp_is_accepted_once_the_clock_is_right() -> None:
    """What the twin's retry of a held desired state relies on: a refusal changes nothing, so
    the same remote timestamp is taken as soon as the physical clock has caught up."""
    real = 1_700_000_000_000
    t = FakeTime(real - 3_600_000)  # this node's clock is 1 h behind
    c = Clock("edge-1", t)
    before = c.now()
    remote = HLC(real, 0, "cloud")
    for _ in range(3):
        with pytest.raises(ClockDriftError) as info:
            c.update(remote)
        assert info.value.ahead_ms == 3_600_000 and c.last == before
    t.ms = real - 60_000  # within the bound
    assert c.update(remote) == HLC(real, 1, "edge-1")
    assert c.now() > remote


def test_drift_bound_is_configurable() -> None:
    c = Clock("a", FakeTime(0), max_drift_ms=5)
    assert c.update(HLC(5, 0, "b")) == HLC(5, 1, "a")
    with pytest.raises(ClockDriftError, match="6 ms ahead"):
        c.update(HLC(6, 0, "b"))
    with pytest.raises(ValueError, match="max_drift_ms must be a positive integer"):
        Clock("a", FakeTime(0), max_drift_ms=0)
    with pytest.raises(ValueError, match="node id must be a non-empty string"):
        Clock("", FakeTime(0))


def test_restored_clock_never_reissues_a_timestamp() -> None:
    persisted = HLC(5_000, 7, "a")
    c = Clock("a", FakeTime(1_000), last=persisted)  # restarted with a clock set back
    assert c.now() == HLC(5_000, 8, "a")


def test_counter_exhaustion_is_a_clear_error() -> None:
    c = Clock("a", FakeTime(10), last=HLC(10, MAX_LOGICAL, "a"))
    with pytest.raises(ClockError, match="counter exhausted"):
        c.now()
    with pytest.raises(ClockError, match="counter exhausted"):
        Clock("a", FakeTime(10)).update(HLC(10, MAX_LOGICAL, "b"))


def test_system_clock_by_default() -> None:
    import time

    before = time.time_ns() // 1_000_000
    h = Clock("a").now()
    after = time.time_ns() // 1_000_000
    assert before <= h.wall_ms <= after
    assert h.node == "a"


events = st.lists(
    st.tuples(
        st.integers(-50, 50),  # physical clock step (can go backwards)
        st.one_of(st.none(), st.tuples(st.integers(-100, 100), st.integers(0, 5))),
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(events)
def test_timestamps_strictly_increase_and_dominate_what_was_received(steps: list) -> None:
    t = FakeTime(1_000)
    c = Clock("a", t, max_drift_ms=60)
    previous = c.last
    for step, remote in steps:
        t.ms += step
        if remote is None:
            h = c.now()
        else:
            r = HLC(max(0, t.ms + remote[0]), remote[1], "b")
            if r.wall_ms - t.ms > 60:
                with pytest.raises(ClockDriftError):
                    c.update(r)
                assert c.last == previous
                continue
            h = c.update(r)
            assert h > r
        assert h > previous
        assert h.node == "a"
        # the HLC's wall part never runs ahead of the largest physical time seen + the bound
        assert h.wall_ms <= max(t.ms, previous.wall_ms) + 60
        previous = h
