"""Ingested streams as a source: what the nodes' outboxes sent to the control plane.

A cloud pipeline (``edgewise cloud pipeline set``) reads the stream ``stream`` of every node
whose labels match ``nodes``. This module holds only its parameters, so the spec loader can
validate a cloud pipeline anywhere; the control plane runs it with its own implementation
(`edgewise.cloud.pipelines.source`), which merges the nodes' chunks in event-time order with a
watermark per node. On a node it refuses to run.
"""

from __future__ import annotations

from pydantic import Field

from edgewise.errors import ConfigError
from edgewise.pipeline.component import ComponentConfig, Source, SourceOutput
from edgewise.pipeline.units import Duration


class StreamConfig(ComponentConfig):
    stream: str = Field(min_length=1, max_length=128)
    """Name of the ingested stream to read (an outbox sink's stream on the nodes)."""
    nodes: dict[str, str] = {}
    """Label selector: read the stream of every node with all these labels (none: every
    node)."""
    max_wait: Duration = Field(default=30.0, ge=0)
    """How long the merge waits for a node that has sent nothing new before it goes on without
    it; what that node sends later is merged into windows still open or goes to their late
    port."""
    poll: Duration = Field(default=0.5, gt=0)
    """How often the store is read for new chunks and new nodes."""
    node_field: str = "node"
    """Column added to every record with the id of the node it came from (empty: none)."""


class StreamSource(Source):
    Config = StreamConfig

    async def run(self, out: SourceOutput) -> None:
        raise ConfigError(f"source {self.id!r}: a stream source reads what nodes sent to the "
                          "control plane; it runs only in a cloud pipeline (edgewise cloud "
                          "pipeline set)")
