"""LWW map merge: exact cases, and properties (commutative, associative, idempotent, converging,
nothing lost without an audit record) over random maps and operation orders."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewise.errors import PeerError
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import (
    TOMBSTONE,
    AuditRecord,
    Entry,
    LwwMap,
    canonical_bytes,
    merge,
)

SETTINGS = settings(max_examples=200, deadline=None)

# -- strategies -------------------------------------------------------------------------------

keys = st.sampled_from(["k1", "k2", "k3", "k4"])
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False, width=64),
    st.text(max_size=3),
    st.binary(max_size=2),
    st.lists(st.integers(-2, 2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(-2, 2), max_size=2),
    st.just(TOMBSTONE),
)
# few nodes, a narrow time range: plenty of equal wall times and node tie-breaks
hlcs = st.builds(
    HLC, st.integers(0, 5), st.integers(0, 2), st.sampled_from(["cloud", "edge-1", "edge-2"])
)
origins = st.sampled_from(["", "operator:alice", "hmi"])
writes = st.tuples(keys, values, hlcs, origins)
# well-behaved clocks never issue the same timestamp twice
unique_writes = st.lists(writes, max_size=16, unique_by=lambda w: w[2])


def build(ws: list[tuple[str, Any, HLC, str]]) -> LwwMap:
    m = LwwMap()
    for key, value, hlc, origin in ws:
        m.set(key, value, hlc, origin)
    return m


maps = st.lists(writes, max_size=8).map(build)


def norm(audit: list[AuditRecord]) -> list[tuple]:
    """Audit records as sortable, comparable tuples (values may be unhashable)."""
    return sorted(
        (r.key, r.lost_hlc, r.winner_hlc, canonical_bytes(None if r.lost_value is TOMBSTONE
         else r.lost_value), r.lost_value is TOMBSTONE, r.lost_origin, r.at)
        for r in audit
    )


def expected(ws: list[tuple[str, Any, HLC, str]]) -> LwwMap:
    """The converged map: per key, the write with the greatest timestamp."""
    best: dict[str, Entry] = {}
    for key, value, hlc, origin in ws:
        e = Entry(value, hlc, origin)
        if key not in best or best[key] < e:
            best[key] = e
    return LwwMap(best)


def write_id(key: str, hlc: HLC) -> tuple[str, HLC]:
    return (key, hlc)


# -- exact cases ------------------------------------------------------------------------------


def test_setpoint_changed_on_site_during_outage_wins_and_cloud_value_is_audited() -> None:
    cloud, edge = LwwMap(), LwwMap()
    base = HLC(1_000, 0, "cloud")
    cloud.set("line1/temp_high", 95.0, base, "operator:alice")
    edge_copy, audit = merge(edge, cloud)
    assert audit == []
    # the link is down: both sides change the setpoint
    assert cloud.set("line1/temp_high", 97.5, HLC(2_000, 0, "cloud"), "operator:alice") == (
        AuditRecord("line1/temp_high", 95.0, base, HLC(2_000, 0, "cloud"), None,
                    "operator:alice")
    )
    edge_copy.set("line1/temp_high", 92.0, HLC(2_500, 3, "edge-1"), "hmi")
    # reconnect: both sides merge and agree; the cloud's value is kept in the audit trail
    at = HLC(9_000, 0, "cloud")
    on_cloud, audit_cloud = merge(cloud, edge_copy, at=at)
    on_edge, audit_edge = merge(edge_copy, cloud)
    assert on_cloud == on_edge
    assert on_cloud.get("line1/temp_high") == 92.0
    assert on_cloud.entry("line1/temp_high") == Entry(92.0, HLC(2_500, 3, "edge-1"), "hmi")
    assert audit_cloud == [
        AuditRecord("line1/temp_high", 97.5, HLC(2_000, 0, "cloud"), HLC(2_500, 3, "edge-1"),
                    at, "operator:alice")
    ]
    assert norm(audit_edge) == norm([
        AuditRecord("line1/temp_high", 97.5, HLC(2_000, 0, "cloud"), HLC(2_500, 3, "edge-1"),
                    None, "operator:alice")
    ])


def test_equal_wall_time_is_broken_by_node_id() -> None:
    a, b = LwwMap(), LwwMap()
    a.set("sp", 1, HLC(5, 2, "edge-2"))
    b.set("sp", 2, HLC(5, 2, "edge-1"))
    assert merge(a, b)[0].get("sp") == 1  # "edge-2" > "edge-1"
    assert merge(b, a)[0].get("sp") == 1


def test_delete_and_concurrent_set_merge_deterministically() -> None:
    m = LwwMap()
    assert m.set("sp", 21.5, HLC(1_000, 0, "edge-1")) is None
    # a concurrent delete from the cloud at the same wall time: "edge-1" > "cloud", the set wins
    rec = m.delete("sp", HLC(1_000, 0, "cloud"), "operator:bob")
    assert rec == AuditRecord("sp", TOMBSTONE, HLC(1_000, 0, "cloud"), HLC(1_000, 0, "edge-1"),
                              None, "operator:bob")
    assert m.get("sp") == 21.5
    # a later delete wins; the key reads as absent but the tombstone stays
    rec = m.delete("sp", HLC(1_001, 0, "cloud"))
    assert rec == AuditRecord("sp", 21.5, HLC(1_000, 0, "edge-1"), HLC(1_001, 0, "cloud"),
                              None, "edge-1")
    assert "sp" not in m
    assert len(m) == 0
    assert m.get("sp", "absent") == "absent"
    assert m.entry("sp") == Entry(TOMBSTONE, HLC(1_001, 0, "cloud"), "cloud")
    assert m.entry("sp").deleted
    # an older set arriving late does not resurrect the key
    rec = m.set("sp", 30.0, HLC(999, 9, "edge-2"))
    assert rec == AuditRecord("sp", 30.0, HLC(999, 9, "edge-2"), HLC(1_001, 0, "cloud"), None,
                              "edge-2")
    assert "sp" not in m
    # a newer set does
    m.set("sp", 22.0, HLC(1_002, 0, "edge-1"))
    assert m.to_dict() == {"sp": 22.0}


def test_redelivered_write_is_not_an_overwrite() -> None:
    m = LwwMap()
    h = HLC(7, 0, "edge-1")
    assert m.set("sp", {"lo": 1, "hi": 2}, h) is None
    assert m.set("sp", {"hi": 2, "lo": 1}, h) is None  # same map, other key order
    assert merge(m, m) == (m, [])


def test_same_timestamp_different_values_still_converge_and_are_audited() -> None:
    # only a node that lost its persisted clock can do this; replicas must still agree
    h = HLC(7, 0, "edge-1")
    a, b = LwwMap(), LwwMap()
    a.set("sp", 1, h)
    b.set("sp", True, h)  # True and 1 are different values on the wire
    ab, audit_ab = merge(a, b)
    ba, audit_ba = merge(b, a)
    assert ab == ba
    assert type(ab.get("sp")) is bool  # msgpack of True (0xc3) sorts above 1 (0x01)
    assert [(r.lost_value, type(r.lost_value)) for r in audit_ab] == [(1, int)]
    assert norm(audit_ab) == norm(audit_ba)


def test_reads_and_max_hlc() -> None:
    m = LwwMap()
    assert m.max_hlc() is None
    m.set("b", 2, HLC(3, 0, "n"))
    m.set("a", 1, HLC(9, 1, "n"))
    m.delete("c", HLC(4, 0, "n"))
    assert list(m.items()) == [("a", 1), ("b", 2)]
    assert len(m) == 2
    assert "a" in m and "c" not in m and 5 not in m
    assert m.max_hlc() == HLC(9, 1, "n")
    assert sorted(m.entries()) == ["a", "b", "c"]


def test_values_must_be_msgpack_able() -> None:
    with pytest.raises(ValueError, match="not msgpack-able"):
        LwwMap().set("sp", object(), HLC(1, 0, "n"))
    with pytest.raises(ValueError, match="keys must be strings"):
        LwwMap().set(3, 1, HLC(1, 0, "n"))  # type: ignore[arg-type]


def test_wire_round_trip_through_msgpack() -> None:
    m = LwwMap()
    m.set("a", [1, {"x": b"\x00"}], HLC(1, 2, "edge-1"), "hmi")
    m.delete("b", HLC(3, 0, "cloud"), "operator:alice")
    wire = m.to_wire()
    assert wire == {
        "a": [[1, {"x": b"\x00"}], [1, 2, "edge-1"], "hmi", False],
        "b": [None, [3, 0, "cloud"], "operator:alice", True],
    }
    back = LwwMap.from_wire(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True)))
    assert back == m
    rec = AuditRecord("a", TOMBSTONE, HLC(1, 0, "x"), HLC(2, 0, "y"), HLC(5, 1, "z"), "hmi")
    assert AuditRecord.from_wire(msgpack.unpackb(msgpack.packb(rec.to_wire()))) == rec


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        ([], "LWW map must be a map"),
        ({"a": [1, [1, 0, "n"], ""]}, "expected \\[value, hlc, origin, deleted\\]"),
        ({"a": [1, [1, 0, "n"], "", "no"]}, "deleted a bool"),
        ({"a": [1, [1, 0, "n"], 7, False]}, "origin must be text"),
        ({"a": [1, [1, 0], "", False]}, "malformed HLC"),
        ({"a": [1, [-1, 0, "n"], "", False]}, "wall_ms -1 out of range"),
        ({b"a": [1, [1, 0, "n"], "", False]}, "keys must be strings"),
    ],
)
def test_from_wire_refuses_malformed_maps(wire: Any, fragment: str) -> None:
    with pytest.raises(PeerError, match=fragment):
        LwwMap.from_wire(wire)


def test_audit_record_from_wire_refuses_malformed() -> None:
    with pytest.raises(PeerError, match="malformed audit record"):
        AuditRecord.from_wire({"key": "a"})
    good = AuditRecord("a", 1, HLC(1, 0, "x"), HLC(2, 0, "y")).to_wire()
    with pytest.raises(PeerError, match="lost_origin must be text"):
        AuditRecord.from_wire({**good, "lost_origin": 3})


# -- properties -------------------------------------------------------------------------------


def snapshot(m: LwwMap) -> bytes:
    return msgpack.packb(m.to_wire(), use_bin_type=True)


@SETTINGS
@given(maps, maps)
def test_merge_is_commutative_and_pure(a: LwwMap, b: LwwMap) -> None:
    before = (snapshot(a), snapshot(b))
    ab, audit_ab = merge(a, b)
    ba, audit_ba = merge(b, a)
    assert ab == ba
    assert snapshot(ab) == snapshot(ba)
    assert norm(audit_ab) == norm(audit_ba)
    assert (snapshot(a), snapshot(b)) == before


@SETTINGS
@given(maps, maps, maps)
def test_merge_is_associative(a: LwwMap, b: LwwMap, c: LwwMap) -> None:
    assert merge(merge(a, b)[0], c)[0] == merge(a, merge(b, c)[0])[0]


@SETTINGS
@given(maps, maps)
def test_merge_is_idempotent(a: LwwMap, b: LwwMap) -> None:
    assert merge(a, a) == (a, [])
    ab = merge(a, b)[0]
    assert merge(ab, ab) == (ab, [])
    # merging again what was already merged changes nothing (a write that lost is reported
    # again, with the same key, lost_hlc and winner_hlc: the trail's natural dedupe key)
    assert merge(ab, b)[0] == ab
    assert merge(ab, a)[0] == ab


@SETTINGS
@given(unique_writes, st.randoms(use_true_random=False))
def test_any_order_of_updates_converges_on_every_replica(
    ws: list[tuple[str, Any, HLC, str]], rnd: random.Random
) -> None:
    want = expected(ws)
    # three replicas, each write made on one of them, applied in a random order
    replicas = [LwwMap() for _ in range(3)]
    for w in rnd.sample(ws, len(ws)):
        replicas[rnd.randrange(3)].set(*w)
    # random gossip, then a full round so every replica has seen everything
    pairs = [(rnd.randrange(3), rnd.randrange(3)) for _ in range(rnd.randrange(6))]
    pairs += [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2)]
    for i, j in pairs:
        replicas[i] = merge(replicas[i], replicas[j])[0]
    for r in replicas:
        assert r == want
    # and a replica that applies every write directly, in another order, agrees
    direct = build(rnd.sample(ws, len(ws)))
    assert direct == want


@SETTINGS
@given(unique_writes, st.randoms(use_true_random=False))
def test_audit_trail_holds_exactly_the_writes_that_lost(
    ws: list[tuple[str, Any, HLC, str]], rnd: random.Random
) -> None:
    """Through one replica that sees every write once, in any order, by set or by merge: each
    write is either the final entry for its key or in exactly one audit record."""
    m = LwwMap()
    audit: list[AuditRecord] = []
    at = HLC(99, 0, "cloud")
    for key, value, hlc, origin in rnd.sample(ws, len(ws)):
        if rnd.random() < 0.5:
            rec = m.set(key, value, hlc, origin, at=at)
            audit += [rec] if rec else []
        else:
            m, recs = merge(m, LwwMap({key: Entry(value, hlc, origin)}), at=at)
            audit += recs
    final = {(k, e.hlc) for k, e in m.entries().items()}
    lost = Counter(write_id(r.key, r.lost_hlc) for r in audit)
    every = Counter(write_id(k, h) for k, _, h, _ in ws)
    assert lost + Counter(final) == every
    assert set(lost).isdisjoint(final)
    by_id = {write_id(k, h): (v, o) for k, v, h, o in ws}
    for r in audit:
        v, o = by_id[(r.key, r.lost_hlc)]
        assert (r.lost_value is TOMBSTONE) == (v is TOMBSTONE)
        assert r.lost_value is TOMBSTONE or canonical_bytes(r.lost_value) == canonical_bytes(v)
        assert r.lost_origin == o
        assert r.winner_hlc > r.lost_hlc
        assert r.at == at


@SETTINGS
@given(st.lists(maps, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_any_merge_tree_accounts_for_every_entry(ms: list[LwwMap], rnd: random.Random) -> None:
    inputs = {(k, e) for m in ms for k, e in m.entries().items()}
    pool = list(ms)
    audit: list[AuditRecord] = []
    while len(pool) > 1:
        a = pool.pop(rnd.randrange(len(pool)))
        b = pool.pop(rnd.randrange(len(pool)))
        merged, recs = merge(a, b)
        audit += recs
        pool.append(merged)
    final = {(k, e) for k, e in pool[0].entries().items()}
    losers = {(r.key, Entry(r.lost_value, r.lost_hlc, r.lost_origin)) for r in audit}
    assert inputs == final | losers
    assert final.isdisjoint(losers)
