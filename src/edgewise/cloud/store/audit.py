"""The store, who did what: operator tokens and the audit log.

`write_audit` appends one entry inside a caller's transaction, so the other concerns audit a
change in the same transaction as the change itself (enrolment, labels, revocation, each
desired version, setpoint writes).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from edgewise.cloud.store.db import Database, utc_now
from edgewise.cloud.store.models import AuditRow, OperatorTokenRow
from edgewise.cloud.store.records import AuditEntry, OperatorTokenInfo
from edgewise.security.tokens import OperatorToken


async def write_audit(conn: AsyncConnection, t: datetime, actor: str, action: str, target: str,
                      detail: Mapping[str, Any]) -> None:
    """One audit entry, in the transaction of ``conn``."""
    await conn.execute(insert(AuditRow).values(ts=t, actor=actor, action=action,
                                               target=target, detail=dict(detail)))


class AuditStore(Database):
    """Operator tokens and the audit log (part of `Store`)."""

    # -- operator tokens ----------------------------------------------------------------------
    async def add_operator_token(self, token: OperatorToken, *, actor: str = "system",
                                 now: datetime | None = None) -> None:
        t = utc_now(now)
        async with self._tx() as conn:
            await conn.execute(insert(OperatorTokenRow).values(
                hash=token.hash, name=token.name, role=token.role.value, created=t,
                expires_at=token.expires_at, revoked=False))
            await write_audit(conn, t, actor, "token.create", f"operator-token:{token.name}",
                              {"role": token.role.value, "hash": token.hash[:12]})

    async def replace_operator_tokens(self, token: OperatorToken, *, actor: str,
                                      reason: str = "", now: datetime | None = None) -> int:
        """Revoke every live token with ``token``'s name and role and add ``token``, in one
        transaction, audited as ``token.replace``; how many were revoked (the offline recovery
        of the admin token, ``edgewise cloud admin-token``)."""
        t = utc_now(now)
        same = (OperatorTokenRow.name == token.name, OperatorTokenRow.role == token.role.value,
                OperatorTokenRow.revoked.is_(False))
        async with self._tx() as conn:
            old = [r.hash for r in (await conn.execute(
                select(OperatorTokenRow.hash).where(*same))).all()]
            if old:
                await conn.execute(update(OperatorTokenRow).where(*same).values(revoked=True))
            await conn.execute(insert(OperatorTokenRow).values(
                hash=token.hash, name=token.name, role=token.role.value, created=t,
                expires_at=token.expires_at, revoked=False))
            await write_audit(conn, t, actor, "token.replace", f"operator-token:{token.name}",
                              {"role": token.role.value, "hash": token.hash[:12],
                               "revoked": [h[:12] for h in old], "reason": reason})
        return len(old)

    async def get_operator_token(self, token_hash: str) -> OperatorToken | None:
        """The token with this hash, or None if unknown or revoked (expiry: `authorize`)."""
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(OperatorTokenRow).where(
                OperatorTokenRow.hash == token_hash, OperatorTokenRow.revoked.is_(False)))).first()
        return OperatorToken(row.hash, row.name, row.role, row.expires_at) if row else None

    async def list_operator_tokens(self) -> list[OperatorTokenInfo]:
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(
                select(OperatorTokenRow).order_by(OperatorTokenRow.created))).all()
        return [OperatorTokenInfo(r.hash[:12], r.name, r.role, r.created, r.expires_at,
                                  bool(r.revoked)) for r in rows]

    async def revoke_operator_token(self, token_hash: str, *, actor: str,
                                    now: datetime | None = None) -> bool:
        t = utc_now(now)
        async with self._tx() as conn:
            res = await conn.execute(update(OperatorTokenRow).where(
                OperatorTokenRow.hash == token_hash).values(revoked=True))
            if res.rowcount == 1:
                await write_audit(conn, t, actor, "token.revoke", "operator-token",
                                  {"hash": token_hash[:12]})
        return res.rowcount == 1

    # -- audit --------------------------------------------------------------------------------
    async def audit(self, actor: str, action: str, target: str,
                    detail: Mapping[str, Any] | None = None, *,
                    now: datetime | None = None) -> None:
        """Append one entry to the audit log (every mutating operator call writes one)."""
        async with self._tx() as conn:
            await write_audit(conn, utc_now(now), actor, action, target, detail or {})

    async def list_audit(self, *, target: str | None = None, actor: str | None = None,
                         limit: int = 100, before_id: int | None = None) -> list[AuditEntry]:
        """Newest first; page with ``before_id`` (the smallest id of the previous page)."""
        q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if target is not None:
            q = q.where(AuditRow.target == target)
        if actor is not None:
            q = q.where(AuditRow.actor == actor)
        if before_id is not None:
            q = q.where(AuditRow.id < before_id)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [AuditEntry(r.id, r.ts, r.actor, r.action, r.target, dict(r.detail or {}))
                for r in rows]
