"""The outbox sink: records written here are committed durably and later sent to the cloud.

The engine handles the writing itself (group commit with the checkpoint); this class only holds
the parameters: the stream name, its priority (alarms highest) and whether raw records of the
stream may be compacted into per-key aggregates when the outbox is full.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Sink


class OutboxConfig(ComponentConfig):
    stream: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    """Name of the stream the records go to (lower case, digits, '_', '.', '-'); none: the
    sink's id."""
    priority: Literal["alarm", "critical", "high", "normal", "low", "bulk"] | int = "normal"
    """Order of sending and of eviction when the outbox is full (alarm highest, bulk lowest), or
    a number."""
    compact: bool = False
    """true: when the outbox is full, raw records of this stream may be compacted to per-key
    aggregates instead of dropped."""


class OutboxSink(Sink):
    Config = OutboxConfig

    def write(self, batch: Batch) -> None:  # pragma: no cover - the engine writes directly
        raise RuntimeError("the engine writes outbox sinks through its committer")
