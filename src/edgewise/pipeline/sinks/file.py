"""The file sink: records appended as NDJSON lines (flushed per batch, optionally fsynced)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import orjson

from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Sink
from edgewise.pipeline.latency import LatencyRecorder


class FileSinkConfig(ComponentConfig):
    path: str
    fsync: bool = False


class FileSink(Sink):
    Config = FileSinkConfig

    def __init__(self, id: str, config: FileSinkConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        path = Path(config.path)
        self.path = path if path.is_absolute() else ctx.data_dir / path
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
