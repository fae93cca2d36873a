"""The log sink: records as lines on the run's log (for development and debugging)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Sink
from edgewise.pipeline.latency import LatencyRecorder

log = logging.getLogger("edgewise.sink")


class LogConfig(ComponentConfig):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Log level of the records (case does not matter)."""
    max_per_batch: int = Field(default=10, ge=1)
    """At most this many records of each batch are logged (all are counted)."""

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v


class LogSink(Sink):
    Config = LogConfig

    def __init__(self, id: str, config: LogConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.level = logging.getLevelName(config.level)
        self.latency = LatencyRecorder()

    def write(self, batch: Batch) -> None:
        self.latency.record_batch(batch)
        for rec in batch.to_records()[: self.config.max_per_batch]:
            log.log(self.level, "%s %s", self.id, orjson.dumps(rec).decode())
        self.written += batch.n

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "latency": self.latency.summary()}
