"""Config layers as a service: what ``config diff`` shows and ``config apply`` stores
(docs/operations.md, "Config layers"); the merge rules are `layers`, the storage `store.fleet`.

`preview` is a node's effective config, where each value comes from, and what applying it
would change in its newest desired config. `apply` stores the effective config as the next
desired version of every targeted node whose desired config differs (nodes already up to date
get no new version), through `desired.assign` with ``replace_config``: the config keys are
replaced, setpoints, pipelines and the release are kept, in the same one-transaction
read-merge-write as ``config set``. Nodes that share labels and have no node layer share one
effective config, so a selector push is one bulk assignment per distinct config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from edgewise.cloud import desired
from edgewise.cloud.layers import Change, Effective, Layer, diff, effective
from edgewise.cloud.pokes import PokeFanout
from edgewise.cloud.store import NodeInfo, Store
from edgewise.cloud.store.fleet import FleetRow

PAGE = 1000


@dataclass(frozen=True)
class Preview:
    node: NodeInfo
    effective: Effective
    desired_version: int  # 0: none yet
    changes: list[Change]
    layers: list[Layer]  # those that apply, in order


async def preview(store: Store, node: NodeInfo) -> Preview:
    layers = await store.get_layers([node.id])
    eff = effective(layers, node.id, node.labels)
    state = await store.get_desired_state(node.id)
    by_key = {la.key: la for la in layers}
    return Preview(node, eff, state.version if state is not None else 0,
                   diff(state.config if state is not None else {}, eff),
                   [by_key[k] for k in eff.layers])


async def rows(store: Store, nodes: Sequence[NodeInfo]) -> list[FleetRow]:
    """The fleet rows of ``nodes`` (four queries per `PAGE` nodes)."""
    out: list[FleetRow] = []
    for i in range(0, len(nodes), PAGE):
        out += await store.fleet_rows(nodes[i:i + PAGE])
    return out


@dataclass(frozen=True)
class Applied:
    node: str
    version: int  # the new desired version
    changes: int  # keys changed
    notified: bool


async def apply(store: Store, pokes: PokeFanout, nodes: Sequence[NodeInfo], *, actor: str,
                now: datetime, fetch_rate: float = 1000.0, max_jitter: float = 5.0
                ) -> tuple[list[Applied], int]:
    """Store each node's effective config where it differs; (what was stored, nodes already
    up to date)."""
    layers = [la for la in await store.get_layers() if la.kind != "node"]
    groups: dict[str, tuple[Effective, list[NodeInfo], list[int]]] = {}
    unchanged = 0
    for row in await rows(store, nodes):
        own = [row.node_layer] if row.node_layer is not None else []
        eff = effective([*layers, *own], row.node.id, row.node.labels)
        changes = diff(row.desired.config if row.desired is not None else {}, eff)
        if not changes:
            unchanged += 1
            continue
        key = json.dumps(eff.values, sort_keys=True, default=str)
        entry = groups.setdefault(key, (eff, [], []))
        entry[1].append(row.node)
        entry[2].append(len(changes))
    out: list[Applied] = []
    for eff, members, counts in groups.values():
        change = desired.DesiredChange(config=eff.values, replace_config=True)
        done = await desired.assign(store, pokes, members, change, actor=actor, now=now,
                                    fetch_rate=fetch_rate, max_jitter=max_jitter)
        out += [Applied(d.node, d.version, c, d.notified) for d, c in zip(done, counts,
                                                                           strict=True)]
    return sorted(out, key=lambda a: a.node), unchanged
