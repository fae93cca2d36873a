"""Writers of many node rows lock them in id order, as the bulk desired-state write does
(`Store.update_desired_states`), so two of them never deadlock on PostgreSQL. Found at 10,000
nodes over two control-plane processes (issue 11): a selector push answered 503 "deadlock
detected" while the last-seen flush (`Store.touch_nodes`) of the other process updated the same
rows in the order the heartbeats came. Here a transaction holds node ``a`` and then wants ``b``
(what a bulk writer does); the flush of ``b`` and ``a`` runs between: in arrival order it takes
``b`` and waits for ``a``, and PostgreSQL aborts one of the two."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cloud.store import Store
from edgewise.cloud.store.notify import listen_dsn
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken

pytestmark = pytest.mark.asyncio


async def test_the_last_seen_flush_does_not_deadlock_with_a_bulk_writer(
        tmp_path: Path, postgres: str) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    async with Store(postgres) as store:
        for n in ("a", "b"):
            _p, tok = EnrolmentToken.issue({}, timedelta(hours=1), 1)
            await store.add_enrolment_token(tok)
            key = ec.generate_private_key(ec.SECP256R1())
            await store.enrol_node(tok.hash, n, ca.sign_node_csr(make_csr(key), n))
        dsn = listen_dsn(postgres)
        bulk = await asyncpg.connect(dsn)
        try:
            tx = bulk.transaction()
            await tx.start()
            await bulk.execute("SELECT id FROM nodes WHERE id = 'a' FOR UPDATE")
            now = datetime.now(UTC)
            flush = asyncio.create_task(store.touch_nodes({"b": now, "a": now}))
            await asyncio.sleep(0.5)  # the flush has locked what it could and waits
            await bulk.execute("SELECT id FROM nodes WHERE id = 'b' FOR UPDATE")
            await tx.commit()
            await asyncio.wait_for(flush, 10)  # no deadlock: it went on once `a` was free
        finally:
            await bulk.close()
        assert [(await store.get_node(n)).last_seen for n in ("a", "b")] == [now, now]
