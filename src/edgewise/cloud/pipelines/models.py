"""The cloud pipeline routes' request and response bodies (pydantic; the OpenAPI schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 1024 * 1024  # characters of one pipeline's YAML


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CloudPipelineSet(_Model):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    """The pipeline's YAML; its metadata.name must be the name in the path."""


class CloudPipelineSummary(_Model):
    name: str
    version: int
    digest: str
    updated: datetime
    updated_by: str
    results_node: str
    """The node id its results are stored under (``edgewise data query --node``)."""
    state: str
    """running, failed or stopped in this control plane process; unknown when another replica
    runs it (``runner``) or none does yet."""
    error: str | None = None
    runner: str | None = None
    """The control-plane replica that holds the pipeline's lease and runs it (``host/id``;
    none: no replica holds it now)."""
    term: int = 0
    """The lease's term: one more each time a replica takes the pipeline (over)."""
    status: dict[str, Any] = {}
    """The run's figures: readings_in, late, stages, sources (per-node watermarks),
    commits, shipped_chunks, shipped_records."""


class CloudPipelineDetail(CloudPipelineSummary):
    text: str


class CloudPipelineList(_Model):
    pipelines: list[CloudPipelineSummary]


class CloudPipelineSetResponse(_Model):
    name: str
    version: int
    changed: bool


class CloudPipelineDeleteResponse(_Model):
    name: str
    deleted: bool
