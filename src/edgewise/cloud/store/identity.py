"""The store, who may be a node: enrolment tokens, nodes (identity, labels, status) and
revocations (certificate serials and key fingerprints).

One key is one node: `enrol_node` (and `enrol_nodes`, many in one transaction, one savepoint
each) refuses a key already registered for another node (`KeyInUse`, 409), in the transaction
that uses the token, so the refused request does not use the token up.

Enrolment is idempotent per key and token: a node remembers the token it enrolled with (its
hash), and `enrolment_of` finds the node a key enrolled as with a token, while that token has
not expired. The device API answers such a retry (an enrolment whose answer was lost) with
that node and a fresh certificate (`enrol_again`), instead of refusing the used-up token and
leaving the node orphaned; another key with that token is still refused."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select, type_coerce, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from edgewise.cloud.store.audit import write_audit
from edgewise.cloud.store.db import Database, RawStatement, utc_now
from edgewise.cloud.store.models import EnrolmentTokenRow, Node, Revocation
from edgewise.cloud.store.records import EnrolmentTokenInfo, NodeInfo
from edgewise.errors import ConfigError, EdgewiseError, PeerError, StorageError
from edgewise.security.pki import IssuedCert, validate_node_id
from edgewise.security.tls import RevocationList
from edgewise.security.tokens import (
    EnrolmentToken,
    TokenExpired,
    TokenInvalid,
    TokenUsedUp,
    validate_labels,
)


class KeyInUse(PeerError):
    """The CSR's key is already registered for a node (HTTP 409)."""

    status = 409


@dataclass(frozen=True)
class EnrolRequest:
    """One enrolment for `IdentityStore.enrol_nodes`: the token's hash, the new node's id and
    its first certificate."""

    token_hash: str
    node_id: str
    issued: IssuedCert


def new_node_id() -> str:
    """A fresh random node id (``node-`` and 12 hex digits)."""
    return f"node-{secrets.token_hex(6)}"


def _node_info(row: Any) -> NodeInfo:
    return NodeInfo(
        id=row.id, labels=dict(row.labels or {}), key_fingerprint=row.key_fingerprint,
        cert_serial=int(row.cert_serial, 16), cert_expiry=row.cert_expiry, status=row.status,
        created=row.created, last_seen=row.last_seen, revoked=bool(row.revoked),
        decommissioned_at=row.decommissioned_at, decommissioned_by=row.decommissioned_by,
        wipe=bool(row.wipe),
    )


class IdentityStore(Database):
    """Enrolment tokens, nodes and revocations (part of `Store`)."""

    # -- enrolment tokens ---------------------------------------------------------------------
    async def add_enrolment_token(self, token: EnrolmentToken, *, now: datetime | None = None
                                  ) -> None:
        async with self._tx() as conn:
            await conn.execute(insert(EnrolmentTokenRow).values(
                hash=token.hash, labels=dict(token.labels), expires_at=token.expires_at,
                uses_left=token.uses_left, created=utc_now(now)))

    async def _consume_token(self, conn: AsyncConnection, token_hash: str, now: datetime
                             ) -> dict[str, str]:
        # One conditional UPDATE: two nodes racing for a single-use token cannot both win.
        result = await conn.execute(
            update(EnrolmentTokenRow)
            .where(EnrolmentTokenRow.hash == token_hash, EnrolmentTokenRow.uses_left > 0,
                   EnrolmentTokenRow.expires_at > now)
            .values(uses_left=EnrolmentTokenRow.uses_left - 1)
        )
        row = (await conn.execute(
            select(EnrolmentTokenRow.labels, EnrolmentTokenRow.expires_at,
                   EnrolmentTokenRow.uses_left).where(EnrolmentTokenRow.hash == token_hash)
        )).first()
        if result.rowcount == 1 and row is not None:
            return dict(row.labels or {})
        if row is None:
            raise TokenInvalid("unknown enrolment token")
        if row.expires_at <= now:
            raise TokenExpired(
                f"enrolment token expired at {row.expires_at:%Y-%m-%d %H:%M:%S %Z}; create a "
                "new one with `edgewise cloud token create`"
            )
        raise TokenUsedUp(
            "enrolment token has been used up; create a new one with `edgewise cloud token create`"
        )

    async def use_enrolment_token(self, token_hash: str, *, now: datetime | None = None
                                  ) -> dict[str, str]:
        """Use one use of a token atomically; its labels. Raises `TokenInvalid`,
        `TokenExpired`, `TokenUsedUp` (nothing changes then)."""
        async with self._tx() as conn:
            return await self._consume_token(conn, token_hash, utc_now(now))

    async def list_enrolment_tokens(self, *, now: datetime | None = None,
                                    include_spent: bool = False) -> list[EnrolmentTokenInfo]:
        t = utc_now(now)
        q = select(EnrolmentTokenRow).order_by(EnrolmentTokenRow.created)
        if not include_spent:
            q = q.where(EnrolmentTokenRow.uses_left > 0, EnrolmentTokenRow.expires_at > t)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [EnrolmentTokenInfo(r.hash[:12], dict(r.labels), r.expires_at, r.uses_left,
                                   r.created) for r in rows]

    async def purge_enrolment_tokens(self, *, now: datetime | None = None) -> int:
        """Delete expired and used-up tokens; how many."""
        async with self._tx() as conn:
            res = await conn.execute(delete(EnrolmentTokenRow).where(or_(
                EnrolmentTokenRow.uses_left <= 0, EnrolmentTokenRow.expires_at <= utc_now(now))))
        return res.rowcount

    # -- nodes --------------------------------------------------------------------------------
    async def enrol_node(self, token_hash: str, node_id: str, issued: IssuedCert, *,
                         now: datetime | None = None) -> NodeInfo:
        """Use the token and register the node with its first certificate, in one transaction.

        The node gets the token's labels. Raises the token errors, `KeyInUse` if the key is
        already registered for a node (the token is not used then), or `StorageError` if the
        node id is taken (ids are random; retry with a new one).
        """
        validate_node_id(node_id)
        result = (await self.enrol_nodes([EnrolRequest(token_hash, node_id, issued)],
                                         now=now))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def enrol_nodes(self, requests: Sequence[EnrolRequest], *,
                          now: datetime | None = None) -> list[NodeInfo | EdgewiseError]:
        """Several enrolments in ONE transaction (`cloud.enrolments.EnrolWriter` groups them),
        each in its own savepoint: per request its `NodeInfo`, or the error that refused it
        alone (token errors, `KeyInUse`, `StorageError` for a taken node id, `InvalidNodeId`
        for a malformed id), which changed nothing. Raises `StorageError` if the transaction itself
        fails (then nothing is stored)."""
        t = utc_now(now)
        out: list[NodeInfo | EdgewiseError] = []
        async with self._tx() as conn:
            for r in requests:
                try:
                    validate_node_id(r.node_id)
                    async with conn.begin_nested():
                        labels = await self._consume_token(conn, r.token_hash, t)
                        await self._key_is_free(conn, r.issued.fingerprint)
                        await conn.execute(insert(Node).values(
                            id=r.node_id, labels=labels, key_fingerprint=r.issued.fingerprint,
                            cert_serial=f"{r.issued.serial:x}", cert_expiry=r.issued.not_after,
                            status="enrolled", created=t, last_seen=None, revoked=False,
                            enrol_token=r.token_hash))
                        await write_audit(conn, t, f"node:{r.node_id}", "node.enrol",
                                          f"node:{r.node_id}",
                                          {"labels": labels, "serial": f"{r.issued.serial:x}",
                                           "token": r.token_hash[:12]})
                except IntegrityError:
                    out.append(StorageError(f"node id {r.node_id} is already taken"))
                except (PeerError, ConfigError) as exc:  # token errors, KeyInUse, a bad id
                    out.append(exc)
                else:
                    out.append(NodeInfo(r.node_id, labels, r.issued.fingerprint, r.issued.serial,
                                        r.issued.not_after, "enrolled", t, None, False))
        return out

    async def enrolment_of(self, token_hash: str, fingerprint: str, *,
                           now: datetime | None = None) -> NodeInfo | None:
        """The node the key ``fingerprint`` enrolled as with the token ``token_hash``, if it
        did and the token has not expired (nor been deleted) since; else None."""
        q = (select(Node).join(EnrolmentTokenRow, EnrolmentTokenRow.hash == Node.enrol_token)
             .where(Node.key_fingerprint == fingerprint, Node.enrol_token == token_hash,
                    EnrolmentTokenRow.expires_at > utc_now(now)).limit(1))
        async with self._tx(write=False) as conn:
            row = (await conn.execute(q)).first()
        return _node_info(row) if row else None

    async def enrol_again(self, token_hash: str, node_id: str, issued: IssuedCert, *,
                          now: datetime | None = None) -> None:
        """The same enrolment again (its answer was lost): ``issued``, for the same key,
        becomes the node's certificate (audited ``node.enrol.retry``). `StorageError` unless
        the node enrolled with this key and token and is not revoked."""
        t = utc_now(now)
        async with self._tx() as conn:
            res = await conn.execute(
                update(Node).where(Node.id == node_id, Node.key_fingerprint == issued.fingerprint,
                                   Node.enrol_token == token_hash, Node.revoked.is_(False))
                .values(cert_serial=f"{issued.serial:x}", cert_expiry=issued.not_after))
            if res.rowcount != 1:
                raise StorageError(f"node {node_id} did not enrol with this key and token, or "
                                   "is revoked")
            await write_audit(conn, t, f"node:{node_id}", "node.enrol.retry", f"node:{node_id}",
                              {"serial": f"{issued.serial:x}", "token": token_hash[:12]})

    async def _key_is_free(self, conn: AsyncConnection, fingerprint: str) -> None:
        if self.dialect == "postgresql":  # two enrolments of one key wait for each other
            await conn.execute(select(func.pg_advisory_xact_lock(int(fingerprint[:15], 16))))
        taken = (await conn.execute(select(Node.id).where(
            Node.key_fingerprint == fingerprint).limit(1))).first()
        if taken is not None:
            raise KeyInUse("this key is already enrolled as a node; one key is one node: "
                           "make a new key to enrol another node")

    async def get_node(self, node_id: str) -> NodeInfo | None:
        """One node (None: not enrolled here). Every session upgrade and device call reads
        one: through the hot reads' own connections (`edgewise.cloud.store.readers`), a tenth
        of the SQLAlchemy path's CPU (issue 11: a reconnect storm's store reads)."""
        stmt = self._raw_get_node()
        if self.dialect == "sqlite":
            values = await self._sqlite_tx(
                lambda conn: conn.execute(stmt.sql, (node_id,)).fetchone(), write=False)
        else:
            values = await self._pg_read(lambda conn: conn.fetchrow(stmt.sql, node_id),
                                         snapshot=False)
        return _node_info(stmt.row(values)) if values is not None else None

    def _raw_get_node(self) -> RawStatement:
        raw: RawStatement | None = getattr(self, "_raw_node_stmt", None)
        if raw is None:
            raw = self._raw_node_stmt = self.raw_statement(
                select(Node).where(Node.id == bindparam("node_id")), ())
        return raw

    async def list_nodes(self, labels: Mapping[str, str] | None = None, *, limit: int = 1000,
                         after: str | None = None) -> list[NodeInfo]:
        """Nodes in id order, ``limit`` at a time after id ``after`` (keyset paging), whose
        labels include every ``labels`` pair (JSONB containment on PostgreSQL)."""
        q = select(Node).order_by(Node.id).limit(limit)
        if after is not None:
            q = q.where(Node.id > after)
        for key, value in validate_labels(labels or {}).items():
            if self.dialect == "postgresql":
                q = q.where(type_coerce(Node.labels, postgresql.JSONB).contains({key: value}))
            else:
                q = q.where(func.json_extract(Node.labels, f'$."{key}"') == value)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [_node_info(r) for r in rows]

    async def count_nodes(self) -> int:
        async with self._tx(write=False) as conn:
            return int((await conn.execute(select(func.count()).select_from(Node))).scalar_one())

    async def set_node_labels(self, node_id: str, labels: Mapping[str, str], *, actor: str,
                              now: datetime | None = None) -> NodeInfo:
        """Replace a node's labels (audited). Raises `ConfigError` for bad labels, `KeyError`
        for an unknown node."""
        clean = validate_labels(labels)
        t = utc_now(now)
        async with self._tx() as conn:
            res = await conn.execute(update(Node).where(Node.id == node_id).values(labels=clean))
            if res.rowcount != 1:
                raise KeyError(node_id)
            await write_audit(conn, t, actor, "node.label", f"node:{node_id}", {"labels": clean})
            row = (await conn.execute(select(Node).where(Node.id == node_id))).one()
        return _node_info(row)

    async def patch_node_labels(self, node_id: str, set_: Mapping[str, str],
                                remove: Sequence[str], *, actor: str,
                                now: datetime | None = None) -> NodeInfo:
        """Set some labels and remove others, reading and writing them in ONE transaction
        (the row locked), so two concurrent patches of one node both keep their changes.
        Audited as `set_node_labels`. Raises `ConfigError` for bad labels, `KeyError` for an
        unknown node."""
        t = utc_now(now)
        async with self._tx() as conn:
            row = (await conn.execute(select(Node.labels).where(Node.id == node_id)
                                      .with_for_update())).first()
            if row is None:
                raise KeyError(node_id)
            labels = {k: v for k, v in dict(row.labels or {}).items() if k not in remove}
            labels.update(set_)
            clean = validate_labels(labels)
            await conn.execute(update(Node).where(Node.id == node_id).values(labels=clean))
            await write_audit(conn, t, actor, "node.label", f"node:{node_id}", {"labels": clean})
            node = (await conn.execute(select(Node).where(Node.id == node_id))).one()
        return _node_info(node)

    async def record_renewal(self, node_id: str, issued: IssuedCert, *,
                             now: datetime | None = None) -> None:
        """A renewed or re-authenticated certificate (same key) becomes the node's current one."""
        t = utc_now(now)
        async with self._tx() as conn:
            res = await conn.execute(
                update(Node).where(Node.id == node_id, Node.key_fingerprint == issued.fingerprint,
                                   Node.revoked.is_(False))
                .values(cert_serial=f"{issued.serial:x}", cert_expiry=issued.not_after))
            if res.rowcount != 1:
                raise StorageError(f"node {node_id} is unknown, revoked or has another key")
            await write_audit(conn, t, f"node:{node_id}", "node.certificate", f"node:{node_id}",
                              {"serial": f"{issued.serial:x}",
                               "expires_at": issued.not_after.isoformat()})

    async def set_node_status(self, node_id: str, status: str, *,
                              now: datetime | None = None) -> None:
        """Status (``online`` / ``offline``) and last-seen time; revoked nodes stay revoked."""
        async with self._tx() as conn:
            await conn.execute(update(Node).where(Node.id == node_id, Node.revoked.is_(False))
                               .values(status=status, last_seen=utc_now(now)))

    async def touch_nodes(self, seen: Mapping[str, datetime]) -> None:
        """Last-seen times of many nodes in one transaction (the app flushes these in batches),
        the rows locked in id order: a bulk desired-state write locks them in that order too,
        and any other order can deadlock with it (PostgreSQL, two processes: issue 11)."""
        if not seen:
            return
        stmt = (update(Node).where(Node.id == bindparam("nid"))
                .values(last_seen=bindparam("seen")))
        async with self._tx() as conn:  # rows in id order, as every writer of many nodes
            await conn.execute(stmt.execution_options(synchronize_session=False),
                               [{"nid": k, "seen": v} for k, v in sorted(seen.items())])

    async def add_simulated_nodes(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Node rows written as enrolment leaves them, without certificates or tokens, 1,000 a
        statement: for fleets simulated in the store (`testbed.rollout_fleet`, benchmarks),
        never for real nodes (nothing proves their identity)."""
        async with self._tx() as conn:
            for i in range(0, len(rows), 1000):
                await conn.execute(insert(Node), list(rows[i:i + 1000]))

    async def revoke_node(self, node_id: str, *, reason: str, actor: str,
                          now: datetime | None = None) -> NodeInfo:
        """Revoke the node's current serial and its key (no renewal, no re-authentication),
        mark it revoked, audit it. Update the app's `RevocationList` with the result (or use
        `load_revocations`). Raises `KeyError` for an unknown node."""
        t = utc_now(now)
        async with self._tx() as conn:
            row = (await conn.execute(select(Node).where(Node.id == node_id))).first()
            if row is None:
                raise KeyError(node_id)
            status = "revoked" if row.decommissioned_at is None else row.status
            await conn.execute(update(Node).where(Node.id == node_id)
                               .values(revoked=True, status=status))
            for values in ({"serial": row.cert_serial}, {"fingerprint": row.key_fingerprint}):
                await conn.execute(self._insert(Revocation).values(
                    node_id=node_id, reason=reason, created=t, **values).on_conflict_do_nothing())
            await write_audit(conn, t, actor, "node.revoke", f"node:{node_id}",
                              {"reason": reason, "serial": row.cert_serial,
                               "fingerprint": row.key_fingerprint})
            row = (await conn.execute(select(Node).where(Node.id == node_id))).one()
        return _node_info(row)

    async def decommission_node(self, node_id: str, *, wipe: bool, reason: str, actor: str,
                                now: datetime | None = None) -> NodeInfo:
        """Revoke the node (serial and key, as `revoke_node`) and mark it decommissioned: when,
        by whom, and whether it must wipe itself; audited ``node.decommission``, in one
        transaction. The record stays. Decommissioning again changes nothing (the first time
        and its ``wipe`` stand) but a ``wipe`` asked for later, which is added (audited again).
        Raises `KeyError` for an unknown node."""
        t = utc_now(now)
        async with self._tx() as conn:
            row = (await conn.execute(select(Node).where(Node.id == node_id))).first()
            if row is None:
                raise KeyError(node_id)
            if row.decommissioned_at is not None and (row.wipe or not wipe):
                return _node_info(row)
            values: dict[str, Any] = {"revoked": True, "status": "decommissioned", "wipe": wipe}
            if row.decommissioned_at is None:
                values.update(decommissioned_at=t, decommissioned_by=actor[:128])
            await conn.execute(update(Node).where(Node.id == node_id).values(**values))
            for rev in ({"serial": row.cert_serial}, {"fingerprint": row.key_fingerprint}):
                await conn.execute(self._insert(Revocation).values(
                    node_id=node_id, reason=reason or "decommissioned", created=t, **rev
                ).on_conflict_do_nothing())
            await write_audit(conn, t, actor, "node.decommission", f"node:{node_id}",
                              {"wipe": wipe, "reason": reason, "serial": row.cert_serial,
                               "fingerprint": row.key_fingerprint})
            row = (await conn.execute(select(Node).where(Node.id == node_id))).one()
        return _node_info(row)

    # -- revocations --------------------------------------------------------------------------
    async def add_revocation(self, *, serial: int | None = None, fingerprint: str | None = None,
                             node_id: str | None = None, reason: str = "",
                             now: datetime | None = None) -> None:
        if serial is None and fingerprint is None:
            raise ValueError("revoke a serial, a key fingerprint or both")
        t = utc_now(now)
        async with self._tx() as conn:
            if serial is not None:
                await conn.execute(self._insert(Revocation).values(
                    serial=f"{serial:x}", node_id=node_id, reason=reason, created=t
                ).on_conflict_do_nothing())
            if fingerprint is not None:
                await conn.execute(self._insert(Revocation).values(
                    fingerprint=fingerprint.lower(), node_id=node_id, reason=reason, created=t
                ).on_conflict_do_nothing())

    async def list_revocations(self) -> tuple[list[int], list[str]]:
        """Every revoked serial and every revoked key fingerprint."""
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(Revocation.serial, Revocation.fingerprint))).all()
        return ([int(r.serial, 16) for r in rows if r.serial],
                [r.fingerprint for r in rows if r.fingerprint])

    async def load_revocations(self) -> RevocationList:
        serials, fingerprints = await self.list_revocations()
        return RevocationList(serials=serials, fingerprints=fingerprints)
