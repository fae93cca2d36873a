"""Layered config (docs/operations.md, "Config layers"): the pure rules, no I/O.

A node's effective config is its layers merged key by key, later layers winning:

    fleet defaults  <  groups (label selectors, by position then name)  <  the node's overrides

A group applies to a node when every ``key=value`` of its selector is among the node's labels
(an empty selector matches every node). A layer holds a flat map of config keys; removing a
key from a layer lets the layers below it show through. ``setpoints`` is not a layer key (they
have their own last-writer-wins path: ``config set --setpoint``).

Each layer has a version that grows by one with every write (`write`); a write may name the
version it read (``if_version``) and is refused with `VersionConflict` (HTTP 409) when another
write came first. `effective` gives the merged map with the layer each value came from, and
`diff` what applying it would change in a node's desired config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from edgewise.errors import BadRequest

Kind = Literal["fleet", "group", "node"]
KINDS: tuple[Kind, ...] = ("fleet", "group", "node")
RESERVED = frozenset({"setpoints"})
MAX_KEYS = 512  # keys in one layer
MAX_KEY = 128  # characters of a key
MAX_NAME = 128  # characters of a group name


class VersionConflict(BadRequest):
    """A layer write named a version that is no longer the newest (HTTP 409)."""

    status = 409


@dataclass(frozen=True)
class Layer:
    kind: Kind
    name: str  # "" for the fleet layer, the group's name, the node's id
    values: Mapping[str, Any] = field(default_factory=dict)
    selector: Mapping[str, str] = field(default_factory=dict)  # groups only
    position: int = 0  # groups only: lower applies first
    version: int = 0  # 0: never written
    updated: datetime | None = None
    updated_by: str | None = None

    @property
    def key(self) -> str:
        return layer_key(self.kind, self.name)

    def applies_to(self, node_id: str, labels: Mapping[str, str]) -> bool:
        if self.kind == "fleet":
            return True
        if self.kind == "node":
            return self.name == node_id
        return all(labels.get(k) == v for k, v in self.selector.items())


def layer_key(kind: Kind, name: str) -> str:
    """The layer's row key: ``fleet``, ``group:NAME`` or ``node:ID``."""
    return "fleet" if kind == "fleet" else f"{kind}:{name}"


def check_name(kind: Kind, name: str) -> str:
    """The layer's name, checked: none for the fleet, a non-empty one otherwise."""
    if kind not in KINDS:
        raise BadRequest(f"layer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = name.strip()
    if kind == "fleet":
        if name:
            raise BadRequest("the fleet layer has no name")
        return ""
    if not name or len(name) > MAX_NAME:
        raise BadRequest(f"a {kind} layer needs a name of 1 to {MAX_NAME} characters")
    return name


def order(layers: Iterable[Layer]) -> list[Layer]:
    """Layers in the order they apply: the fleet, groups by (position, name), nodes."""
    rank = {"fleet": 0, "group": 1, "node": 2}
    return sorted(layers, key=lambda la: (rank[la.kind], la.position, la.name))


@dataclass(frozen=True)
class Effective:
    values: dict[str, Any]
    source: dict[str, str]  # key -> the layer (`Layer.key`) its value came from
    layers: tuple[str, ...]  # the layers that apply, in order


def effective(layers: Iterable[Layer], node_id: str, labels: Mapping[str, str]) -> Effective:
    """The node's effective config: the layers that apply to it merged in `order`."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    used: list[str] = []
    for layer in order(la for la in layers if la.applies_to(node_id, labels)):
        used.append(layer.key)
        for key, value in layer.values.items():
            values[key] = value
            source[key] = layer.key
    return Effective(values, source, tuple(used))


def write(values: Mapping[str, Any], set_: Mapping[str, Any], remove: Sequence[str]
          ) -> dict[str, Any]:
    """A layer's next values: ``set_`` merged key by key, then ``remove`` taken out.
    Raises `BadRequest` for a reserved or malformed key, a key both set and removed, a None
    value (remove the key instead) or a layer of more than `MAX_KEYS` keys."""
    both = sorted(set(set_) & set(remove))
    if both:
        raise BadRequest(f"key(s) {', '.join(both)} both set and removed")
    for key in (*set_, *remove):
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY:
            raise BadRequest(f"config keys are 1 to {MAX_KEY} characters, got {key!r:.40}")
        if key in RESERVED:
            raise BadRequest(f"{key!r} is not a layer key (use `config set --setpoint`)")
    nulls = sorted(k for k, v in set_.items() if v is None)
    if nulls:
        raise BadRequest(f"key(s) {', '.join(nulls)} set to null: remove them instead")
    out = {k: v for k, v in values.items() if k not in remove}
    out.update(set_)
    if len(out) > MAX_KEYS:
        raise BadRequest(f"a layer holds at most {MAX_KEYS} keys; this one would hold "
                         f"{len(out)}")
    return out


@dataclass(frozen=True)
class Change:
    key: str
    before: Any  # None: absent
    after: Any  # None: removed
    source: str | None  # the layer of the new value; None when removed


def managed(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a desired config the layers own (all but `RESERVED` keys)."""
    return {k: v for k, v in config.items() if k not in RESERVED}


def diff(current: Mapping[str, Any], eff: Effective) -> list[Change]:
    """What applying ``eff`` would change in a desired config ``current``, by key."""
    now = managed(current)
    out: list[Change] = []
    for key in sorted(set(now) | set(eff.values)):
        if key not in eff.values:
            out.append(Change(key, now[key], None, None))
        elif key not in now or now[key] != eff.values[key]:
            out.append(Change(key, now.get(key), eff.values[key], eff.source[key]))
    return out
