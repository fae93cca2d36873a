"""The rollout routes' request and answer models (the API's contract; the CLI sends and reads
the same)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TTL_S = 90 * 86400.0


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    release: str = Field(min_length=1, max_length=64)
    selector: str = Field(min_length=1, max_length=4096,
                          description="label selector, e.g. site=plant1,line=1")
    canary: str = Field("1", max_length=16, description="nodes first: a count or N%")
    waves: str = Field("100%", max_length=256, description="cumulative percents, e.g. "
                                                            "10%,50%,100%")
    bake_s: float = Field(0.0, ge=0, le=MAX_TTL_S)
    max_failures: str = Field("0", max_length=16, description="a count or N% of the nodes")
    max_unavailable_per_site: int | None = Field(None, ge=1, le=1_000_000)
    site_label: str = Field("site", min_length=1, max_length=128)
    gates: list[str] = Field(default_factory=list, max_length=10)
    node_timeout_s: float = Field(600.0, gt=0, le=MAX_TTL_S)
    intent_ttl_s: float = Field(86400.0, gt=0, le=MAX_TTL_S)


class RolloutCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=1000)


class RolloutQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: Literal["problems", "all", "none"] = "problems"


class RolloutListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1, le=1000)


class Wave(BaseModel):
    index: int
    name: str
    nodes: int
    states: dict[str, int]


class RolloutNode(BaseModel):
    node: str
    wave: int
    site: str | None
    state: str
    previous: str | None
    version: int | None
    assigned_at: datetime | None
    changed_at: datetime
    reason: str


class Rollout(BaseModel):
    id: str
    release: str
    state: str
    wave: int
    wave_name: str | None
    reason: str
    paused_by: str | None
    spec: dict[str, Any]
    total: int
    states: dict[str, int]
    created: datetime
    created_by: str
    updated: datetime
    completed_at: datetime | None
    driver: str | None


class RolloutDetail(Rollout):
    waves: list[Wave]
    nodes: list[RolloutNode]


class RolloutList(BaseModel):
    rollouts: list[Rollout]
