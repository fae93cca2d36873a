"""The operator API's data routes: ``GET /v1/data/stats`` and ``GET /v1/data/query``.

Stats: per node and stream, records stored, the contiguous mark and lost records; for one node
also the gaps it reported and the ranges above the mark not received yet (`missing_ranges`).
Query: the stored records of one stream in seq order from ``from_seq`` (``since`` filters on the
record's ``ts``; chunks a quarantined node sent only with ``include_quarantined``, and named in
the answer's ``quarantined``), paged by ``next_seq``: the first read starts at the chunk that holds
``from_seq`` (`Store.chunk_start`) and reads grow from 2 to `CHUNKS_PER_READ` chunks, so a small
page decodes few payloads.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import numpy as np

from edgewise.cloud import openapi as oa
from edgewise.cloud.dataout.render import record_dicts
from edgewise.cloud.operator_call import Call, node_or_404, stream_model
from edgewise.cloud.pipelines.spec import RESULTS_PREFIX
from edgewise.cloud.store import StoredChunk
from edgewise.errors import BadRequest, PeerError, StorageError
from edgewise.sync import codec

SINCE_MARGIN = timedelta(hours=1)  # clock skew allowed between a record's ts and its arrival
CHUNKS_PER_READ = 64  # at most, per store read; the first reads take fewer


def missing_ranges(mark: int, settled: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Holes between the contiguous mark and the settled ranges ``(first, count)`` above it."""
    holes: list[tuple[int, int]] = []
    cursor = mark
    for first, count in sorted(settled):
        if first > cursor:
            holes.append((cursor, first - cursor))
        cursor = max(cursor, first + count)
    return holes


async def _owner(call: Call, node_id: str) -> str:
    """A node's id (404 if unknown), or a cloud pipeline's results node (``cloud:<name>``),
    which has no node record."""
    if node_id.startswith(RESULTS_PREFIX):
        return node_id
    return (await node_or_404(call.store, node_id)).id


async def data_stats(call: Call) -> oa.StatsResponse:
    q: oa.StatsQuery = call.query
    if q.node is None:
        return oa.StatsResponse(streams=[stream_model(s) for s in await call.store.stream_stats()])
    node_id = await _owner(call, q.node)
    gaps_by_stream: dict[str, list[oa.SeqRangeModel]] = {}
    for g in await call.store.list_gaps(node_id):
        gaps_by_stream.setdefault(g.stream, []).append(
            oa.SeqRangeModel(first=g.seq_first, count=g.seq_count, reason=g.reason))
    out = []
    for s in await call.store.stream_stats(node_id):
        above = await call.store.settled_above(node_id, s.stream, s.contiguous)
        holes = missing_ranges(s.contiguous, [(r.first, r.count) for r in above])
        model = stream_model(s)
        model.gaps = gaps_by_stream.get(s.stream, [])
        model.missing = [oa.SeqRangeModel(first=f, count=c) for f, c in holes]
        out.append(model)
    return oa.StatsResponse(streams=out)


def _records_of(node_id: str, q: oa.DataQuery, chunk: StoredChunk, room: int
                ) -> list[oa.Record]:
    """The first ``room`` records of a stored chunk at or after ``q.from_seq`` with ts >=
    ``q.since``."""
    try:
        cols = codec.decode(chunk.payload)
    except PeerError as exc:
        raise StorageError(f"stored chunk {node_id}/{chunk.stream}/{chunk.seq_first} does not "
                           f"decode: {exc}") from None
    n = len(next(iter(cols.values()))) if cols else 0
    seqs = chunk.seq_first + np.arange(n, dtype=np.int64)
    keep = seqs >= q.from_seq
    if q.since is not None:
        ts = cols.get("ts")
        if ts is None or ts.dtype.kind not in "iuf":
            keep &= False
        else:
            keep &= ts >= q.since
    rows = np.flatnonzero(keep)[:room]
    picked = {k: v[rows] for k, v in cols.items()}
    return [oa.Record(seq=int(seqs[i]), data=d)
            for i, d in zip(rows.tolist(), record_dicts(picked), strict=True)]


async def data_query(call: Call) -> oa.DataQueryResponse:
    q: oa.DataQuery = call.query
    node_id = await _owner(call, q.node)
    received_since = None
    if q.since is not None:
        try:
            received_since = datetime.fromtimestamp(q.since, UTC) - SINCE_MARGIN
        except (OverflowError, OSError, ValueError):
            raise BadRequest(f"since={q.since} is not a usable Unix time") from None
    # collect one record more than asked: its seq is where the next page starts
    want = q.limit + 1
    records: list[oa.Record] = []
    flagged: list[oa.SeqRangeModel] = []  # quarantined chunks the records came from
    cursor = await call.store.chunk_start(node_id, q.stream, q.from_seq)
    batch = 2  # chunks per read: grows, so a small page reads few payloads
    while len(records) < want:
        chunks = await call.store.read_chunks(node_id, q.stream, from_seq=cursor,
                                              since=received_since, limit=batch,
                                              include_quarantined=q.include_quarantined)
        for chunk in chunks:
            got = await asyncio.to_thread(  # decoding is never done on the loop
                _records_of, node_id, q, chunk, want - len(records))
            if got and chunk.quarantined:
                flagged.append(oa.SeqRangeModel(first=chunk.seq_first, count=chunk.seq_count,
                                                reason="sent while quarantined"))
            records.extend(got)
            if len(records) >= want:
                break
        if len(chunks) < batch:
            break
        cursor = chunks[-1].seq_first + 1
        batch = min(batch * 2, CHUNKS_PER_READ)
    next_seq = None
    if len(records) > q.limit:
        next_seq = records[q.limit].seq
        del records[q.limit :]
        flagged = [f for f in flagged if f.first < next_seq]
    return oa.DataQueryResponse(node=node_id, stream=q.stream, records=records,
                                next_seq=next_seq, quarantined=flagged)
