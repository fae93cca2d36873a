"""Re-authentication nonces in the store (part of `Store`): shared by every control-plane
process of one database, so a node may take its challenge from any of them (issue 11,
scale-out).

`issue_nonce` deletes the expired ones, refuses when ``limit`` are outstanding (the endpoint
needs no certificate: the table must not grow with a flood), and stores a new random nonce for
a node; `take_nonce` uses one up in one statement (DELETE ... RETURNING): it is valid once, for
the node it was issued to, until it expires.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select

from edgewise.cloud.store.db import Database, utc_now
from edgewise.cloud.store.models import ReauthNonce
from edgewise.errors import StorageError

NONCE_BYTES = 32


class NonceStore(Database):
    """Re-authentication nonces (module docstring)."""

    async def issue_nonce(self, node_id: str, ttl: float, *, limit: int,
                          now: datetime | None = None) -> bytes:
        """A new nonce for ``node_id``, valid ``ttl`` seconds. `StorageError` when ``limit``
        are outstanding."""
        t = utc_now(now)
        nonce = secrets.token_bytes(NONCE_BYTES)
        async with self._tx() as conn:
            await conn.execute(delete(ReauthNonce).where(ReauthNonce.expires_at <= t))
            outstanding = (await conn.execute(
                select(func.count()).select_from(ReauthNonce))).scalar_one()
            if outstanding >= limit:
                raise StorageError("too many pending re-authentication challenges; retry later")
            await conn.execute(self._insert(ReauthNonce).values(
                nonce=nonce, node_id=node_id, expires_at=t + timedelta(seconds=ttl)))
        return nonce

    async def take_nonce(self, nonce: bytes, node_id: str, *,
                         now: datetime | None = None) -> bool:
        """Use ``nonce`` up: True if it was issued to ``node_id`` and has not expired (it is
        gone either way)."""
        t = utc_now(now)
        async with self._tx() as conn:
            row = (await conn.execute(delete(ReauthNonce).where(ReauthNonce.nonce == nonce)
                                      .returning(ReauthNonce.node_id,
                                                 ReauthNonce.expires_at))).first()
        return row is not None and row[0] == node_id and row[1] > t
