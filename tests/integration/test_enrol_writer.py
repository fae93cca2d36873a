"""Grouped enrolment writes (issue 11): `Store.enrol_nodes` and `cloud.enrolments.EnrolWriter`.

A group is one transaction with a savepoint per enrolment: a refused enrolment (token used up,
key already enrolled, node id taken) fails alone and the others are stored. A group whose
transaction fails as a whole (here: the store's one write connection held past ``store_wait``)
fails its own enrolments, not the next group's. Real stores (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cloud.enrolments import EnrolWriter
from edgewise.cloud.store import KeyInUse, Store, database_url
from edgewise.cloud.store.identity import EnrolRequest
from edgewise.cloud.store.records import NodeInfo
from edgewise.errors import StorageError
from edgewise.security.pki import CertificateAuthority, IssuedCert, make_csr
from edgewise.security.tokens import EnrolmentToken, TokenUsedUp

NOW = datetime.now(UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return str(request.getfixturevalue("postgres"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"),
                                       now=NOW - timedelta(days=1))


def issue(ca: CertificateAuthority, node_id: str,
          key: ec.EllipticCurvePrivateKey | None = None) -> IssuedCert:
    return ca.sign_node_csr(make_csr(key or ec.generate_private_key(ec.SECP256R1())), node_id)


async def token(store: Store, uses: int) -> str:
    _plain, record = EnrolmentToken.issue({"site": "s1"}, timedelta(hours=1), uses, now=NOW)
    await store.add_enrolment_token(record, now=NOW)
    return record.hash


async def test_a_refused_enrolment_in_a_group_fails_alone(store_url: str,
                                                          ca: CertificateAuthority) -> None:
    async with Store(store_url) as store:
        many, once = await token(store, 5), await token(store, 1)
        await store.enrol_node(once, "node-before", issue(ca, "node-before"))  # uses it up
        key = ec.generate_private_key(ec.SECP256R1())
        results = await store.enrol_nodes([
            EnrolRequest(many, "node-a", issue(ca, "node-a", key)),
            EnrolRequest(many, "node-b", issue(ca, "node-b", key)),  # the same key again
            EnrolRequest(once, "node-c", issue(ca, "node-c")),  # token used up
            EnrolRequest(many, "node-d", issue(ca, "node-d")),
            EnrolRequest(many, "node-a", issue(ca, "node-a")),  # id taken (in this group)
            EnrolRequest(many, "node-e", issue(ca, "node-e")),
        ])
        kinds = [type(r).__name__ for r in results]
        assert kinds == ["NodeInfo", "KeyInUse", "TokenUsedUp", "NodeInfo", "StorageError",
                         "NodeInfo"]
        assert isinstance(results[1], KeyInUse) and isinstance(results[2], TokenUsedUp)
        assert [n.id for n in await store.list_nodes()] == [
            "node-a", "node-before", "node-d", "node-e"]
        # the refused ones used nothing: 5 - 3 stored = 2 uses left on the many-use token
        assert sorted(t.uses_left for t in await store.list_enrolment_tokens(
            now=NOW, include_spent=True)) == [0, 2]
        audit = [a.target for a in await store.list_audit() if a.action == "node.enrol"]
        assert sorted(audit) == ["node:node-a", "node:node-before", "node:node-d",
                                 "node:node-e"]


async def test_a_group_that_cannot_reach_the_store_fails_only_its_own_enrolments(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    async with Store(database_url(None, tmp_path), wait=0.3) as store:
        many = await token(store, 10)
        writer = EnrolWriter(store)
        try:
            hold = asyncio.Event()
            held = asyncio.Event()

            async def hold_the_writer_connection() -> None:
                async with store._tx():  # the one write connection, past the 0.3 s wait
                    held.set()
                    await hold.wait()

            holder = asyncio.create_task(hold_the_writer_connection())
            await held.wait()
            first = [asyncio.create_task(writer.enrol(EnrolRequest(many, f"node-{i}",
                                                                   issue(ca, f"node-{i}"))))
                     for i in range(3)]
            done = await asyncio.gather(*first, return_exceptions=True)
            assert all(isinstance(r, StorageError) and "QueuePool" in str(r) for r in done)
            hold.set()
            await holder
            later = await asyncio.gather(*(writer.enrol(EnrolRequest(
                many, f"node-{i}", issue(ca, f"node-{i}"))) for i in range(3, 6)))
            assert [n.id for n, _root in later] == ["node-3", "node-4", "node-5"]
            assert all(isinstance(n, NodeInfo) for n, _ in later)
            assert (writer.failures, writer.groups) == (1, 1)
            assert [n.id for n in await store.list_nodes()] == ["node-3", "node-4", "node-5"]
        finally:
            await writer.close()


async def test_admission_bounds_the_enrolments_waiting_and_says_when_to_retry(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    async with Store(database_url(None, tmp_path)) as store:
        many = await token(store, 100)
        writer = EnrolWriter(store, max_group=4, max_pending=8, target_wait=1.0)
        try:
            assert writer.limit() == 4  # no rate measured yet: one group
            waiting = [asyncio.create_task(writer.enrol(EnrolRequest(
                many, f"node-{i}", issue(ca, f"node-{i}")))) for i in range(4)]
            await asyncio.sleep(0)
            assert (len(writer), writer.retry_after() >= 1.0, writer.refused) == (4, True, 1)
            await asyncio.gather(*waiting)
            assert (len(writer), writer.retry_after(), writer.refused) == (0, 0.0, 1)
            writer.rate = 1000.0  # measured: 1,000 a second -> at most max_pending wait
            assert writer.limit() == 8
            writer.rate = 2.0
            assert writer.limit() == 4  # never below one group
        finally:
            await writer.close()
