"""The operator API's fleet operations: config layers, ``config diff`` and ``apply``, the
drift report, health states and quarantine (routes in `openapi.OPERATOR_ROUTES`, registered
with the other handlers by `operator_api`; docs/operations.md).

The rules are elsewhere and pure (`layers`: the merge; `fleet_state`: states and drift);
`fleet_config` stores what ``apply`` computes. The drift report and the node states look at
one keyset page of nodes per request (``limit`` nodes after ``after``) and return those that
match, with ``next`` to go on: a request's work is bounded whatever the fleet's size.
"""

from __future__ import annotations

from aiohttp import web

from edgewise.cloud import fleet_config, quarantine
from edgewise.cloud import openapi as oa
from edgewise.cloud.config import CONFIG
from edgewise.cloud.fleet_state import Thresholds, classify, drift
from edgewise.cloud.layers import Layer, order
from edgewise.cloud.operator_call import Call, node_model, node_or_404, selector
from edgewise.cloud.state import POKES, set_quarantine
from edgewise.cloud.store import NodeInfo
from edgewise.cloud.store.fleet import FleetRow
from edgewise.errors import BadRequest, NotFound

THRESHOLDS = web.AppKey("fleet_thresholds", Thresholds)
"""The thresholds of the health states (`fleet_state.Thresholds`); the defaults when unset."""


def thresholds(call: Call) -> Thresholds:
    return call.app.get(THRESHOLDS) or Thresholds()


def layer_model(la: Layer) -> oa.LayerModel:
    return oa.LayerModel(kind=la.kind, name=la.name, key=la.key, values=dict(la.values),
                         selector=dict(la.selector), position=la.position, version=la.version,
                         updated=la.updated, updated_by=la.updated_by)


def fleet_node(row: FleetRow, call: Call, attestation: str | None = None) -> oa.FleetNode:
    st = classify(row, call.now, thresholds(call))
    base = node_model(row.node).model_dump(exclude={"attestation", "quarantine"})
    return oa.FleetNode(**base, state=st.state,  # type: ignore[arg-type]
                        reasons=list(st.reasons), health=row.health, health_at=row.health_at,
                        quarantine=row.quarantine, attestation=attestation)


async def fleet_nodes_of(rows: list[FleetRow], call: Call) -> list[oa.FleetNode]:
    """`fleet_node` of each row, with its attestation (one query)."""
    att = await call.store.attestations([r.node.id for r in rows])
    return [fleet_node(r, call, att.get(r.node.id)) for r in rows]


# -- layers -----------------------------------------------------------------------------------


async def list_layers(call: Call) -> oa.LayerList:
    q: oa.LayerQuery = call.query
    nodes = [(await node_or_404(call.store, q.node)).id] if q.node is not None else []
    layers = await call.store.get_layers(nodes)
    return oa.LayerList(layers=[layer_model(la) for la in order(layers)])


async def write_layer(call: Call) -> oa.LayerWriteResponse:
    b: oa.LayerWrite = call.body
    try:
        la = await call.store.write_layer(
            b.kind, b.name, set_=b.set, remove=b.remove,
            selector=selector(b.selector) if b.selector is not None else None,
            position=b.position, if_version=b.if_version, delete_=b.delete, actor=call.actor,
            now=call.now)
    except KeyError as exc:
        what = "node" if b.kind == "node" else "config layer"
        raise NotFound(f"no {what} {exc.args[0]!r}") from None
    return oa.LayerWriteResponse(layer=layer_model(la) if la is not None else None,
                                 deleted=la is None)


# -- diff and apply ---------------------------------------------------------------------------


async def diff_config(call: Call) -> oa.ConfigDiff:
    q: oa.DiffQuery = call.query
    p = await fleet_config.preview(call.store, await node_or_404(call.store, q.node))
    return oa.ConfigDiff(
        node=p.node.id, desired_version=p.desired_version, effective=p.effective.values,
        sources=p.effective.source, layers=[layer_model(la) for la in p.layers],
        changes=[oa.ConfigChange(key=c.key, before=c.before, after=c.after, source=c.source)
                 for c in p.changes])


async def _targets(call: Call, body: oa.ConfigApplyRequest) -> list[NodeInfo]:
    if body.node is not None:
        node = await node_or_404(call.store, body.node)
        if node.revoked:
            raise BadRequest(f"node {node.id} is revoked; it gets no desired state")
        return [node]
    labels = selector(body.selector) if body.selector is not None else None
    out: list[NodeInfo] = []
    after: str | None = None
    while True:
        page = await call.store.list_nodes(labels, limit=1000, after=after)
        out.extend(n for n in page if not n.revoked)
        if len(page) < 1000:
            break
        after = page[-1].id
    if not out and body.selector is not None:
        raise NotFound(f"no node (that is not revoked) matches selector {body.selector!r}")
    return out


async def apply_config(call: Call) -> oa.ConfigApplyResponse:
    body: oa.ConfigApplyRequest = call.body
    nodes, held = await quarantine.split(call.store, await _targets(call, body), None)
    if body.node is not None and held:
        raise quarantine.refusal(body.node, held[body.node], "a config change")
    limits = call.app[CONFIG].server
    done, unchanged = await fleet_config.apply(
        call.store, call.app[POKES], nodes, actor=call.actor, now=call.now,
        fetch_rate=limits.push_fetch_rate, max_jitter=limits.push_max_jitter)
    target = (f"node:{body.node}" if body.node is not None else
              f"selector:{body.selector}" if body.selector is not None else "fleet")
    await call.store.audit(call.actor, "config.apply", target, {
        "nodes": len(done), "unchanged": unchanged,
        "versions": {d.node: d.version for d in done[:100]}, "held": sorted(held)[:100]},
        now=call.now)
    return oa.ConfigApplyResponse(
        nodes=[oa.AppliedVersion(node=d.node, version=d.version, changes=d.changes,
                                 notified=d.notified) for d in done], unchanged=unchanged,
        held=[oa.HeldNode(node=n, reason=r) for n, r in sorted(held.items())])


# -- drift, states, quarantine ----------------------------------------------------------------


async def config_drift(call: Call) -> oa.DriftList:
    q: oa.DriftQuery = call.query
    labels = selector(q.selector) if q.selector else None
    page = await call.store.fleet_page(labels, limit=q.limit, after=q.after)
    layers = [la for la in await call.store.get_layers() if la.kind != "node"]
    th = thresholds(call)
    out: list[oa.DriftEntry] = []
    for row in page:
        reasons = drift(row, layers, call.now)
        if reasons:
            out.append(oa.DriftEntry(
                node=row.node.id, state=classify(row, call.now, th).state,  # type: ignore[arg-type]
                desired_version=row.desired.version if row.desired is not None else 0,
                applied_version=row.reported.applied_version
                if row.reported is not None else None, reasons=reasons))
    return oa.DriftList(nodes=out, checked=len(page),
                        next=page[-1].node.id if len(page) == q.limit else None)


async def fleet_nodes(call: Call) -> oa.FleetNodeList:
    q: oa.FleetNodesQuery = call.query
    labels = selector(q.selector) if q.selector else None
    page = await call.store.fleet_page(labels, limit=q.limit, after=q.after, light=True)
    nodes = await fleet_nodes_of(page, call)
    if q.state is not None:
        nodes = [n for n in nodes if n.state == q.state]
    return oa.FleetNodeList(nodes=nodes,
                            next=page[-1].node.id if len(page) == q.limit else None)


async def quarantine_node(call: Call) -> oa.FleetNode:
    body: oa.QuarantineRequest = call.body
    try:
        await set_quarantine(call.app, call.node_id, body.reason, actor=call.actor,
                             now=call.now)
    except KeyError:
        raise NotFound(f"no node {call.node_id!r}") from None
    node = await node_or_404(call.store, call.node_id)
    (row,) = await call.store.fleet_rows([node], light=True)
    return (await fleet_nodes_of([row], call))[0]


HANDLERS = {
    "list_layers": list_layers,
    "write_layer": write_layer,
    "diff_config": diff_config,
    "apply_config": apply_config,
    "config_drift": config_drift,
    "fleet_nodes": fleet_nodes,
    "quarantine_node": quarantine_node,
}
