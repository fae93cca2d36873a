"""The file sink: records appended as NDJSON lines (flushed per batch, optionally fsynced)."""

from __future__ import annotations

import os
from typing import IO, Any

import orjson

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, FilePath, RunContext, Sink
from edgewise.pipeline.latency import LatencyRecorder


class FileSinkConfig(ComponentConfig):
    path: FilePath
    """The file to append to; relative to the run's data directory. From the control plane: it
    must lie in the node's DATA/pipelines (relative paths are taken from there) or in a folder
    allowed with --allow-path (docs/security.md)."""
    fsync: bool = False
    """true: fsync after each batch (durable against power loss, slower); false: flush only."""


class FileSink(Sink):
    Config = FileSinkConfig

    def __init__(self, id: str, config: FileSinkConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.path = config.file_path("path", ctx.data_dir)
        self._f: IO[bytes] | None = None
        self.latency = LatencyRecorder()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 - closed in stop()

    async def stop(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def write(self, batch: Batch) -> None:
        if self._f is None:
            raise RuntimeError(f"file sink {self.id} is not started")
        data = b"".join(
            orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
            for r in batch.to_records()
        )
        self._f.write(data)
        self._f.flush()
        if self.config.fsync:
            os.fsync(self._f.fileno())
        self.latency.record_batch(batch)
        self.written += batch.n

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "latency": self.latency.summary()}
