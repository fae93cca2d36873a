"""What a pipeline run did: `Engine.summary()`, returned by `Engine.run()` and printed by
``edgewise run --json``.

TypedDicts, so the summary stays a plain JSON-able dict of exactly this shape (readers index it
by key, type checkers know the keys). Sources and sinks report what they measure themselves
(`Source.stats`, `Sink.stats`), so their entries are open dicts.
"""

from __future__ import annotations

from typing import Any, TypedDict

SourceStats = dict[str, Any]
"""``readings`` (read by the engine), then what the source reports itself."""

SinkStats = dict[str, Any]
"""``written`` and ``errors``, plus ``latency`` (`edgewise.pipeline.latency.Latency.summary`:
``count``, ``p50_ms``, ``p99_ms``, ``max_ms``) for a sink that measures accept-to-action, and
whatever else the sink reports."""


class StageSummary(TypedDict):
    out: int  # records emitted on 'out'


class StreamSummary(TypedDict):
    """One outbox stream the pipeline writes."""

    priority: int
    records: int  # sent to the stream by this run
    records_total: int  # ever produced into the stream
    pending: int
    acked: int
    dropped: int
    compacted: int
    bytes_pending: int


class OutboxSummary(TypedDict):
    path: str
    depth_records: int  # pending, all streams
    bytes: int
    max_bytes: int
    dead_letters_stored: int


class EngineSummary(TypedDict):
    pipeline: str
    elapsed_s: float
    readings_in: int
    sources: dict[str, SourceStats]
    stages: dict[str, StageSummary]
    streams: dict[str, StreamSummary]
    sinks: dict[str, SinkStats]  # local sinks (not the outbox)
    alarms: int
    late: int
    dead_lettered: int
    outbox: OutboxSummary
    commits: int
