"""The group commit on SQLite runs in one hand-off to the write connection's thread, with the
statements compiled once for the driver (`Database._sqlite_tx`, `chunks._RawIngest`). What it
stores must be exactly what the SQLAlchemy path stores (that path still serves a commit with a
``fence``, and PostgreSQL): the same rows, byte for byte, in the same tables."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import AsyncConnection

from edgewise.cloud.store import Store, database_url
from edgewise.cloud.store.db import DB_FILE
from edgewise.cloud.store.records import ChunkWrite, GapWrite, MarkWrite, SeqRange
from edgewise.errors import StorageError
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


async def _no_fence(_conn: AsyncConnection) -> None:
    """A fence that lets everything through: it makes commit_ingest take the SQLAlchemy path."""


def _rows(folder: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(folder / DB_FILE) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall()
                for t in ("chunks", "gaps", "streams")}


async def _commits(store: Store, fenced: bool) -> list[tuple[int, int, int]]:
    fence = _no_fence if fenced else None
    out = []
    for chunks, gaps, marks in (
        ([ChunkWrite("n1", "raw", 0, 10, 10, False, b"\x00a", T0),
          ChunkWrite("n1", "raw", 10, 5, 4, True, b"b", T0 + timedelta(seconds=1)),
          ChunkWrite("n2", "alarms", 0, 2, 2, False, b"c", T0, quarantined=True)],
         [], [MarkWrite("n1", "raw", 15, T0), MarkWrite("n2", "alarms", 2, T0)]),
        ([ChunkWrite("n1", "raw", 10, 5, 5, False, b"again", T0),  # stored already: skipped
          ChunkWrite("n1", "raw", 20, 3, 3, False, b"d", T0 + timedelta(seconds=2))],
         [GapWrite("n1", "raw", 15, 5, "outbox full", T0)], [MarkWrite("n1", "raw", 12, T0)]),
        ([], [GapWrite("n1", "raw", 15, 5, "twice", T0)], []),
    ):
        res = await store.commit_ingest(chunks, gaps, marks, fence=fence)
        out.append((len(res.chunks), len(res.gaps), res.records))
    return out


async def test_one_handoff_commit_stores_what_the_sqlalchemy_path_stores(
        tmp_path: Path) -> None:
    results = {}
    for path in ("one_handoff", "sqlalchemy"):
        async with Store(database_url(None, tmp_path / path)) as store:
            results[path] = await _commits(store, fenced=path == "sqlalchemy")
    assert results["one_handoff"] == results["sqlalchemy"] == [(3, 0, 16), (1, 1, 3), (0, 0, 0)]
    fast, reference = _rows(tmp_path / "one_handoff"), _rows(tmp_path / "sqlalchemy")
    assert fast == reference
    assert [len(fast[t]) for t in ("chunks", "gaps", "streams")] == [4, 1, 2]


async def test_a_failed_one_handoff_commit_stores_nothing(tmp_path: Path) -> None:
    async with Store(database_url(None, tmp_path)) as store:
        naive = datetime(2026, 3, 1, 12, 0, 0)  # refused by the column type, mid-transaction
        with pytest.raises((StorageError, ValueError)):
            await store.commit_ingest(
                [ChunkWrite("n1", "raw", 0, 1, 1, False, b"a", T0),
                 ChunkWrite("n1", "raw", 1, 1, 1, False, b"b", naive)], [], [])
        assert await store.read_chunks("n1", "raw") == []
        res = await store.commit_ingest([ChunkWrite("n1", "raw", 0, 1, 1, False, b"a", T0)],
                                        [], [MarkWrite("n1", "raw", 1, T0)])
        assert res.records == 1  # the connection is usable again


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return str(request.getfixturevalue("postgres"))


async def test_session_start_reads_what_the_separate_reads_read(store_url: str,
                                                                tmp_path: Path) -> None:
    """A hello's reads in one transaction (one hand-off on SQLite): the same marks, ranges
    above them and desired version as `load_streams`, `settled_above`, `desired_version`."""
    ca = CertificateAuthority.create(tmp_path / "ca", now=T0 - timedelta(days=1))
    async with Store(store_url) as store:
        assert await store.session_start("n1") == ({}, 0)
        _plain, token = EnrolmentToken.issue({"site": "s"}, timedelta(days=3650), 1, now=T0)
        await store.add_enrolment_token(token, now=T0)
        key = ec.generate_private_key(ec.SECP256R1())
        await store.enrol_node(token.hash, "n1", ca.sign_node_csr(make_csr(key), "n1"))
        for i in range(3):
            await store.put_desired_state("n1", config={"i": i}, actor="op:test")
        await store.commit_ingest(
            [ChunkWrite("n1", "raw", 0, 10, 10, False, b"a", T0),
             ChunkWrite("n1", "raw", 30, 5, 5, False, b"b", T0),  # above the mark
             ChunkWrite("n1", "raw", 20, 2, 2, False, b"c", T0),
             ChunkWrite("n1", "alarms", 0, 3, 3, False, b"d", T0),
             ChunkWrite("n2", "raw", 50, 1, 1, False, b"e", T0)],  # another node
            [GapWrite("n1", "raw", 12, 3, "lost", T0)],
            [MarkWrite("n1", "raw", 10, T0), MarkWrite("n1", "alarms", 3, T0)])
        streams, version = await store.session_start("n1")
        assert streams == {"raw": (10, [SeqRange(12, 3, gap=True), SeqRange(20, 2),
                                        SeqRange(30, 5)]),
                           "alarms": (3, [])}
        assert version == await store.desired_version("n1") == 3
        separate = {name: (info.contiguous,
                           await store.settled_above("n1", name, info.contiguous))
                    for name, info in (await store.load_streams("n1")).items()}
        assert streams == separate


async def test_a_node_and_its_quarantine_read_in_one_handoff_are_what_the_sqlalchemy_path_reads(
        store_url: str, tmp_path: Path) -> None:
    """`get_node` and `quarantines` (every session upgrade and hello reads them; one hand-off
    on SQLite, with SQLAlchemy's result processing) give what the SQLAlchemy path gives: labels,
    aware datetimes, flags, a decommissioned node's fields, a quarantine's reason."""
    ca = CertificateAuthority.create(tmp_path / "ca", now=T0 - timedelta(days=1))
    async with Store(store_url) as store:
        assert await store.get_node("n1") is None
        assert await store.quarantines(["n1"]) == {}
        _plain, token = EnrolmentToken.issue({"site": "s"}, timedelta(days=3650), 2, now=T0)
        await store.add_enrolment_token(token, now=T0)
        for n in ("n1", "n2"):
            key = ec.generate_private_key(ec.SECP256R1())
            await store.enrol_node(token.hash, n, ca.sign_node_csr(make_csr(key), n))
        await store.set_node_labels("n1", {"site": "s", "line": "3"}, actor="op:test")
        gone = await store.decommission_node("n2", wipe=True, reason="sold", actor="op:test",
                                             now=T0 + timedelta(hours=1))  # SQLAlchemy's read
        await store.set_quarantine("n1", "quote failed", actor="op:test")
        node = await store.get_node("n1")
        assert node is not None and node.labels == {"site": "s", "line": "3"}
        assert node.revoked is False and node.wipe is False and node.decommissioned_at is None
        assert node.created.tzinfo is not None and node.cert_expiry.tzinfo is not None
        assert await store.get_node("n2") == gone
        assert gone.decommissioned_at == T0 + timedelta(hours=1) and gone.wipe is True
        assert await store.quarantines(["n1", "n2", "n3"]) == {"n1": "quote failed"}
