"""The store, the fleet's operations: config layers (`cloud.layers`), the newest health of
each node and its quarantine, and pages of everything the fleet views need about a node.

`write_layer` is the read-modify-write of one layer in ONE transaction: the row is locked
(``FOR UPDATE`` on PostgreSQL; SQLite's writer holds the database lock), its version checked
against ``if_version`` when given, the change applied, the next version written and audited.
Two concurrent writes of different keys to one layer both survive; a write that names a
version another write has passed is refused (`layers.VersionConflict`, HTTP 409). Two writers
creating the same layer at once: the second insert fails on the primary key and is tried
again, reading the first one's row.

`fleet_page` (`fleet_rows` for given nodes) reads, for one keyset page of nodes, their
newest desired states, reported states, health and node layers in four queries (`FleetRow`),
for the drift report, the health states and the fleet gauges. `write_health` stores many
nodes' newest health in one executemany upsert (the session registry's maintenance
round).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from edgewise.cloud.layers import Kind, Layer, VersionConflict, check_name, layer_key, write
from edgewise.cloud.store.audit import write_audit
from edgewise.cloud.store.db import Database, utc_now
from edgewise.cloud.store.models import (
    ConfigLayerRow,
    DesiredStateRow,
    Node,
    NodeHealthRow,
    ReportedStateRow,
)
from edgewise.cloud.store.records import NodeInfo
from edgewise.cloud.store.twin import NODE_SETPOINTS
from edgewise.errors import BadRequest, StorageError
from edgewise.security.tokens import validate_labels
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState

ATTEMPTS = 5


@dataclass(frozen=True)
class FleetRow:
    """What the fleet views need about one node."""

    node: NodeInfo
    desired: DesiredState | None
    reported: ReportedState | None
    pending_setpoints: tuple[str, ...]  # cloud setpoint writes the node does not hold yet
    health: dict[str, Any] | None  # `sync.health.NodeHealth` wire form + clock_offset_s
    health_at: datetime | None
    quarantine: str | None  # the reason; None: not quarantined
    node_layer: Layer | None


def _layer(row: Any) -> Layer:
    kind = row.kind
    name = row.name.partition(":")[2] if kind != "fleet" else ""
    return Layer(kind, name, dict(row.values or {}), dict(row.selector or {}),
                 int(row.position), int(row.version), row.updated, row.updated_by)


class FleetStore(Database):
    """Config layers, node health and quarantine (part of `Store`)."""

    # -- config layers ------------------------------------------------------------------------
    async def get_layers(self, nodes: Sequence[str] = ()) -> list[Layer]:
        """The fleet layer and every group layer, and the node layers of ``nodes``."""
        q = select(ConfigLayerRow).where(or_(
            ConfigLayerRow.kind.in_(("fleet", "group")),
            ConfigLayerRow.name.in_([layer_key("node", n) for n in nodes])))
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [_layer(r) for r in rows]

    async def write_layer(
        self, kind: Kind, name: str = "", *, set_: Mapping[str, Any] | None = None,
        remove: Sequence[str] = (), selector: Mapping[str, str] | None = None,
        position: int | None = None, if_version: int | None = None, delete_: bool = False,
        actor: str, now: datetime | None = None,
    ) -> Layer | None:
        """Change one layer in one transaction (see the module docstring); its new state, or
        None when ``delete_``. ``if_version`` 0 means "the layer must not exist yet". A group
        is created with its ``selector`` (required then); a node layer's node must exist.
        Raises `VersionConflict`, `BadRequest`, `KeyError` (unknown node or layer)."""
        name = check_name(kind, name)
        key = layer_key(kind, name)
        clean_selector = validate_labels(selector) if selector is not None else None
        t = utc_now(now)
        for attempt in range(ATTEMPTS):
            try:
                return await self._write_layer(kind, name, key, set_ or {}, remove,
                                               clean_selector, position, if_version, delete_,
                                               actor, t)
            except IntegrityError:  # a concurrent writer created it first: read it again
                if attempt == ATTEMPTS - 1:
                    raise StorageError(f"cannot write config layer {key}") from None
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _write_layer(
        self, kind: Kind, name: str, key: str, set_: Mapping[str, Any], remove: Sequence[str],
        selector: dict[str, str] | None, position: int | None, if_version: int | None,
        delete_: bool, actor: str, t: datetime,
    ) -> Layer | None:
        async with self._tx() as conn:
            row = (await conn.execute(select(ConfigLayerRow).where(
                ConfigLayerRow.name == key).with_for_update())).first()
            version = int(row.version) if row is not None else 0
            if if_version is not None and if_version != version:
                raise VersionConflict(
                    f"config layer {key} is at version {version}, not {if_version}: another "
                    "write came first; look again (`edgewise config diff`) and retry")
            if delete_:
                if row is None:
                    raise KeyError(key)
                await conn.execute(delete(ConfigLayerRow).where(ConfigLayerRow.name == key))
                await write_audit(conn, t, actor, "config.layer.delete", f"layer:{key}",
                                  {"version": version})
                return None
            if row is None and kind == "node":
                found = (await conn.execute(select(Node.id).where(Node.id == name))).first()
                if found is None:
                    raise KeyError(name)
            if row is None and kind == "group" and selector is None:
                raise BadRequest(f"group {name!r} is new: give its selector")
            values = write(dict(row.values) if row is not None else {}, set_, remove)
            fields = {
                "kind": kind,
                "position": position if position is not None else (
                    int(row.position) if row is not None else 0),
                "selector": selector if selector is not None else (
                    dict(row.selector) if row is not None else {}),
                "values": values, "version": version + 1, "updated": t, "updated_by": actor,
            }
            if row is None:
                await conn.execute(insert(ConfigLayerRow).values(name=key, **fields))
            else:
                await conn.execute(update(ConfigLayerRow).where(ConfigLayerRow.name == key)
                                   .values(**fields))
            await write_audit(conn, t, actor, "config.layer", f"layer:{key}", {
                "version": version + 1, "set": sorted(set_), "remove": sorted(remove),
                "selector": fields["selector"], "position": fields["position"]})
        return Layer(kind, name, values, fields["selector"], fields["position"],
                     version + 1, t, actor)

    # -- health and quarantine ----------------------------------------------------------------
    async def write_health(self, batch: Mapping[str, tuple[dict[str, Any], datetime]]) -> None:
        """Many nodes' newest health (``{node: (body, received)}``) in one executemany
        upsert; an operator's quarantine stays. The upsert is built once per store: a
        multi-row VALUES statement built for each write had SQLAlchemy walk every row's JSON
        body (5% of the event loop's busy samples at 1,000 nodes, docs/benchmarks.md)."""
        if not batch:
            return
        rows = [{"node_id": n, "body": b, "received": t} for n, (b, t) in sorted(batch.items())]
        async with self._tx() as conn:
            known = {r.id for r in (await conn.execute(
                select(Node.id).where(Node.id.in_(list(batch))))).all()}
            rows = [r for r in rows if r["node_id"] in known]
            if not rows:
                return
            await conn.execute(self._upsert(NodeHealthRow, "body", "received"), rows)

    async def set_quarantine(self, node_id: str, reason: str | None, *, actor: str,
                             now: datetime | None = None) -> None:
        """Quarantine a node with ``reason`` (None: lift it); audited. `KeyError` if unknown."""
        t = utc_now(now)
        async with self._tx() as conn:
            if (await conn.execute(select(Node.id).where(Node.id == node_id))).first() is None:
                raise KeyError(node_id)
            values = {"quarantine": reason, "quarantined_by": actor if reason else None,
                      "quarantined_at": t if reason else None}
            ins = self._insert(NodeHealthRow).values(node_id=node_id, **values)
            await conn.execute(ins.on_conflict_do_update(
                index_elements=[NodeHealthRow.node_id], set_=values))
            await write_audit(conn, t, actor, "node.quarantine" if reason else
                              "node.unquarantine", f"node:{node_id}", {"reason": reason})

    # -- pages for the fleet views ------------------------------------------------------------
    async def fleet_page(self, labels: Mapping[str, str] | None = None, *, limit: int = 1000,
                         after: str | None = None, light: bool = False) -> list[FleetRow]:
        """One keyset page of nodes (as `list_nodes`) with what the fleet views need."""
        nodes = await self.list_nodes(labels, limit=limit, after=after)  # type: ignore[attr-defined]
        return await self.fleet_rows(nodes, light=light)

    async def fleet_rows(self, nodes: Sequence[NodeInfo], *, light: bool = False
                         ) -> list[FleetRow]:
        """`FleetRow` of each of ``nodes`` (at most 1,000), in their order. ``light``: what
        the health states and the fleet gauges need and no more: of the newest desired state
        only its version and release (its pipelines, up to megabytes of YAML each, and its
        config are left out), no reported state and no node layer."""
        if not nodes:
            return []
        ids = [n.id for n in nodes]
        newest = (select(DesiredStateRow.node_id,
                         func.max(DesiredStateRow.version).label("version"))
                  .where(DesiredStateRow.node_id.in_(ids))
                  .group_by(DesiredStateRow.node_id).subquery())
        async with self._tx(write=False) as conn:
            body = (DesiredStateRow.body["release"].as_string().label("release") if light
                    else DesiredStateRow.body)
            desired = {r.node_id: r[2] if not light else {
                "version": r.version, "pipelines": None, "config": {}, "labels": {},
                "expires_at": None, "release": r.release} for r in (await conn.execute(
                    select(DesiredStateRow.node_id, DesiredStateRow.version, body)
                    .join(newest, (DesiredStateRow.node_id == newest.c.node_id)
                          & (DesiredStateRow.version == newest.c.version)))).all()}
            reported = {} if light else {r.node_id: r.body for r in (await conn.execute(
                select(ReportedStateRow.node_id, ReportedStateRow.body)
                .where(ReportedStateRow.node_id.in_(ids)))).all()}
            health = {r.node_id: r for r in (await conn.execute(
                select(NodeHealthRow).where(NodeHealthRow.node_id.in_(ids)))).all()}
            layers = {} if light else {r.name: _layer(r) for r in (await conn.execute(
                select(ConfigLayerRow).where(ConfigLayerRow.name.in_(
                    [layer_key("node", i) for i in ids])))).all()}
        out: list[FleetRow] = []
        for n in nodes:
            body = dict(reported.get(n.id) or {})
            own = body.pop(NODE_SETPOINTS, None)
            rep = ReportedState.from_wire(body) if body else None
            pending: tuple[str, ...] = ()
            if rep is not None:
                mine = LwwMap.from_wire(own).entries() if own is not None else {}
                pending = tuple(sorted(k for k, e in rep.setpoints.entries().items()
                                       if mine.get(k) != e))
            d = desired.get(n.id)
            h = health.get(n.id)
            out.append(FleetRow(
                n, DesiredState.from_wire(d) if d is not None else None, rep, pending,
                dict(h.body) if h is not None and h.body is not None else None,
                h.received if h is not None else None,
                h.quarantine if h is not None else None,
                layers.get(layer_key("node", n.id))))
        return out

