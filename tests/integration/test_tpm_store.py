"""The store's TPM table on SQLite and PostgreSQL: one TPM one node, a retry replaces the keys,
verdicts kept, concurrent enrolments of one TPM: exactly one wins."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cloud.store import Store, database_url
from edgewise.cloud.store.tpm import TpmInUse
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return request.getfixturevalue("postgres")


async def nodes(store: Store, tmp_path: Path, n: int) -> list[str]:
    ca = CertificateAuthority.create(tmp_path / "ca", now=NOW - timedelta(days=1))
    ids = []
    for i in range(n):
        _plain, record = EnrolmentToken.issue({"site": "p"}, timedelta(hours=1), 1, now=NOW)
        await store.add_enrolment_token(record, now=NOW)
        issued = ca.sign_node_csr(make_csr(ec.generate_private_key(ec.SECP256R1())),
                                  f"n{i}", now=NOW)
        await store.enrol_node(record.hash, f"n{i}", issued, now=NOW)
        ids.append(f"n{i}")
    return ids


async def test_one_tpm_one_node_and_verdicts(store_url: str, tmp_path: Path) -> None:
    async with Store(store_url) as store:
        n0, n1, n2 = await nodes(store, tmp_path, 3)
        assert await store.tpm_of(n0) is None
        await store.register_tpm(n0, "e" * 64, b"ak", b"nk", now=NOW)
        await store.register_tpm(n0, "e" * 64, b"ak2", b"nk2", now=NOW)  # a retry: replaced
        record = await store.tpm_of(n0)
        assert (record.ek_fingerprint, record.ak_public, record.node_key_public,
                record.verdict) == ("e" * 64, b"ak2", b"nk2", None)
        with pytest.raises(TpmInUse, match="already enrolled as another node"):
            await store.register_tpm(n1, "e" * 64, b"ak", b"nk", now=NOW)
        verdict = {"node_id": n0, "quarantined": True, "reason": "r"}
        await store.record_verdict(n0, verdict, now=NOW)
        assert (await store.tpm_of(n0)).verdict == verdict
        assert await store.tpm_of(n1) is None
        # two nodes enrolling the same TPM at once: exactly one is registered
        results = await asyncio.gather(
            store.register_tpm(n1, "f" * 64, b"a", b"k", now=NOW),
            store.register_tpm(n2, "f" * 64, b"a", b"k", now=NOW), return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["NoneType", "TpmInUse"]
        owners = [n for n in (n1, n2) if await store.tpm_of(n) is not None]
        assert len(owners) == 1
