"""The durable buffer of a node: records on their way to the cloud, dead letters, checkpoint.

    store      `Outbox`: the SQLite store (group commits, acknowledgements, reading)
    pressure   its bound on disk and a full disk: eviction, the reserve file
    policy     `choose_evictions`: what to compact or drop when full (pure, no I/O)
    disk       bytes on disk, the write-ahead log's share, the reserve file, a full disk
    numbering  lost ranges, continuity across files, numbers of a node id (`reconcile`)
    schema     the tables and ``meta`` (the file's epoch)
    quarantine `open_outbox`: a damaged file is moved aside, a new epoch started
    compaction raw records to per-key aggregates
    view       `OutboxView`: read-only access for status, dead letters and gap reports
    records    the record types shared by all of the above and their users

A layer of its own below the pipeline engine and the agent: it imports only `edgewise.sync.codec`,
`edgewise.common` and `edgewise.errors`. Whoever runs pipelines (``edgewise run``, the agent)
opens one `Outbox` for its lifetime and lends it to each engine it starts; the agent's uplink
reads and acknowledges through the same object.
"""

from edgewise.outbox.records import (
    PRIORITIES,
    Chunk,
    CommitReport,
    DeadLetter,
    LostRange,
    OutboxDiskFull,
    OutboxHealth,
    PendingChunk,
)
from edgewise.outbox.store import Outbox, OutboxDamaged
from edgewise.outbox.view import OUTBOX_FILE, OutboxView, outbox_file

__all__ = [
    "OUTBOX_FILE",
    "PRIORITIES",
    "Chunk",
    "CommitReport",
    "DeadLetter",
    "LostRange",
    "Outbox",
    "OutboxDamaged",
    "OutboxDiskFull",
    "OutboxHealth",
    "OutboxView",
    "PendingChunk",
    "outbox_file",
]
