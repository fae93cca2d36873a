"""The control plane store on SQLite and on the real local PostgreSQL (a fresh database each)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cloud.health import head_revision
from edgewise.cloud.store import (
    ChunkWrite,
    GapWrite,
    MarkWrite,
    SeqRange,
    Store,
    database_url,
)
from edgewise.cloud.store.db import MIGRATIONS
from edgewise.errors import ConfigError, StorageError
from edgewise.security.pki import CertificateAuthority, IssuedCert, make_csr
from edgewise.security.tokens import (
    EnrolmentToken,
    OperatorToken,
    TokenExpired,
    TokenInvalid,
    TokenUsedUp,
    hash_token,
)
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import ReportedState

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return request.getfixturevalue("postgres")


@pytest.fixture
async def store(store_url: str):
    async with Store(store_url) as s:
        yield s


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"), now=NOW - timedelta(days=1))


def issue(ca: CertificateAuthority, node_id: str, key: ec.EllipticCurvePrivateKey | None = None
          ) -> IssuedCert:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return ca.sign_node_csr(make_csr(key), node_id, now=NOW)


async def token(store: Store, uses: int = 1, ttl: timedelta = timedelta(hours=1),
                labels: dict[str, str] | None = None) -> str:
    _plain, record = EnrolmentToken.issue(labels or {"site": "plant1"}, ttl, uses, now=NOW)
    await store.add_enrolment_token(record, now=NOW)
    return record.hash


def test_database_url(tmp_path: Path) -> None:
    assert database_url(None, tmp_path) == f"sqlite+aiosqlite:///{tmp_path.resolve()}/edgewise.db"
    assert database_url("postgresql://u@h:5/d", None) == "postgresql+asyncpg://u@h:5/d"
    assert database_url("postgres://u:pw@h/d", None) == "postgresql+asyncpg://u:pw@h/d"
    assert database_url("sqlite:////x/y.db", None) == "sqlite+aiosqlite:////x/y.db"
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        database_url("mysql://h/d", None)
    with pytest.raises(ConfigError, match="not a database URL"):
        database_url("::nonsense", None)
    with pytest.raises(ConfigError, match="give --data"):
        database_url(None, None)


async def test_open_migrates_and_reopens(store_url: str) -> None:
    # the newest migration: the highest-numbered file, which is Alembic's head
    newest = max(p.name[:4] for p in MIGRATIONS.glob("versions/0*.py"))
    assert head_revision() == newest
    async with Store(store_url) as s:
        assert await s.schema_revision() == newest
        assert await s.count_nodes() == 0
    async with Store(store_url) as s:  # the second open finds the schema current
        assert await s.schema_revision() == newest


async def test_unreachable_database_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="cannot open the store"):
        await Store("postgresql+asyncpg://nobody@127.0.0.1:1/none").open()


async def test_enrolment_token_single_use(store: Store) -> None:
    h = await token(store)
    assert await store.use_enrolment_token(h, now=NOW) == {"site": "plant1"}
    with pytest.raises(TokenUsedUp, match="used up"):
        await store.use_enrolment_token(h, now=NOW)
    with pytest.raises(TokenInvalid, match="unknown"):
        await store.use_enrolment_token(hash_token("ewe_" + "x" * 43), now=NOW)
    h2 = await token(store, ttl=timedelta(minutes=5))
    with pytest.raises(TokenExpired, match="expired"):
        await store.use_enrolment_token(h2, now=NOW + timedelta(minutes=5))
    assert await store.use_enrolment_token(h2, now=NOW + timedelta(minutes=4)) == {
        "site": "plant1"}
    assert [t.uses_left for t in await store.list_enrolment_tokens(
        now=NOW, include_spent=True)] == [0, 0]
    assert await store.list_enrolment_tokens(now=NOW) == []
    assert await store.purge_enrolment_tokens(now=NOW) == 2


async def test_token_race_has_exactly_as_many_winners_as_uses(store: Store) -> None:
    h = await token(store, uses=3)
    results = await asyncio.gather(
        *(store.use_enrolment_token(h, now=NOW) for _ in range(8)), return_exceptions=True
    )
    assert sum(1 for r in results if r == {"site": "plant1"}) == 3
    assert sum(1 for r in results if isinstance(r, TokenUsedUp)) == 5


async def test_enrol_node_is_atomic(store: Store, ca: CertificateAuthority) -> None:
    h = await token(store, labels={"site": "plant1", "line": "1"})
    issued = issue(ca, "node-a")
    node = await store.enrol_node(h, "node-a", issued, now=NOW)
    assert node.labels == {"site": "plant1", "line": "1"}
    assert node.cert_serial == issued.serial
    got = await store.get_node("node-a")
    assert got == node
    # the token is spent: a second enrolment changes nothing
    with pytest.raises(TokenUsedUp):
        await store.enrol_node(h, "node-b", issue(ca, "node-b"), now=NOW)
    assert await store.count_nodes() == 1
    # a taken id rolls the token use back
    h2 = await token(store)
    with pytest.raises(StorageError, match="already taken"):
        await store.enrol_node(h2, "node-a", issue(ca, "node-a"), now=NOW)
    assert [t.uses_left for t in await store.list_enrolment_tokens(now=NOW)] == [1]
    audit = await store.list_audit(target="node:node-a")
    assert [(a.action, a.actor) for a in audit] == [("node.enrol", "node:node-a")]


async def test_nodes_labels_paging_status(store: Store, ca: CertificateAuthority) -> None:
    for i in range(5):
        h = await token(store, labels={"site": "plant1" if i < 3 else "plant2", "n": str(i)})
        await store.enrol_node(h, f"node-{i}", issue(ca, f"node-{i}"), now=NOW)
    assert [n.id for n in await store.list_nodes({"site": "plant1"})] == [
        "node-0", "node-1", "node-2"]
    assert [n.id for n in await store.list_nodes({"site": "plant2", "n": "4"})] == ["node-4"]
    page1 = await store.list_nodes(limit=2)
    page2 = await store.list_nodes(limit=2, after=page1[-1].id)
    assert [n.id for n in page1 + page2] == ["node-0", "node-1", "node-2", "node-3"]
    updated = await store.set_node_labels("node-1", {"site": "plant9"}, actor="op:alice",
                                          now=NOW)
    assert updated.labels == {"site": "plant9"}
    with pytest.raises(KeyError):
        await store.set_node_labels("nope", {"a": "b"}, actor="op:alice")
    with pytest.raises(ConfigError):
        await store.set_node_labels("node-1", {"BAD KEY": "b"}, actor="op:alice")
    await store.set_node_status("node-2", "online", now=NOW + timedelta(minutes=1))
    await store.touch_nodes({"node-3": NOW + timedelta(minutes=2),
                             "node-4": NOW + timedelta(minutes=3)})
    n2, n3, n4 = [await store.get_node(f"node-{i}") for i in (2, 3, 4)]
    assert (n2.status, n2.last_seen) == ("online", NOW + timedelta(minutes=1))
    assert n3.last_seen == NOW + timedelta(minutes=2)
    assert n4.last_seen == NOW + timedelta(minutes=3)


async def test_revoke_and_renew(store: Store, ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    first = issue(ca, "node-r", key)
    await store.enrol_node(await token(store), "node-r", first, now=NOW)
    renewed = issue(ca, "node-r", key)
    await store.record_renewal("node-r", renewed, now=NOW)
    assert (await store.get_node("node-r")).cert_serial == renewed.serial
    with pytest.raises(StorageError, match="another key"):  # a different key is refused
        await store.record_renewal("node-r", issue(ca, "node-r"), now=NOW)
    revoked = await store.revoke_node("node-r", reason="stolen", actor="op:alice", now=NOW)
    assert (revoked.revoked, revoked.status) == (True, "revoked")
    rl = await store.load_revocations()
    assert len(rl) == 2
    assert rl.is_revoked(renewed.cert) and rl.is_revoked(first.cert)  # by key
    with pytest.raises(StorageError):
        await store.record_renewal("node-r", issue(ca, "node-r", key), now=NOW)
    await store.set_node_status("node-r", "online")
    assert (await store.get_node("node-r")).status == "revoked"
    await store.add_revocation(serial=12345, reason="test")
    await store.add_revocation(serial=12345, reason="again")  # idempotent
    assert len(await store.load_revocations()) == 3
    with pytest.raises(KeyError):
        await store.revoke_node("nope", reason="x", actor="op")


async def test_operator_tokens(store: Store) -> None:
    _plain, record = OperatorToken.issue("admin", "admin", now=NOW)
    await store.add_operator_token(record, now=NOW)
    got = await store.get_operator_token(record.hash)
    assert (got.name, got.role.value) == ("admin", "admin")
    assert await store.get_operator_token(hash_token("ewo_" + "y" * 43)) is None
    assert await store.revoke_operator_token(record.hash, actor="op:root") is True
    assert await store.get_operator_token(record.hash) is None
    assert [(t.name, t.revoked) for t in await store.list_operator_tokens()] == [("admin", True)]
    assert [a.action for a in await store.list_audit()] == ["token.revoke", "token.create"]


def cw(stream: str, seq: int, count: int, payload: bytes = b"p") -> ChunkWrite:
    return ChunkWrite("n1", stream, seq, count, count, False, payload, NOW)


async def test_commit_ingest_skips_stored_keys(store: Store) -> None:
    res = await store.commit_ingest(
        [cw("raw", 0, 10), cw("raw", 10, 5), cw("alarms", 0, 2)], [],
        [MarkWrite("n1", "raw", 15, NOW), MarkWrite("n1", "alarms", 2, NOW)])
    assert res.chunks == {("n1", "raw", 0), ("n1", "raw", 10), ("n1", "alarms", 0)}
    assert res.records == 17
    # the same keys again (e.g. a second session racing): nothing stored twice, counters kept
    res = await store.commit_ingest([cw("raw", 10, 5, b"other"), cw("raw", 20, 3)], [],
                                    [MarkWrite("n1", "raw", 12, NOW)])
    assert res.chunks == {("n1", "raw", 20)}
    assert res.records == 3
    stats = {s.stream: s for s in await store.stream_stats("n1")}
    assert (stats["raw"].contiguous, stats["raw"].stored_records) == (15, 18)  # never backwards
    assert (stats["alarms"].contiguous, stats["alarms"].stored_records) == (2, 2)
    chunks = await store.read_chunks("n1", "raw")
    assert [(c.seq_first, c.seq_count, c.payload) for c in chunks] == [
        (0, 10, b"p"), (10, 5, b"p"), (20, 3, b"p")]
    assert [c.seq_first for c in await store.read_chunks("n1", "raw", from_seq=10, limit=1)
            ] == [10]
    # a gap moves the mark and is counted as loss, once
    gap = GapWrite("n1", "raw", 15, 5, "outbox full", NOW)
    res = await store.commit_ingest([], [gap, gap], [MarkWrite("n1", "raw", 23, NOW)])
    assert res.gaps == {("n1", "raw", 15)}
    res = await store.commit_ingest([], [gap], [])
    assert res.gaps == frozenset()
    stats = {s.stream: s for s in await store.stream_stats()}
    assert (stats["raw"].contiguous, stats["raw"].stored_records, stats["raw"].gap_records) == (
        23, 18, 5)
    assert [(g.seq_first, g.seq_count, g.reason) for g in await store.list_gaps("n1")] == [
        (15, 5, "outbox full")]
    assert await store.settled_above("n1", "raw", 12) == [
        SeqRange(15, 5, gap=True), SeqRange(20, 3)]
    assert set(await store.load_streams("n1")) == {"raw", "alarms"}
    assert await store.purge_chunks(NOW + timedelta(seconds=1), limit=2) == 2
    assert await store.purge_chunks(NOW + timedelta(seconds=1)) == 2
    assert await store.read_chunks("n1", "raw") == []


async def test_desired_versions(store: Store, ca: CertificateAuthority) -> None:
    await store.enrol_node(await token(store), "node-d", issue(ca, "node-d"), now=NOW)
    assert await store.get_desired_state("node-d") is None
    assert await store.desired_version("node-d") == 0
    s1 = await store.put_desired_state("node-d", pipelines={"p": "yaml: 1"}, actor="op:a")
    s2 = await store.put_desired_state("node-d", config={"rate": 5},
                                       expires_at=NOW + timedelta(hours=1), actor="op:a")
    assert (s1.version, s2.version) == (1, 2)
    assert await store.get_desired_state("node-d") == s2
    assert await store.get_desired_state("node-d", 1) == s1
    assert s2.expires_at == (NOW + timedelta(hours=1)).timestamp()
    assert await store.desired_version("node-d") == 2
    states = await asyncio.gather(*(
        store.put_desired_state("node-d", config={"i": i}, actor="op:a") for i in range(4)))
    assert sorted(s.version for s in states) == [3, 4, 5, 6]
    with pytest.raises(KeyError):
        await store.put_desired_state("nope", actor="op:a")
    with pytest.raises(ConfigError, match="pipelines"):
        await store.put_desired_state("node-d", pipelines={"p": 1}, actor="op:a")  # type: ignore[dict-item]


async def test_update_desired_state_reads_and_writes_in_one_transaction(
        store: Store, ca: CertificateAuthority) -> None:
    """Concurrent read-modify-writes of one node's desired state each see the one before: no
    lost update; the setpoint writes reach the reported state, audited in the same order."""
    await store.enrol_node(await token(store), "node-u", issue(ca, "node-u"), now=NOW)

    def add(key: str, value: int):
        def change(previous):
            config = dict(previous.config) if previous is not None else {}
            config[key] = value
            return {}, config
        return change

    def write(key: str, value: int) -> LwwMap:
        m = LwwMap()
        m.set(key, value, HLC(1000 + value, 0, "cloud"))
        return m

    states = await asyncio.gather(*(
        store.update_desired_state("node-u", add(f"k{i}", i), setpoints=write(f"s{i}", i),
                                   actor="op:a", now=NOW) for i in range(6)))
    assert sorted(s.version for s in states) == [1, 2, 3, 4, 5, 6]
    newest = await store.get_desired_state("node-u")
    assert newest is not None and newest.config == {f"k{i}": i for i in range(6)}
    reported = await store.get_reported_state("node-u")
    assert reported is not None
    assert reported.state.setpoints.to_dict() == {f"s{i}": i for i in range(6)}
    actions = [a.action for a in await store.list_audit(target="node:node-u", limit=2)]
    assert actions == ["desired.set", "setpoint.set"]
    with pytest.raises(KeyError):
        await store.update_desired_state("nope", add("x", 1), actor="op:a")


async def test_reported_state_merges_setpoints_and_audits(store: Store) -> None:
    edge = LwwMap()
    edge.set("limit", 90.0, HLC(1000, 0, "node-s"))
    await store.merge_reported_state("node-s", ReportedState(1, "running", {"in": 5}, edge),
                                     now=NOW)
    cloud = LwwMap()
    cloud.set("limit", 95.0, HLC(2000, 0, "cloud"))
    losses = await store.merge_setpoints("node-s", cloud, actor="op:alice", now=NOW)
    assert [(x.key, x.lost_value) for x in losses] == [("limit", 90.0)]
    # the node reports its (older) write again and a new key: the cloud's value stays
    edge.set("mode", "eco", HLC(1500, 0, "node-s"))
    losses = await store.merge_reported_state(
        "node-s", ReportedState(2, "running", {"in": 9}, edge), now=NOW)
    assert [(x.key, x.lost_value) for x in losses] == [("limit", 90.0)]
    info = await store.get_reported_state("node-s")
    assert info.state.applied_version == 2
    assert info.state.counters == {"in": 9}
    assert info.state.setpoints.to_dict() == {"limit": 95.0, "mode": "eco"}
    actions = [a.action for a in await store.list_audit(target="node:node-s")]
    assert actions == ["setpoint.overwritten", "setpoint.overwritten", "setpoint.set"]
    assert await store.get_reported_state("other") is None


async def test_audit_paging(store: Store) -> None:
    for i in range(5):
        await store.audit("op:a", "x.do", f"t{i % 2}", {"i": i}, now=NOW)
    newest = await store.list_audit(limit=2)
    assert [a.detail["i"] for a in newest] == [4, 3]
    older = await store.list_audit(limit=10, before_id=newest[-1].id)
    assert [a.detail["i"] for a in older] == [2, 1, 0]
    assert [a.detail["i"] for a in await store.list_audit(target="t1")] == [3, 1]


async def test_pending_setpoints_are_cloud_writes_the_node_has_not_reported(store: Store) -> None:
    """`node show` must not claim a setpoint the node does not have: the merged view keeps the
    cloud's write, and ``pending`` names it until the node reports the same write."""
    cloud = LwwMap()
    cloud.set("mode", "auto", HLC(2000, 0, "cloud"))
    await store.merge_setpoints("node-p", cloud, actor="op:alice", now=NOW)
    info = await store.get_reported_state("node-p")
    assert (info.state.setpoints.to_dict(), info.pending) == ({"mode": "auto"}, ("mode",))
    # the node reports without it (it holds the version: its clock is behind)
    edge = LwwMap()
    edge.set("limit", 90.0, HLC(1000, 0, "node-p"))
    await store.merge_reported_state("node-p", ReportedState(None, "held", {}, edge), now=NOW)
    info = await store.get_reported_state("node-p")
    assert info.state.setpoints.to_dict() == {"limit": 90.0, "mode": "auto"}
    assert info.pending == ("mode",)
    # it applied the write: nothing pending; a later cloud write keeps what the node reported
    applied, _ = edge.merge(cloud)
    await store.merge_reported_state("node-p", ReportedState(1, "running", {}, applied), now=NOW)
    assert (await store.get_reported_state("node-p")).pending == ()
    later = LwwMap()
    later.set("limit", 80.0, HLC(3000, 0, "cloud"))
    await store.merge_setpoints("node-p", later, actor="op:alice", now=NOW)
    assert (await store.get_reported_state("node-p")).pending == ("limit",)


async def test_health_writes_replace_the_body_keep_the_quarantine_and_skip_unknown_nodes(
        store: Store) -> None:
    """`write_health` (one cached executemany upsert): the newest body and time per node, an
    operator's quarantine untouched, nodes the store does not know left out."""
    rows = [{"id": n, "labels": {"fleet": "t"}, "key_fingerprint": f"{i:064x}",
             "cert_serial": f"{i + 1:x}", "cert_expiry": NOW, "status": "online",
             "created": NOW, "last_seen": NOW} for i, n in enumerate(("ha", "hb"))]
    await store.add_simulated_nodes(rows)
    first, second = NOW + timedelta(seconds=15), NOW + timedelta(seconds=30)
    await store.write_health({"ha": ({"cpu": 1.0}, first), "hb": ({"cpu": 2.0}, first),
                              "ghost": ({"cpu": 3.0}, first)})
    await store.set_quarantine("hb", "bad firmware", actor="op")
    await store.write_health({"hb": ({"cpu": 4.0, "disk_free": 5}, second),
                              "ghost": ({"cpu": 6.0}, second)})
    page = {r.node.id: (r.health, r.health_at, r.quarantine) for r in await store.fleet_page()}
    assert page == {"ha": ({"cpu": 1.0}, first, None),
                    "hb": ({"cpu": 4.0, "disk_free": 5}, second, "bad firmware")}
    assert await store.quarantines(["ha", "hb", "ghost"]) == {"hb": "bad firmware"}
