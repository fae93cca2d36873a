"""Desired state: what ``config set`` (``PUT /v1/config``) does to each node it targets.

`DesiredChange` is one request's change, and `DesiredChange.apply` the pure rule that makes the
next version from the newest one: pipelines are replaced when given (an empty map: run none) and
kept when not, so a node whose desired state never named pipelines (None) keeps running its own
``--pipeline`` after a config or setpoint change; config is merged key by key
(a None value removes the key); the cloud's setpoint writes, stamped by its hybrid logical clock
(`setpoint_writes`), merge into ``config.setpoints`` by last-writer-wins (`sync.merge.LwwMap`).
``release`` assigns the release to run (kept when not given; "" assigns none).

`assign` stores a change for all the nodes it targets through `Store.update_desired_states`: one
bulk operation (one transaction per 1,000 nodes: lock their rows, read their newest versions,
apply the change, merge the setpoint writes into the reported states too, write the next
versions and their audit entries), so concurrent changes to one node all survive and a push to
thousands of nodes is a few statements, not one transaction per node. Then the pokes of the
nodes connected here go to the fan-out task (`pokes.PokeFanout`: coalesced, with a fetch jitter
hint, and each node's state inline when it is small). The operator API validates the request,
picks the nodes and audits the call; it holds no merge rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgewise.cloud.pokes import PokeFanout, fetch_jitter
from edgewise.cloud.store import NodeInfo, Store
from edgewise.errors import NotFound, PeerError
from edgewise.sync.hlc import Clock
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import DesiredState


@dataclass(frozen=True)
class DesiredChange:
    """One request's change to the desired state of the nodes it targets."""

    pipelines: Mapping[str, str] | None = None  # replaces the pipelines ({}: none); None: keep
    config: Mapping[str, Any] = field(default_factory=dict)  # merged key by key; None removes
    setpoints: LwwMap | None = None  # HLC-stamped writes (`setpoint_writes`)
    expires_at: datetime | None = None  # the version is not applied after it
    release: str | None = None  # the release to run: None keeps the assigned one, "" none
    replace_config: bool = False  # config replaces every key but setpoints (the config
    # layers' effective config, `cloud.fleet_config.apply`) instead of merging key by key

    def apply(self, previous: DesiredState | None
              ) -> tuple[dict[str, str] | None, dict[str, Any]]:
        """The next version's ``(pipelines, config)`` from the newest one (None: no version).

        ``pipelines`` stays None (none named: the node runs its own ``--pipeline``) until a
        change names them; an empty map is an explicit "run no pipeline" and is kept as such.
        """
        pipelines = (dict(previous.pipelines)
                     if previous is not None and previous.pipelines is not None else None)
        config = dict(previous.config) if previous is not None else {}
        if self.replace_config:
            config = {k: v for k, v in config.items() if k == "setpoints"}
        if self.pipelines is not None:
            pipelines = dict(self.pipelines)
        for key, value in self.config.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        if self.setpoints is not None:
            try:
                current = LwwMap.from_wire(config.get("setpoints", {}))
            except PeerError:
                current = LwwMap()
            merged, _lost = current.merge(self.setpoints)
            config["setpoints"] = merged.to_wire()
        return pipelines, config


def setpoint_writes(clock: Clock, values: Mapping[str, Any], actor: str) -> LwwMap:
    """Setpoint writes stamped with the cloud's clock (a None value deletes the setpoint)."""
    writes = LwwMap()
    for key, value in values.items():
        hlc = clock.now()
        if value is None:
            writes.delete(key, hlc, actor)
        else:
            writes.set(key, value, hlc, actor)
    return writes


@dataclass(frozen=True)
class Assigned:
    node: str
    version: int
    # a poke is on its way: the node has a live session here, or its status is online and
    # the poke went to the other control-plane processes of the database (`replicas`)
    notified: bool


async def assign(store: Store, pokes: PokeFanout, nodes: Sequence[NodeInfo],
                 change: DesiredChange, *, actor: str, now: datetime,
                 fetch_rate: float = 1000.0, max_jitter: float = 5.0) -> list[Assigned]:
    """Store ``change`` as each node's next desired version in one bulk store operation
    (`Store.update_desired_states`: one transaction per 1,000 nodes), then queue the pokes
    of the nodes connected here on the fan-out task, with a fetch jitter hint of
    ``len(nodes) / fetch_rate`` seconds (at most ``max_jitter``; `pokes.fetch_jitter`).
    In the order of ``nodes``. Raises `NotFound` for a node that is gone, `ConfigError` for
    an invalid state."""
    try:
        states = await store.update_desired_states(
            [(n.id, n.labels) for n in nodes], change.apply, setpoints=change.setpoints,
            expires_at=change.expires_at, actor=actor, now=now, release=change.release)
    except KeyError as exc:
        raise NotFound(f"no node {exc.args[0]!r}") from None
    live = pokes.poke({n: s.version for n, s in states.items()},
                      fetch_jitter(len(nodes), fetch_rate, max_jitter), states)
    away = pokes.forward is not None
    return [Assigned(n.id, states[n.id].version,
                     n.id in live or (away and n.status == "online")) for n in nodes]
