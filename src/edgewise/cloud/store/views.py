"""The store, reads for the operator console (`edgewise.cloud.console`): what arrived when.

`stream_activity` gives, per stream of one node, the records of each chunk received since a
time (the console's records-per-interval charts; no payload is read). `recent_chunks` gives the
newest chunks of the streams whose name matches a SQL LIKE pattern (the console's alarms),
newest first, payloads included, at most ``limit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select

from edgewise.cloud.store.db import Database
from edgewise.cloud.store.identity import _node_info as node_info
from edgewise.cloud.store.models import ChunkRow, Node
from edgewise.cloud.store.records import NodeInfo, StoredChunk

MAX_ACTIVITY_ROWS = 200_000  # an hour of one chunk per second on 50 streams, with room


class ViewStore(Database):
    """Reads for the console (module docstring)."""

    async def stream_activity(self, node_id: str, since: datetime
                              ) -> list[tuple[str, datetime, int]]:
        """(stream, received_at, records) of each chunk of ``node_id`` received at or after
        ``since``, oldest first (at most `MAX_ACTIVITY_ROWS`, the newest kept)."""
        q = (select(ChunkRow.stream, ChunkRow.received_at, ChunkRow.records)
             .where(ChunkRow.node_id == node_id, ChunkRow.received_at >= since)
             .order_by(ChunkRow.received_at.desc()).limit(MAX_ACTIVITY_ROWS))
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [(r.stream, r.received_at, int(r.records)) for r in reversed(rows)]

    async def nodes_by_id(self, ids: Sequence[str]) -> list[NodeInfo]:
        """The nodes of ``ids`` (at most 1,000) that exist, in id order."""
        if not ids:
            return []
        q = select(Node).where(Node.id.in_(list(ids)[:1000])).order_by(Node.id)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [node_info(r) for r in rows]

    async def recent_chunks(self, stream_like: str, *, limit: int = 20,
                            node_id: str | None = None) -> list[StoredChunk]:
        """The newest ``limit`` chunks of streams whose name is LIKE ``stream_like`` (of one
        node, or of all), newest first."""
        q = (select(ChunkRow).where(ChunkRow.stream.like(stream_like),
                                    ChunkRow.quarantined.is_(False))  # never a quarantined one
             .order_by(ChunkRow.received_at.desc()).limit(limit))
        if node_id is not None:
            q = q.where(ChunkRow.node_id == node_id)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [StoredChunk(r.node_id, r.stream, r.seq_first, r.seq_count, r.records,
                            bool(r.compacted), bytes(r.payload), r.received_at) for r in rows]
