"""The store, each node's twin: desired state (versions per node grow by one) and the reported
state, whose setpoints merge by HLC last-writer-wins with the writes made in the cloud.

`update_desired_state` is the read-merge-write of a new desired version in ONE transaction: the
node's row is locked (``FOR UPDATE`` on PostgreSQL; SQLite's writer holds the database lock), the
newest version read, the change applied, the next version inserted and the cloud's setpoint writes
merged into the reported state, so two concurrent writers for one node both keep their changes
(`cloud.desired` is the service the operator API calls). `update_desired_states` does the same
for many nodes as one bulk operation (a handful of statements per 1,000 nodes), and
`update_desired_state` is that for one node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from edgewise.cloud.store.audit import write_audit
from edgewise.cloud.store.db import Database, StorageConflict, utc_now
from edgewise.cloud.store.models import AuditRow, DesiredStateRow, Node, ReportedStateRow
from edgewise.cloud.store.records import NodeReport, ReportedInfo
from edgewise.errors import ConfigError, StorageError
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import AuditRecord, LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState

DesiredChange = Callable[[DesiredState | None],
                         tuple[Mapping[str, str] | None, Mapping[str, Any]]]
"""``previous -> (pipelines, config)`` of the next desired version; pure (it may run again).
``pipelines`` None: none named (the node runs its own ``--pipeline``)."""

ATTEMPTS = 5  # transactions tried when a concurrent writer takes the same version number
BULK_NODES = 1000  # nodes per transaction of a bulk desired-state write (bound values stay
# well under the 32,766 one statement may carry)


# the node's own setpoints as it last reported them, kept beside the merged map so that the
# operator can see which cloud writes the node does not have yet
NODE_SETPOINTS = "node_setpoints"

def loss_detail(loss: AuditRecord) -> dict[str, Any]:
    wire = loss.to_wire()
    value = wire["lost_value"]
    if isinstance(value, bytes):
        wire["lost_value"] = value.hex()
    return wire


class TwinStore(Database):
    """Desired and reported state (part of `Store`)."""

    # -- desired state ------------------------------------------------------------------------
    async def update_desired_state(
        self, node_id: str, change: DesiredChange, *, setpoints: LwwMap | None = None,
        labels: Mapping[str, str] | None = None, expires_at: datetime | None = None,
        actor: str, now: datetime | None = None, release: str | None = None,
    ) -> DesiredState:
        """Store the node's next desired version, made by ``change`` from the newest one, in
        one transaction; ``setpoints`` (cloud-side writes, HLC-stamped) are merged into the
        stored reported state in the same transaction, as `merge_setpoints` does.

        Audited: ``setpoint.set`` and a ``setpoint.overwritten`` per losing write (when
        ``setpoints``), then ``desired.set``. The caller then pokes a live session
        (``app[SESSIONS].notify_desired(node_id, version)``). Raises `ConfigError` for an
        invalid state, `KeyError` for an unknown node. ``release``: None keeps the newest
        version's release, "" assigns none, a version assigns that release.
        """
        states = await self.update_desired_states(
            [(node_id, labels or {})], change, setpoints=setpoints, expires_at=expires_at,
            actor=actor, now=now, release=release)
        return states[node_id]

    async def update_desired_states(
        self, targets: Sequence[tuple[str, Mapping[str, str]]], change: DesiredChange, *,
        setpoints: LwwMap | None = None, expires_at: datetime | None = None, actor: str,
        now: datetime | None = None, release: str | None = None,
    ) -> dict[str, DesiredState]:
        """`update_desired_state` for many nodes (``(node id, labels)`` each) as one bulk
        operation: one transaction per `BULK_NODES` nodes, each a handful of statements (lock
        the node rows, read their newest versions, insert the next ones, merge setpoints,
        audit), not one transaction per node. Raises `KeyError` naming the first unknown node
        (nothing of its slice is stored), `ConfigError` for an invalid state."""
        t = utc_now(now)
        out: dict[str, DesiredState] = {}
        for i in range(0, len(targets), BULK_NODES):
            part = dict(targets[i:i + BULK_NODES])
            for attempt in range(ATTEMPTS):
                try:
                    out.update(await self._update_desired_slice(
                        part, change, setpoints, expires_at, actor, t, release))
                    break
                except (IntegrityError, StorageConflict):  # a concurrent writer: again
                    if attempt == ATTEMPTS - 1:
                        raise StorageError("cannot store the desired states of "
                                           f"{len(part)} nodes") from None
                    await asyncio.sleep(0.01 * (attempt + 1))
        return out

    async def _update_desired_slice(
        self, part: Mapping[str, Mapping[str, str]], change: DesiredChange,
        setpoints: LwwMap | None, expires_at: datetime | None, actor: str, t: datetime,
        release: str | None,
    ) -> dict[str, DesiredState]:
        ids = sorted(part)
        async with self._tx() as conn:
            # one writer per node at a time (PostgreSQL, rows locked in id order so two bulk
            # writers never deadlock; SQLite's writer has the database lock)
            found = {r.id for r in (await conn.execute(
                select(Node.id).where(Node.id.in_(ids)).order_by(Node.id)
                .with_for_update())).all()}
            for node_id in ids:
                if node_id not in found:
                    raise KeyError(node_id)
            newest = (select(DesiredStateRow.node_id,
                             func.max(DesiredStateRow.version).label("version"))
                      .where(DesiredStateRow.node_id.in_(ids))
                      .group_by(DesiredStateRow.node_id).subquery())
            rows = (await conn.execute(
                select(DesiredStateRow.node_id, DesiredStateRow.version, DesiredStateRow.body)
                .join(newest, (DesiredStateRow.node_id == newest.c.node_id)
                      & (DesiredStateRow.version == newest.c.version)))).all()
            previous = {r.node_id: (r.version, r.body) for r in rows}
            states: dict[str, DesiredState] = {}
            for node_id in ids:
                version, body = previous.get(node_id, (0, None))
                prev = DesiredState.from_wire(body) if body is not None else None
                pipelines, config = change(prev)
                assigned = (prev.release if prev is not None else None
                            ) if release is None else (release or None)
                try:
                    states[node_id] = DesiredState(
                        version + 1, dict(pipelines) if pipelines is not None else None,
                        dict(config), dict(part[node_id]),
                        expires_at.timestamp() if expires_at is not None else None, assigned)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            await conn.execute(insert(DesiredStateRow), [
                {"node_id": n, "version": s.version, "body": s.to_wire(), "created": t,
                 "expires_at": expires_at} for n, s in states.items()])
            audits: list[dict[str, Any]] = []
            if setpoints is not None:
                audits += await self._merge_setpoints_many(conn, ids, setpoints, actor, t)
            audits += [{"ts": t, "actor": actor, "action": "desired.set",
                        "target": f"node:{n}",
                        "detail": {"version": s.version,
                                   "pipelines": sorted(s.pipelines)
                                   if s.pipelines is not None else None,
                                   "release": s.release}} for n, s in states.items()]
            await conn.execute(insert(AuditRow), audits)
        return states

    async def put_desired_state(
        self, node_id: str, *, pipelines: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None,
        expires_at: datetime | None = None, actor: str, now: datetime | None = None,
    ) -> DesiredState:
        """Store the node's next desired version (previous + 1) as given and audit it
        (``pipelines`` None: none named); the caller then pokes a live session
        (``app[SESSIONS].notify_desired(node_id, version)``). Raises `ConfigError` for an
        invalid state, `KeyError` for an unknown node."""
        new = (dict(pipelines) if pipelines is not None else None, dict(config or {}))
        return await self.update_desired_state(node_id, lambda _previous: new, labels=labels,
                                               expires_at=expires_at, actor=actor, now=now)

    async def get_desired_state(self, node_id: str, version: int | None = None
                                ) -> DesiredState | None:
        """The newest desired state of a node (or the given version), or None."""
        q = select(DesiredStateRow.body).where(DesiredStateRow.node_id == node_id)
        if version is not None:
            q = q.where(DesiredStateRow.version == version)
        q = q.order_by(DesiredStateRow.version.desc()).limit(1)
        async with self._tx(write=False) as conn:
            body = (await conn.execute(q)).scalar()
        return DesiredState.from_wire(body) if body is not None else None

    async def desired_states(self, versions: Mapping[str, int]) -> dict[str, DesiredState]:
        """The given version of each node's desired state (a node without that version is
        left out), 1,000 nodes a query."""
        items, out = list(versions.items()), {}
        async with self._tx(write=False) as conn:
            for i in range(0, len(items), 1000):
                q = select(DesiredStateRow.node_id, DesiredStateRow.body).where(
                    tuple_(DesiredStateRow.node_id, DesiredStateRow.version)
                    .in_(items[i:i + 1000]))
                for node_id, body in (await conn.execute(q)).all():
                    out[node_id] = DesiredState.from_wire(body)
        return out

    async def desired_version(self, node_id: str) -> int:
        """The newest desired version of a node, 0 if it has none."""
        async with self._tx(write=False) as conn:
            v = (await conn.execute(select(func.max(DesiredStateRow.version))
                                    .where(DesiredStateRow.node_id == node_id))).scalar()
        return int(v or 0)

    # -- reported state -----------------------------------------------------------------------
    async def get_reported_state(self, node_id: str) -> ReportedInfo | None:
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(ReportedStateRow).where(
                ReportedStateRow.node_id == node_id))).first()
        if not row:
            return None
        body = dict(row.body)
        own = body.pop(NODE_SETPOINTS, None)
        state = ReportedState.from_wire(body)
        mine = LwwMap.from_wire(own) if own is not None else LwwMap()
        pending = tuple(sorted(k for k, e in state.setpoints.entries().items()
                               if mine.entries().get(k) != e))
        return ReportedInfo(state, row.updated, pending)

    async def merge_reported_state(self, node_id: str, reported: ReportedState, *,
                                   at: HLC | None = None, now: datetime | None = None
                                   ) -> list[AuditRecord]:
        """Store a node's report. Setpoints merge by HLC last-writer-wins with what is stored
        (writes from the cloud included); each write that lost goes to the audit log."""
        t = utc_now(now)
        async with self._tx() as conn:
            old = await self._reported_body(conn, node_id)
            base = LwwMap.from_wire(old["setpoints"]) if old else LwwMap()
            merged, losses = base.merge(reported.setpoints, at=at)
            body = ReportedState(reported.applied_version, reported.status,
                                 dict(reported.counters), merged).to_wire()
            body[NODE_SETPOINTS] = reported.setpoints.to_wire()  # what the node itself has
            await self._upsert_reported(conn, node_id, body, t)
            for loss in losses:
                await write_audit(conn, t, f"node:{node_id}", "setpoint.overwritten",
                                  f"node:{node_id}", loss_detail(loss))
        return losses

    async def write_node_batch(
        self, statuses: Mapping[str, tuple[str, datetime]],
        reports: Mapping[str, NodeReport], losses: Mapping[str, Sequence[AuditRecord]] = {},
        *, now: datetime | None = None,
    ) -> None:
        """Many nodes' status changes and reports in ONE transaction (`cloud.node_writes`):
        statuses as one executemany UPDATE (revoked nodes stay revoked); per 1,000 reports
        one locking read of the stored bodies, the setpoints merged by HLC last-writer-wins
        in Python, one executemany upsert (one statement built once per store: a multi-row
        VALUES upsert had SQLAlchemy walk every row's JSON body for its cache key on each
        write, 11% of the control plane's busy samples with 300 nodes reporting every 10 s),
        and the audit rows (``losses`` found before, then this merge's) as one executemany
        INSERT."""
        t = utc_now(now)
        async with self._tx() as conn:
            if statuses:
                await conn.execute(
                    update(Node).where(Node.id == bindparam("nid"), Node.revoked.is_(False))
                    .values(status=bindparam("st"), last_seen=bindparam("seen"))
                    .execution_options(synchronize_session=False),
                    [{"nid": n, "st": st, "seen": when}
                     for n, (st, when) in sorted(statuses.items())])
            ids = sorted(reports)
            for i in range(0, len(ids), BULK_NODES):
                part = ids[i:i + BULK_NODES]
                olds = {r.node_id: r.body for r in (await conn.execute(
                    select(ReportedStateRow.node_id, ReportedStateRow.body)
                    .where(ReportedStateRow.node_id.in_(part))
                    .order_by(ReportedStateRow.node_id).with_for_update())).all()}
                rows: list[dict[str, Any]] = []
                audits: list[dict[str, Any]] = []
                for node_id in part:
                    rep = reports[node_id]
                    old = olds.get(node_id)
                    base = LwwMap.from_wire(old["setpoints"]) if old else LwwMap()
                    merged, lost = base.merge(rep.state.setpoints, at=rep.at)
                    body = ReportedState(rep.state.applied_version, rep.state.status,
                                         dict(rep.state.counters), merged).to_wire()
                    body[NODE_SETPOINTS] = rep.own.to_wire()  # what the node itself has
                    rows.append({"node_id": node_id, "body": body, "updated": t})
                    target = f"node:{node_id}"
                    audits += [{"ts": t, "actor": target, "action": "setpoint.overwritten",
                                "target": target, "detail": loss_detail(loss)}
                               for loss in (*losses.get(node_id, ()), *lost)]
                await conn.execute(self._upsert(ReportedStateRow, "body", "updated"), rows)
                if audits:
                    await conn.execute(insert(AuditRow), audits)

    async def merge_setpoints(self, node_id: str, setpoints: LwwMap, *, actor: str,
                              at: HLC | None = None, now: datetime | None = None
                              ) -> list[AuditRecord]:
        """Cloud-side setpoint writes: merged into the stored reported state by the same rule."""
        t = utc_now(now)
        async with self._tx() as conn:
            return await self._merge_setpoints(conn, node_id, setpoints, actor, at, t)

    async def _merge_setpoints(self, conn: AsyncConnection, node_id: str, setpoints: LwwMap,
                               actor: str, at: HLC | None, t: datetime) -> list[AuditRecord]:
        old = dict(await self._reported_body(conn, node_id) or {})
        own = old.pop(NODE_SETPOINTS, None)
        current = ReportedState.from_wire(old) if old else ReportedState(None, "unknown")
        merged, losses = current.setpoints.merge(setpoints, at=at)
        body = ReportedState(current.applied_version, current.status,
                             dict(current.counters), merged).to_wire()
        if own is not None:
            body[NODE_SETPOINTS] = own
        await self._upsert_reported(conn, node_id, body, t)
        await write_audit(conn, t, actor, "setpoint.set", f"node:{node_id}",
                          {"keys": sorted(setpoints.entries())})
        for loss in losses:
            await write_audit(conn, t, actor, "setpoint.overwritten", f"node:{node_id}",
                              loss_detail(loss))
        return losses

    async def _merge_setpoints_many(self, conn: AsyncConnection, ids: Sequence[str],
                                    setpoints: LwwMap, actor: str, t: datetime
                                    ) -> list[dict[str, Any]]:
        """`_merge_setpoints` for many nodes: one locking read, one multi-row upsert; returns
        the audit rows (``setpoint.set``, then each ``setpoint.overwritten``) to insert."""
        olds = {r.node_id: r.body for r in (await conn.execute(
            select(ReportedStateRow.node_id, ReportedStateRow.body)
            .where(ReportedStateRow.node_id.in_(ids)).order_by(ReportedStateRow.node_id)
            .with_for_update())).all()}
        rows: list[dict[str, Any]] = []
        audits: list[dict[str, Any]] = []
        for node_id in ids:
            old = dict(olds.get(node_id) or {})
            own = old.pop(NODE_SETPOINTS, None)
            current = ReportedState.from_wire(old) if old else ReportedState(None, "unknown")
            merged, losses = current.setpoints.merge(setpoints, at=None)
            body = ReportedState(current.applied_version, current.status,
                                 dict(current.counters), merged).to_wire()
            if own is not None:
                body[NODE_SETPOINTS] = own
            rows.append({"node_id": node_id, "body": body, "updated": t})
            target = f"node:{node_id}"
            audits.append({"ts": t, "actor": actor, "action": "setpoint.set",
                           "target": target, "detail": {"keys": sorted(setpoints.entries())}})
            audits += [{"ts": t, "actor": actor, "action": "setpoint.overwritten",
                        "target": target, "detail": loss_detail(loss)} for loss in losses]
        ins = self._insert(ReportedStateRow).values(rows)
        await conn.execute(ins.on_conflict_do_update(
            index_elements=[ReportedStateRow.node_id],
            set_={"body": ins.excluded.body, "updated": ins.excluded.updated}))
        return audits

    async def _reported_body(self, conn: AsyncConnection, node_id: str) -> dict[str, Any] | None:
        # locked until the merged body is written back (PostgreSQL; SQLite: the writer's lock)
        return (await conn.execute(select(ReportedStateRow.body).where(
            ReportedStateRow.node_id == node_id).with_for_update())).scalar()

    async def _upsert_reported(self, conn: AsyncConnection, node_id: str,
                               body: dict[str, Any], t: datetime) -> None:
        ins = self._insert(ReportedStateRow).values(node_id=node_id, body=body, updated=t)
        await conn.execute(ins.on_conflict_do_update(
            index_elements=[ReportedStateRow.node_id],
            set_={"body": ins.excluded.body, "updated": ins.excluded.updated}))
