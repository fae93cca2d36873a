"""The control plane's writes per node are bulk writes (issue 11): statements counted with
SQLAlchemy's ``before_cursor_execute`` event, on SQLite and on the real local PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert

from edgewise.cloud.desired import DesiredChange, assign
from edgewise.cloud.node_writes import NodeWrites
from edgewise.cloud.pokes import PokeFanout, fetch_jitter
from edgewise.cloud.store import ChunkWrite, MarkWrite, NodeInfo, Store, database_url
from edgewise.cloud.store.models import Node
from edgewise.errors import NotFound, StorageError
from edgewise.sync import protocol
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return request.getfixturevalue("postgres")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with Store(store_url) as s:
        yield s


class Statements:
    """The data-changing statements a store sends (each multi-row batch counts once)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, _conn, _cursor, statement: str, *_rest) -> None:  # type: ignore[no-untyped-def]
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in ("INSERT", "UPDATE", "DELETE"):
            self.seen.append(verb)

    def take(self) -> list[str]:
        out, self.seen = self.seen, []
        return out


@pytest.fixture
def statements(store: Store) -> Iterator[Statements]:
    counter = Statements()
    engine = store._write.sync_engine  # type: ignore[union-attr]
    event.listen(engine, "before_cursor_execute", counter)
    yield counter
    event.remove(engine, "before_cursor_execute", counter)


async def test_a_group_commit_of_many_nodes_is_a_few_multi_row_statements(
        store: Store, statements: Statements) -> None:
    n = 2000  # nodes, each sending one batch of one stream (many nodes, each rarely)
    chunks = [ChunkWrite(f"n{i:04d}", "raw", 0, 5, 5, False, b"p", NOW) for i in range(n)]
    marks = [MarkWrite(f"n{i:04d}", "raw", 5, NOW) for i in range(n)]
    result = await store.commit_ingest(chunks, [], marks)
    # PostgreSQL: 2 chunk inserts of 1,000 rows and one executemany upsert of the 2,000 stream
    # marks (one statement per stream at first, then one multi-row VALUES upsert per 1,000
    # compiled anew for every commit). SQLite: none through SQLAlchemy: the whole commit is one
    # hand-off to the connection's thread (tests/unit/test_store_one_handoff.py)
    assert statements.take() == (["INSERT"] * 3 if store.dialect == "postgresql" else [])
    assert len(result.chunks) == n and result.records == 5 * n
    stats = await store.stream_stats()
    assert len(stats) == n
    assert {(s.contiguous, s.stored_records, s.gap_records) for s in stats} == {(5, 5, 0)}

    # the same batches again (acks lost): nothing stored twice, counters unchanged, and the
    # next batches move every mark
    again = await store.commit_ingest(chunks, [], marks)
    assert len(again.chunks) == 0 and again.records == 0
    more = [ChunkWrite(f"n{i:04d}", "raw", 5, 3, 3, False, b"q", NOW) for i in range(n)]
    await store.commit_ingest(more, [], [MarkWrite(f"n{i:04d}", "raw", 8, NOW)
                                         for i in range(n)])
    statements.take()
    stats = await store.stream_stats()
    assert {(s.contiguous, s.stored_records) for s in stats} == {(8, 8)}
    # a mark never moves back, even in a multi-row upsert
    await store.commit_ingest([], [], [MarkWrite("n0000", "raw", 2, NOW)])
    assert (await store.stream_stats("n0000"))[0].contiguous == 8


async def add_nodes(store: Store, n: int) -> list[NodeInfo]:
    """``n`` node rows as enrolment leaves them (written directly: 2,000 certificates would
    cost the test seconds and prove nothing here)."""
    rows = [{"id": f"n{i:04d}", "labels": {"site": "s1"}, "key_fingerprint": f"{i:064x}",
             "cert_serial": f"{i:x}", "cert_expiry": NOW, "status": "enrolled",
             "created": NOW, "last_seen": None} for i in range(n)]
    async with store._tx() as conn:
        await conn.execute(insert(Node), rows)
    return await store.list_nodes({"site": "s1"}, limit=n)


class Poked:
    def __init__(self) -> None:
        self.got: list[tuple[int, float]] = []
        self.states: list[dict[str, Any] | None] = []

    def poke_desired(self, version: int, jitter: float = 0.0,
                     state: dict[str, Any] | None = None) -> None:
        self.got.append((version, jitter))
        self.states.append(state)


async def test_a_selector_push_to_2000_nodes_is_one_bulk_store_operation(
        store: Store, statements: Statements) -> None:
    nodes = await add_nodes(store, 2000)
    statements.take()
    live = {f"n{i:04d}": Poked() for i in range(0, 2000, 2)}  # half connected here
    pokes = PokeFanout(live.get)
    change = DesiredChange(config={"rate": 5})
    done = await assign(store, pokes, nodes, change, actor="op:a", now=NOW,
                        fetch_rate=1000.0, max_jitter=5.0)
    # per 1,000 nodes: desired rows (one executemany) and audit rows (one executemany); the
    # per-node path made 2 statements in a transaction of its own for each node
    assert statements.take() == ["INSERT"] * 4
    assert [(d.node, d.version, d.notified) for d in done[:3]] == [
        ("n0000", 1, True), ("n0001", 1, False), ("n0002", 1, True)]
    assert sum(d.notified for d in done) == 1000
    # the pokes wait for the fan-out task, coalesced: a second push before it runs
    assert all(p.got == [] for p in live.values()) and len(pokes) == 1000
    again = await assign(store, pokes, nodes, DesiredChange(config={"rate": 6}), actor="op:a",
                         now=NOW)
    assert {d.version for d in again} == {2}
    assert len(pokes) == 1000 and pokes.coalesced == 1000
    assert pokes.flush() == 1000
    # one poke each, the newest version, with the jitter hint 2,000 nodes / 1,000 per s
    assert {tuple(p.got) for p in live.values()} == {((2, 2.0),)}
    # each with its node's stored v2 inline (small), so no node needs to fetch it
    assert pokes.inlined == 1000
    for node_id in ("n0000", "n1998"):
        stored = await store.get_desired_state(node_id)
        assert stored is not None and live[node_id].states == [stored.to_wire()]

    newest = await store.get_desired_state("n1999")
    assert newest is not None and newest.version == 2
    assert newest.config == {"rate": 6} and newest.labels == {"site": "s1"}
    audit = await store.list_audit(target="node:n1999", limit=10)
    assert [(a.action, a.detail["version"]) for a in audit] == [
        ("desired.set", 2), ("desired.set", 1)]


async def test_a_bulk_push_with_setpoints_merges_them_for_every_node(
        store: Store, statements: Statements) -> None:
    nodes = await add_nodes(store, 3)
    writes = LwwMap()
    writes.set("speed", 7, HLC(1000, 0, "cloud"), "op:a")
    statements.take()
    await assign(store, PokeFanout(lambda _n: None), nodes,
                 DesiredChange(setpoints=writes), actor="op:a", now=NOW)
    # desired rows, reported-state upsert (one multi-row statement), audit rows
    assert statements.take() == ["INSERT"] * 3
    for n in nodes:
        reported = await store.get_reported_state(n.id)
        assert reported is not None and reported.state.setpoints.to_dict() == {"speed": 7}
        assert [a.action for a in await store.list_audit(target=f"node:{n.id}")] == [
            "desired.set", "setpoint.set"]


async def test_a_bulk_push_naming_a_node_that_is_gone_stores_nothing(store: Store) -> None:
    nodes = await add_nodes(store, 3)
    ghost = dataclasses.replace(nodes[1], id="gone")
    with pytest.raises(NotFound, match="no node 'gone'"):
        await assign(store, PokeFanout(lambda _n: None), [nodes[0], ghost, nodes[2]],
                     DesiredChange(config={"a": 1}), actor="op:a", now=NOW)
    assert [await store.desired_version(n.id) for n in nodes] == [0, 0, 0]


def test_fetch_jitter() -> None:
    assert fetch_jitter(1, 1000.0, 5.0) == 0.0  # one node: no hint
    assert fetch_jitter(49, 1000.0, 5.0) == 0.0  # under 50 ms: none
    assert fetch_jitter(2000, 1000.0, 5.0) == 2.0
    assert fetch_jitter(100_000, 1000.0, 5.0) == 5.0  # capped


def test_pokes_beyond_the_bound_are_dropped_and_counted() -> None:
    live = {f"n{i}": Poked() for i in range(5)}
    pokes = PokeFanout(live.get, max_pending=3)
    assert pokes.poke({f"n{i}": 1 for i in range(5)} | {"offline": 1}) == set(live)
    assert (len(pokes), pokes.dropped) == (3, 2)
    assert pokes.flush(limit=2) == 2 and len(pokes) == 1


def test_a_poke_carries_its_state_only_when_it_is_small() -> None:
    live = {"small": Poked(), "big": Poked(), "stale": Poked()}
    pokes = PokeFanout(live.get)
    small = DesiredState(3, None, {"rate": 5})
    big = DesiredState(3, None, {"blob": "x" * protocol.MAX_INLINE_STATE_BYTES})
    pokes.poke({"small": 3, "big": 3, "stale": 4}, 1.0,
               {"small": small, "big": big, "stale": small})  # stale: not the poked version
    assert pokes.flush() == 3 and pokes.inlined == 1
    assert live["small"].states == [small.to_wire()]
    assert live["big"].states == [None] and live["stale"].states == [None]
    assert [p.got for p in live.values()] == [[(3, 1.0)], [(3, 1.0)], [(4, 1.0)]]


def setpoints(**values: tuple[object, int]) -> LwwMap:
    m = LwwMap()
    for key, (value, ms) in values.items():
        m.set(key, value, HLC(ms, 0, "node"), "node")
    return m


async def test_status_and_reports_of_many_nodes_are_one_group_write(
        store: Store, statements: Statements) -> None:
    await add_nodes(store, 500)
    statements.take()
    writes = NodeWrites(store)
    at = HLC(5000, 0, "cloud")
    for i in range(500):
        nid = f"n{i:04d}"
        writes.status(nid, "offline", NOW)
        writes.status(nid, "online", NOW)  # the newest per node wins
        writes.report(nid, ReportedState(1, "running", {"records": 1},
                                         setpoints(speed=(1, 1000))), at)
        writes.report(nid, ReportedState(2, "running", {"records": 2},
                                         setpoints(speed=(2, 2000), mode=("eco", 1500))), at)
    assert len(writes) == 500
    assert await writes.flush() == 500
    # one executemany UPDATE for the statuses, one multi-row upsert for the reports, one
    # executemany INSERT for the audit (each node's speed=1 lost to speed=2); per message
    # this was 1,500 transactions
    assert statements.take() == ["UPDATE", "INSERT", "INSERT"]
    assert await writes.flush() == 0 and statements.take() == []
    node = await store.get_node("n0499")
    assert node is not None and node.status == "online"
    rep = await store.get_reported_state("n0499")
    assert rep is not None and rep.state.applied_version == 2
    assert rep.state.setpoints.to_dict() == {"speed": 2, "mode": "eco"}
    assert rep.state.counters == {"records": 2} and rep.pending == ()
    audit = await store.list_audit(target="node:n0499")
    assert [(a.action, a.detail["key"]) for a in audit] == [("setpoint.overwritten", "speed")]


async def test_a_failed_group_write_is_tried_again_and_newer_writes_win(store: Store) -> None:
    await add_nodes(store, 2)
    writes = NodeWrites(store)
    real = store.write_node_batch
    fail = [True]

    async def flaky(*args, **kw):  # type: ignore[no-untyped-def]
        if fail.pop() if fail else False:
            raise StorageError("injected")
        return await real(*args, **kw)

    store.write_node_batch = flaky  # type: ignore[method-assign]
    writes.status("n0000", "online", NOW)
    writes.status("n0001", "online", NOW)
    with pytest.raises(StorageError):
        await writes.flush()
    writes.status("n0001", "offline", NOW)  # newer than the failed write
    assert (await writes.flush(), writes.failures, writes.writes) == (2, 1, 1)
    assert [(await store.get_node(n)).status for n in ("n0000", "n0001")] == [  # type: ignore[union-attr]
        "online", "offline"]


def test_node_writes_are_bounded_and_drops_counted(tmp_path: Path) -> None:
    writes = NodeWrites(Store(database_url(None, tmp_path)), max_nodes=2)
    for i in range(4):
        writes.status(f"n{i}", "online", NOW)
    assert (len(writes), writes.dropped) == (2, 2)
