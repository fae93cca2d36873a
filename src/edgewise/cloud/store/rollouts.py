"""The store, rollouts: ``rollouts`` (one row per rollout: its spec, state, wave, the driver's
lease) and ``rollout_nodes`` (one row per node of a rollout: its wave, site, state, the release
it had before, the desired versions around ours, its counters when it was assigned).

`Rollouts(store)` works inside the store's transactions (`Database._tx`); it is a view of the
same database, not a second connection. Every method is one transaction, and every change is
audited in it.

**One driver per rollout.** `take_lease` sets ``driver`` and ``lease_until`` on the rollout
row only when the lease is free, expired or already the caller's (a conditional UPDATE: of
two replicas, one wins). `apply` (a driver's tick) renews the lease in its own transaction and
raises `LeaseLost` when the row is no longer the caller's, so a driver that lost its lease
writes nothing of that tick.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Mapped, mapped_column

from edgewise.cloud.store.audit import write_audit
from edgewise.cloud.store.db import Database, utc_now
from edgewise.cloud.store.models import (
    AuditRow,
    Base,
    DesiredStateRow,
    JsonType,
    Node,
    NodeHealthRow,
    ReportedStateRow,
)
from edgewise.errors import BadRequest, EdgewiseError

BATCH = 1000  # node ids per statement
OPEN_STATES = ("running", "paused", "aborting")  # a node is in at most one of these


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    release: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    state: Mapped[str] = mapped_column(String(16), index=True)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[list[Any]] = mapped_column(JsonType)  # the wave names
    wave_done_at: Mapped[datetime | None]
    reason: Mapped[str] = mapped_column(Text, default="")
    paused_by: Mapped[str | None] = mapped_column(String(16))
    accepted_failures: Mapped[int] = mapped_column(Integer, default=0)
    gate_accepted_wave: Mapped[int] = mapped_column(Integer, default=-1)
    total: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    updated: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    driver: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None]


class RolloutNodeRow(Base):
    __tablename__ = "rollout_nodes"
    __table_args__ = (Index("ix_rollout_nodes_node", "node_id"),
                      Index("ix_rollout_nodes_state", "rollout_id", "state"))

    rollout_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    site: Mapped[str | None] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16))
    had_release: Mapped[bool] = mapped_column(Boolean, default=False)
    previous: Mapped[str | None] = mapped_column(String(64))
    version_before: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int | None] = mapped_column(BigInteger)
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    assigned_at: Mapped[datetime | None]
    changed_at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text, default="")


class LeaseLost(EdgewiseError):
    """Another driver holds the rollout now; this tick wrote nothing."""


class RolloutConflict(BadRequest):
    """Nodes of the request are in another rollout that is not over (409)."""

    status = 409


@dataclass(frozen=True)
class NodeView:
    """What the driver reads of one node: status, labels, reported state, newest desired."""

    status: str
    labels: dict[str, str]
    reported: dict[str, Any] | None
    desired_version: int
    desired_release: str | None
    quarantine: str | None = None  # why it is quarantined (docs/operations.md); None: it is not


def _rollout_json(r: Any) -> dict[str, Any]:
    return {c: getattr(r, c) for c in (
        "id", "release", "spec", "state", "wave", "waves", "wave_done_at", "reason",
        "paused_by", "accepted_failures", "gate_accepted_wave", "total", "created",
        "created_by", "updated", "completed_at", "driver", "lease_until")}


class Rollouts:
    """Rollout rows in the store's database (``Rollouts(store)``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- operator ---------------------------------------------------------------------------
    async def create(self, rollout_id: str, release: str, spec: Mapping[str, Any],
                     waves: Sequence[tuple[str, Sequence[str]]], sites: Mapping[str, str | None],
                     *, actor: str, now: datetime | None = None,
                     skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The rollout and its nodes in one transaction; `RolloutConflict` when one of them is
        in a rollout that is running, paused or aborting. ``skipped``: nodes the selector
        named that are in no wave (quarantined), with the reason: rows in state ``skipped``,
        wave -1, not counted in ``total``."""
        t = utc_now(now)
        ids = [n for _, nodes in waves for n in nodes]
        skipped = dict(skipped or {})
        async with self.db._tx() as conn:
            for i in range(0, len(ids), BATCH):
                busy = (await conn.execute(
                    select(RolloutNodeRow.node_id, RolloutNodeRow.rollout_id)
                    .join(RolloutRow, RolloutRow.id == RolloutNodeRow.rollout_id)
                    .where(RolloutNodeRow.node_id.in_(ids[i:i + BATCH]),
                           RolloutRow.state.in_(OPEN_STATES)).limit(1))).first()
                if busy is not None:
                    raise RolloutConflict(
                        f"node {busy.node_id} is in rollout {busy.rollout_id}, which is not "
                        "over; abort, cancel or finish it first")
            row = {"id": rollout_id, "release": release, "spec": dict(spec),
                   "state": "running", "wave": 0, "waves": [name for name, _ in waves],
                   "reason": "", "accepted_failures": 0, "gate_accepted_wave": -1,
                   "total": len(ids), "created": t, "created_by": actor, "updated": t}
            await conn.execute(insert(RolloutRow).values(**row))
            rows = [{"rollout_id": rollout_id, "node_id": n, "wave": w, "site": sites.get(n),
                     "state": "pending", "changed_at": t, "reason": ""}
                    for w, (_, nodes) in enumerate(waves) for n in nodes]
            rows += [{"rollout_id": rollout_id, "node_id": n, "wave": -1, "site": sites.get(n),
                      "state": "skipped", "changed_at": t, "reason": why}
                     for n, why in sorted(skipped.items())]
            for i in range(0, len(rows), BATCH):
                await conn.execute(insert(RolloutNodeRow), rows[i:i + BATCH])
            await write_audit(conn, t, actor, "rollout.create", f"rollout:{rollout_id}",
                              {"spec": dict(spec), "nodes": len(ids),
                               "waves": [[name, len(nodes)] for name, nodes in waves],
                               "skipped": len(skipped)})
        return await self.get(rollout_id) or {}

    async def get(self, rollout_id: str) -> dict[str, Any] | None:
        async with self.db._tx(write=False) as conn:
            r = (await conn.execute(select(RolloutRow).where(RolloutRow.id == rollout_id))
                 ).first()
        return None if r is None else _rollout_json(r)

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        async with self.db._tx(write=False) as conn:
            rows = (await conn.execute(select(RolloutRow).order_by(
                RolloutRow.created.desc(), RolloutRow.id).limit(limit))).all()
        return [_rollout_json(r) for r in rows]

    async def counts(self, rollout_id: str) -> dict[tuple[int, str], int]:
        """``{(wave, state): nodes}``."""
        async with self.db._tx(write=False) as conn:
            rows = (await conn.execute(
                select(RolloutNodeRow.wave, RolloutNodeRow.state, func.count())
                .where(RolloutNodeRow.rollout_id == rollout_id)
                .group_by(RolloutNodeRow.wave, RolloutNodeRow.state))).all()
        return {(w, s): int(n) for w, s, n in rows}

    async def nodes(self, rollout_id: str, *, states: Iterable[str] | None = None,
                    limit: int | None = None) -> list[dict[str, Any]]:
        q = select(RolloutNodeRow).where(RolloutNodeRow.rollout_id == rollout_id)
        if states is not None:
            q = q.where(RolloutNodeRow.state.in_(list(states)))
        q = q.order_by(RolloutNodeRow.wave, RolloutNodeRow.node_id)
        if limit is not None:
            q = q.limit(limit)
        async with self.db._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [{c: getattr(r, c) for c in (
            "node_id", "wave", "site", "state", "had_release", "previous", "version_before",
            "version", "baseline", "assigned_at", "changed_at", "reason")} for r in rows]

    async def command(self, rollout_id: str, *, allowed_from: Sequence[str], to: str,
                      actor: str, action: str, reason: str, fields: Mapping[str, Any] | None
                      = None, skip_waiting: bool = False, now: datetime | None = None
                      ) -> dict[str, Any] | None:
        """An operator's pause/resume/abort/cancel: the state moves only from
        ``allowed_from`` (None: no such rollout; the unchanged row when it was elsewhere).
        ``skip_waiting``: nodes not yet assigned become ``skipped`` in the same transaction."""
        t = utc_now(now)
        async with self.db._tx() as conn:
            r = (await conn.execute(select(RolloutRow).where(RolloutRow.id == rollout_id))
                 ).first()
            if r is None:
                return None
            if r.state not in allowed_from:
                raise BadRequest(f"rollout {rollout_id} is {r.state}; {action.split('.')[-1]} "
                                 f"works on a rollout that is {' or '.join(allowed_from)}")
            values = {"state": to, "reason": reason, "updated": t, **(fields or {})}
            if to == "running":
                failed = (await conn.execute(
                    select(func.count()).select_from(RolloutNodeRow).where(
                        RolloutNodeRow.rollout_id == rollout_id,
                        RolloutNodeRow.state == "failed"))).scalar_one()
                values["accepted_failures"] = int(failed)
                if r.paused_by == "gate":
                    values["gate_accepted_wave"] = r.wave
                values["paused_by"] = None
            await conn.execute(update(RolloutRow).where(RolloutRow.id == rollout_id)
                               .values(**values))
            skipped = 0
            if skip_waiting:
                skipped = (await conn.execute(
                    update(RolloutNodeRow).where(
                        RolloutNodeRow.rollout_id == rollout_id,
                        RolloutNodeRow.state.in_(("pending", "deferred")))
                    .values(state="skipped", changed_at=t,
                            reason=f"the rollout was {to} before its turn"))).rowcount
            await write_audit(conn, t, actor, action, f"rollout:{rollout_id}",
                              {"from": r.state, "to": to, "reason": reason,
                               "skipped": skipped})
        return await self.get(rollout_id)

    # -- driver -----------------------------------------------------------------------------
    async def driven(self) -> list[tuple[str, str]]:
        """``(id, state)`` of the rollouts a driver looks at: running, paused, aborting, and
        completed ones with late nodes (deferred, or assigned after the last wave)."""
        late = select(RolloutNodeRow.rollout_id).where(
            RolloutNodeRow.state.in_(("deferred", "assigning", "assigned")))
        async with self.db._tx(write=False) as conn:
            rows = (await conn.execute(select(RolloutRow.id, RolloutRow.state).where(or_(
                RolloutRow.state.in_(OPEN_STATES),
                and_(RolloutRow.state == "completed", RolloutRow.id.in_(late))))
                .order_by(RolloutRow.created))).all()
        return [(r.id, r.state) for r in rows]

    async def take_lease(self, rollout_id: str, owner: str, lease_s: float,
                         now: datetime | None = None) -> bool:
        t = utc_now(now)
        async with self.db._tx() as conn:
            res = await conn.execute(
                update(RolloutRow).where(
                    RolloutRow.id == rollout_id,
                    or_(RolloutRow.driver.is_(None), RolloutRow.driver == owner,
                        RolloutRow.lease_until < t))
                .values(driver=owner, lease_until=t + timedelta(seconds=lease_s)))
            return res.rowcount == 1

    async def release_lease(self, rollout_id: str, owner: str) -> None:
        async with self.db._tx() as conn:
            await conn.execute(update(RolloutRow).where(
                RolloutRow.id == rollout_id, RolloutRow.driver == owner)
                .values(driver=None, lease_until=None))

    async def view(self, node_ids: Sequence[str]) -> dict[str, NodeView]:
        """Status, labels, reported state and newest desired version of each node."""
        out: dict[str, NodeView] = {}
        async with self.db._tx(write=False) as conn:
            for i in range(0, len(node_ids), BATCH):
                part = list(node_ids[i:i + BATCH])
                newest = (select(DesiredStateRow.node_id,
                                 func.max(DesiredStateRow.version).label("version"))
                          .where(DesiredStateRow.node_id.in_(part))
                          .group_by(DesiredStateRow.node_id).subquery())
                desired = {r.node_id: (int(r.version), r.body.get("release"))
                           for r in (await conn.execute(
                               select(DesiredStateRow.node_id, DesiredStateRow.version,
                                      DesiredStateRow.body)
                               .join(newest, (DesiredStateRow.node_id == newest.c.node_id)
                                     & (DesiredStateRow.version == newest.c.version)))).all()}
                rows = (await conn.execute(
                    select(Node.id, Node.status, Node.labels, ReportedStateRow.body,
                           NodeHealthRow.quarantine)
                    .outerjoin(ReportedStateRow, ReportedStateRow.node_id == Node.id)
                    .outerjoin(NodeHealthRow, NodeHealthRow.node_id == Node.id)
                    .where(Node.id.in_(part)))).all()
                for r in rows:
                    v, rel = desired.get(r.id, (0, None))
                    out[r.id] = NodeView(r.status, dict(r.labels or {}), r.body, v, rel,
                                         r.quarantine)
        return out

    async def quarantined(self, node_ids: Sequence[str]) -> dict[str, str]:
        """The quarantined ones of ``node_ids``, with the reason."""
        out: dict[str, str] = {}
        async with self.db._tx(write=False) as conn:
            for i in range(0, len(node_ids), BATCH):
                rows = (await conn.execute(
                    select(NodeHealthRow.node_id, NodeHealthRow.quarantine).where(
                        NodeHealthRow.node_id.in_(list(node_ids[i:i + BATCH])),
                        NodeHealthRow.quarantine.is_not(None)))).all()
                out.update({r.node_id: r.quarantine for r in rows})
        return out

    async def apply(self, rollout_id: str, owner: str, lease_s: float, *,
                    members: Mapping[str, Mapping[str, Any]], rollout: Mapping[str, Any],
                    audits: Sequence[tuple[str, str, Mapping[str, Any]]],
                    now: datetime | None = None) -> None:
        """One tick's decisions in one transaction, fenced by the lease (`LeaseLost`)."""
        t = utc_now(now)
        async with self.db._tx() as conn:
            res = await conn.execute(
                update(RolloutRow).where(RolloutRow.id == rollout_id,
                                         RolloutRow.driver == owner,
                                         RolloutRow.lease_until >= t)
                .values(lease_until=t + timedelta(seconds=lease_s), updated=t, **rollout))
            if res.rowcount != 1:
                raise LeaseLost(f"rollout {rollout_id}: the lease is another driver's")
            await self._members(conn, rollout_id, members, t)
            actor = f"rollout:{rollout_id}"
            for i in range(0, len(audits), BATCH):
                await conn.execute(insert(AuditRow), [
                    {"ts": t, "actor": actor, "action": a, "target": tg, "detail": dict(d)}
                    for a, tg, d in audits[i:i + BATCH]])

    @staticmethod
    async def _members(conn: AsyncConnection, rollout_id: str,
                       members: Mapping[str, Mapping[str, Any]], t: datetime) -> None:
        """Rows with the same columns to set go in one executemany."""
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for node, values in members.items():
            groups.setdefault(tuple(sorted(values)), []).append(
                {"n_": node, **{f"v_{k}": v for k, v in values.items()}})
        for keys, rows in groups.items():
            stmt = (update(RolloutNodeRow).where(RolloutNodeRow.rollout_id == rollout_id,
                                                 RolloutNodeRow.node_id == bindparam("n_"))
                    .values(changed_at=t, **{k: bindparam(f"v_{k}") for k in keys}))
            for i in range(0, len(rows), BATCH):
                await conn.execute(stmt.execution_options(synchronize_session=False),
                                   rows[i:i + BATCH])
