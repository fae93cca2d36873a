"""Nodes' TPMs and their attestation verdicts (part of `Store`; docs/security.md,
"Hardware-rooted trust").

``node_tpm`` holds, per TPM node, the EK fingerprint (unique: a TPM enrols one node, Keylime's
lesson about one identity reused from another TPM), the AK and node-key public areas every
later quote and binding is checked against, and the newest verdict of the verifier
(`edgewise.cloud.attestation.verifier.Verdict.to_json`).

`quarantines` and `attestations` read, for many nodes in one query each, what quarantine
enforcement and the operator views need: the quarantine reason (``node_health``, set by
`FleetStore.set_quarantine`) and whether the node has a TPM (``tpm``) or not (``none``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, any_, bindparam, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError

from edgewise.cloud.store.db import Database, RawStatement, utc_now
from edgewise.cloud.store.models import EnrolmentTokenRow, NodeHealthRow, NodeTpmRow
from edgewise.errors import PeerError


class TpmInUse(PeerError):
    """The TPM (its EK) is already enrolled as another node."""

    status = 409


@dataclass(frozen=True)
class TpmRecord:
    node_id: str
    ek_fingerprint: str
    ak_public: bytes
    node_key_public: bytes
    verdict: dict[str, Any] | None


class TpmStore(Database):
    """Nodes' TPMs (part of `Store`)."""

    async def register_tpm(self, node_id: str, ek_fingerprint: str, ak_public: bytes,
                           node_key_public: bytes, *, now: datetime | None = None) -> None:
        """Record the TPM a node enrolled with; the same node again replaces its keys (a retry
        of the enrolment); `TpmInUse` when the EK belongs to another node."""
        async with self._tx() as conn:
            row = (await conn.execute(select(NodeTpmRow.node_id).where(
                NodeTpmRow.ek_fingerprint == ek_fingerprint))).first()
            if row is not None and row.node_id != node_id:
                raise TpmInUse("this TPM is already enrolled as another node; revoke that "
                               "node first")
            values = {"ek_fingerprint": ek_fingerprint, "ak_public": ak_public,
                      "node_key_public": node_key_public}
            ins = self._insert(NodeTpmRow).values(node_id=node_id, created=utc_now(now),
                                                  **values)
            try:
                await conn.execute(ins.on_conflict_do_update(
                    index_elements=[NodeTpmRow.node_id], set_=values))
            except IntegrityError:  # a concurrent enrolment took the EK
                raise TpmInUse("this TPM is already enrolled as another node") from None

    async def tpm_of(self, node_id: str) -> TpmRecord | None:
        async with self._tx() as conn:
            r = (await conn.execute(select(
                NodeTpmRow.node_id, NodeTpmRow.ek_fingerprint, NodeTpmRow.ak_public,
                NodeTpmRow.node_key_public, NodeTpmRow.verdict,
            ).where(NodeTpmRow.node_id == node_id))).first()
        if r is None:
            return None
        return TpmRecord(r.node_id, r.ek_fingerprint, r.ak_public, r.node_key_public,
                         r.verdict)

    async def record_verdict(self, node_id: str, verdict: dict[str, Any], *,
                             now: datetime | None = None) -> None:
        async with self._tx() as conn:
            await conn.execute(update(NodeTpmRow).where(NodeTpmRow.node_id == node_id)
                               .values(verdict=verdict, attested_at=utc_now(now)))

    async def quarantines(self, node_ids: Sequence[str]) -> dict[str, str]:
        """``{node: reason}`` of the quarantined ones among ``node_ids`` (one query)."""
        if not node_ids:
            return {}
        if self.dialect == "sqlite":  # one hand-off, one lookup each (a session's hello)
            stmt = self._raw_quarantine()
            ids = list(node_ids)

            def read(conn: sqlite3.Connection) -> dict[str, str]:
                found = {}
                for node_id in ids:
                    row = conn.execute(stmt.sql, (node_id,)).fetchone()
                    if row is not None and row[0] is not None:
                        found[node_id] = row[0]
                return found

            return await self._sqlite_tx(read, write=False)
        many = self._raw_quarantines()
        rows = await self._pg_read(lambda conn: conn.fetch(many.sql, list(node_ids)),
                                   snapshot=False)
        return {r[0]: r[1] for r in rows}

    def _raw_quarantine(self) -> RawStatement:
        raw: RawStatement | None = getattr(self, "_raw_quarantine_stmt", None)
        if raw is None:
            raw = self._raw_quarantine_stmt = self.raw_statement(
                select(NodeHealthRow.quarantine).where(
                    NodeHealthRow.node_id == bindparam("node_id")), ())
        return raw

    def _raw_quarantines(self) -> RawStatement:
        """(PostgreSQL) the quarantined ones among an array of node ids."""
        raw: RawStatement | None = getattr(self, "_raw_quarantines_stmt", None)
        if raw is None:
            raw = self._raw_quarantines_stmt = self.raw_statement(
                select(NodeHealthRow.node_id, NodeHealthRow.quarantine).where(
                    NodeHealthRow.node_id == any_(bindparam("ids", type_=ARRAY(String))),
                    NodeHealthRow.quarantine.is_not(None)), ())
        return raw

    async def attestations(self, node_ids: Sequence[str]) -> dict[str, str]:
        """``{node: "tpm" | "none"}`` for each of ``node_ids`` (one query)."""
        if not node_ids:
            return {}
        async with self._tx(write=False) as conn:
            tpm = {r.node_id for r in (await conn.execute(
                select(NodeTpmRow.node_id).where(NodeTpmRow.node_id.in_(list(node_ids))))).all()}
        return {n: "tpm" if n in tpm else "none" for n in node_ids}

    async def token_labels(self, token_hash: str) -> dict[str, str] | None:
        """The labels an enrolment token gives its nodes (None: no such token), for the
        attestation policy's selectors at enrolment."""
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(EnrolmentTokenRow.labels).where(
                EnrolmentTokenRow.hash == token_hash))).first()
        return None if row is None else dict(row.labels or {})

    async def attested_at(self, node_ids: Sequence[str]) -> dict[str, datetime]:
        """``{node: time of its newest verdict, or of its enrolment before any}`` of the TPM
        nodes among ``node_ids`` (at most 1,000; one query)."""
        if not node_ids:
            return {}
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(
                NodeTpmRow.node_id, NodeTpmRow.attested_at, NodeTpmRow.created).where(
                NodeTpmRow.node_id.in_(list(node_ids))))).all()
        return {r.node_id: r.attested_at or r.created for r in rows}
