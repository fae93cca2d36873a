"""The HTTP API's models of fleet operations: config layers, ``config diff``/``apply``, the
drift report, health states and quarantine (docs/operations.md). Routes in `routes`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgewise.cloud.openapi.models import HeldNode, Model, Node, parse_selector

StateName = Literal["online", "degraded", "offline", "quarantined"]


def _check_selector(v: str | None) -> str | None:
    if v is not None:
        parse_selector(v)
    return v


# -- config layers ----------------------------------------------------------------------------


class LayerQuery(Model):
    node: str | None = Field(default=None, description="Include this node's own layer.")


class LayerModel(Model):
    kind: Literal["fleet", "group", "node"]
    name: str = Field(description="The group's name or the node's id; empty for the fleet.")
    key: str = Field(description="fleet, group:NAME or node:ID")
    values: dict[str, Any]
    selector: dict[str, str] = Field(description="Groups: the labels a node must have.")
    position: int = Field(description="Groups: lower positions apply first.")
    version: int
    updated: datetime | None
    updated_by: str | None


class LayerList(Model):
    layers: list[LayerModel] = Field(description="In the order they apply.")


class LayerWrite(Model):
    kind: Literal["fleet", "group", "node"]
    name: str = Field(default="", max_length=128,
                      description="The group's name or the node's id; empty for the fleet.")
    set: dict[str, Any] = Field(default_factory=dict, description="Keys set in this layer.")
    remove: list[str] = Field(default_factory=list, max_length=512,
                              description="Keys taken out of this layer.")
    selector: str | None = Field(default=None, description=(
        "Groups: label equality (site=plant1,line=1); required when the group is new; "
        "empty matches every node."))
    position: int | None = Field(default=None, ge=-1_000_000, le=1_000_000, description=(
        "Groups: the order among groups (lower first; ties by name). Kept when not given."))
    if_version: int | None = Field(default=None, ge=0, description=(
        "Refuse (409) unless the layer is at this version (0: it must not exist yet)."))
    delete: bool = Field(default=False, description="Delete the layer.")

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        return _check_selector(v)

    @field_validator("set")
    @classmethod
    def _set(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > 512:
            raise ValueError("at most 512 keys at once")
        return v


class LayerWriteResponse(Model):
    layer: LayerModel | None = Field(description="The layer as stored; null when deleted.")
    deleted: bool = False


# -- diff and apply ---------------------------------------------------------------------------


class DiffQuery(Model):
    node: str


class ConfigChange(Model):
    key: str
    before: Any = Field(description="The value in the newest desired config (null: absent).")
    after: Any = Field(description="The effective value (null: removed).")
    source: str | None = Field(description="The layer the effective value comes from.")


class ConfigDiff(Model):
    node: str
    desired_version: int = Field(description="The newest desired version (0: none).")
    effective: dict[str, Any]
    sources: dict[str, str] = Field(description="Key -> the layer its value comes from.")
    layers: list[LayerModel] = Field(description="The layers that apply, in order.")
    changes: list[ConfigChange] = Field(description="What `config apply` would change.")


class ConfigApplyRequest(Model):
    node: str | None = None
    selector: str | None = None
    all: bool = Field(default=False, description="Every node that is not revoked.")

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        return _check_selector(v)

    @model_validator(mode="after")
    def _one(self) -> ConfigApplyRequest:
        if sum((self.node is not None, self.selector is not None, self.all)) != 1:
            raise ValueError("give exactly one of node, selector and all")
        return self


class AppliedVersion(Model):
    node: str
    version: int
    changes: int = Field(description="Keys changed.")
    notified: bool


class ConfigApplyResponse(Model):
    nodes: list[AppliedVersion] = Field(description="Nodes that got a new desired version.")
    unchanged: int = Field(description="Nodes whose desired config was up to date already.")
    held: list[HeldNode] = Field(default_factory=list, description=(
        "Quarantined nodes left out: no config goes to them."))


# -- drift, states, quarantine ----------------------------------------------------------------


class DriftQuery(Model):
    selector: str | None = None
    limit: int = Field(default=1000, ge=1, le=1000)
    after: str | None = Field(default=None, description="Look at nodes after this id.")

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        return _check_selector(v)


class DriftEntry(Model):
    node: str
    state: StateName
    desired_version: int
    applied_version: int | None
    reasons: list[str]


class DriftList(Model):
    nodes: list[DriftEntry]
    checked: int = Field(description="Nodes looked at by this page.")
    next: str | None = Field(description="Pass as ?after= for the next page; null at the end.")


class FleetNodesQuery(Model):
    state: StateName | None = None
    selector: str | None = None
    limit: int = Field(default=1000, ge=1, le=1000)
    after: str | None = None

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        return _check_selector(v)


class FleetNode(Node):
    state: StateName
    reasons: list[str]
    health: dict[str, Any] | None = Field(description=(
        "The newest health from the node's heartbeat (sync.health), with clock_offset_s."))
    health_at: datetime | None
    quarantine: str | None = Field(description="Why it is quarantined; null: it is not.")


class FleetNodeList(Model):
    nodes: list[FleetNode]
    next: str | None = Field(description="Pass as ?after= for the next page; null at the end.")


class QuarantineRequest(Model):
    reason: str | None = Field(default=None, max_length=500, description=(
        "Why; null lifts the quarantine."))

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("give a reason (null lifts the quarantine)")
        return v

