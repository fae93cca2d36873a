"""The store, what nodes sent: chunks, gaps (sequence numbers reported lost) and per-stream
marks and counters; the group commit's one transaction (`commit_ingest`: one multi-row insert
per 1,000 chunks or gaps and one executemany upsert of the stream marks), reads for the
operator API, and retention's `purge_chunks`.

The group commit runs for every batch of every node, so its statements are built for the CPU
(issue 11, steady state): Core tables, not the ORM classes (the ORM's bulk path converted every
row), and the marks as one statement compiled once and cached, run with executemany, not a
multi-row VALUES clause compiled anew for each commit (each of its bound values visited by the
compiler): 155 -> 40 µs of CPU per batch for 2,000 nodes, `benchmarks/ingest_many_nodes.py`.
On SQLite the whole transaction runs in one hand-off to the write connection's thread
(`db.Database._sqlite_tx`, the same statements compiled once for the driver: `_RawIngest`),
not a dozen (cursor, execute, fetch, close of each statement, BEGIN, COMMIT)."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import and_, bindparam, case, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from edgewise.cloud.store.db import Database, RawStatement
from edgewise.cloud.store.models import ChunkRow, DesiredStateRow, GapRow, StreamRow
from edgewise.cloud.store.records import (
    ChunkWrite,
    GapInfo,
    GapWrite,
    IngestResult,
    MarkWrite,
    SeqRange,
    StoredChunk,
    StreamInfo,
)

_CHUNKS = ChunkRow.__table__
_GAPS = GapRow.__table__
_STREAMS = StreamRow.__table__


_MARK_KEYS = ("node_id", "stream", "contiguous", "stored_records", "gap_records",
              "last_received")


@dataclass
class _Counted:
    """What one commit inserted, per stream: the base of the mark upserts and the result."""

    inserted: set[tuple[str, str, int]]
    gap_keys: set[tuple[str, str, int]]
    stored: dict[tuple[str, str], int]
    lost: dict[tuple[str, str], int]
    last: dict[tuple[str, str], datetime]

    @classmethod
    def empty(cls) -> _Counted:
        return cls(set(), set(), {}, {}, {})

    def chunk(self, c: ChunkWrite) -> None:
        key = (c.node_id, c.stream, c.seq_first)
        self.inserted.add(key)
        self.stored[key[:2]] = self.stored.get(key[:2], 0) + c.records
        self.last[key[:2]] = max(self.last.get(key[:2], c.received_at), c.received_at)

    def gap(self, g: GapWrite) -> None:
        key = (g.node_id, g.stream, g.seq_first)
        self.gap_keys.add(key)
        self.lost[key[:2]] = self.lost.get(key[:2], 0) + g.seq_count

    def mark_rows(self, marks: Sequence[MarkWrite]) -> list[dict[str, Any]]:
        mark_of = {(m.node_id, m.stream): m for m in marks}
        rows = []
        for key in sorted(set(mark_of) | set(self.stored) | set(self.lost)):
            m = mark_of.get(key)
            rows.append({"node_id": key[0], "stream": key[1],
                         "contiguous": m.contiguous if m else 0,
                         "stored_records": self.stored.get(key, 0),
                         "gap_records": self.lost.get(key, 0),
                         "last_received": m.last_received if m else self.last.get(key)})
        return rows

    def result(self) -> IngestResult:
        return IngestResult(frozenset(self.inserted), frozenset(self.gap_keys),
                            sum(self.stored.values()))


@dataclass(frozen=True)
class _RawIngest:
    """The group commit's statements for SQLite's driver (one row per execute: RETURNING)."""

    chunk: RawStatement
    gap: RawStatement
    mark: RawStatement

    def commit(self, chunks: Sequence[ChunkWrite], gaps: Sequence[GapWrite],
               marks: Sequence[MarkWrite], conn: sqlite3.Connection) -> _Counted:
        """In the write connection's thread, inside its transaction (`_sqlite_tx`)."""
        counted = _Counted.empty()
        for c in chunks:
            if conn.execute(self.chunk.sql, self.chunk.params(vars(c))).fetchone() is not None:
                counted.chunk(c)
        for g in gaps:
            if conn.execute(self.gap.sql, self.gap.params(vars(g))).fetchone() is not None:
                counted.gap(g)
        rows = counted.mark_rows(marks)
        if rows:
            conn.executemany(self.mark.sql, [self.mark.params(r) for r in rows])
        return counted


@dataclass(frozen=True)
class _RawStart:
    """`ChunkStore.session_start`'s reads for the hot reads' own connections, SQLite's driver
    (`read`) or asyncpg (`read_pg`) (ints and text only: no result processing needed)."""

    streams: RawStatement
    chunks: RawStatement
    gaps: RawStatement
    desired: RawStatement

    def read(self, node_id: str, conn: sqlite3.Connection
             ) -> tuple[dict[str, tuple[int, list[SeqRange]]], int]:
        out: dict[str, tuple[int, list[SeqRange]]] = {}
        for stream, contiguous in conn.execute(self.streams.sql,
                                               self.streams.params({"node_id": node_id})):
            params = {"node_id": node_id, "stream": stream, "seq": contiguous}
            above = [SeqRange(f, c) for f, c in conn.execute(self.chunks.sql,
                                                             self.chunks.params(params))]
            above += [SeqRange(f, c, gap=True)
                      for f, c in conn.execute(self.gaps.sql, self.gaps.params(params))]
            out[stream] = (contiguous, sorted(above, key=lambda r: r.first))
        row = conn.execute(self.desired.sql, self.desired.params({"node_id": node_id}))
        version = row.fetchone()[0]
        return out, int(version or 0)

    async def read_pg(self, node_id: str, conn: Any
                      ) -> tuple[dict[str, tuple[int, list[SeqRange]]], int]:
        """The same on PostgreSQL (an asyncpg connection, `Database._pg_read`)."""
        out: dict[str, tuple[int, list[SeqRange]]] = {}
        for stream, contiguous in await conn.fetch(self.streams.sql, node_id):
            above = [SeqRange(f, c) for f, c in await conn.fetch(
                self.chunks.sql, *self.chunks.params(
                    {"node_id": node_id, "stream": stream, "seq": contiguous}))]
            above += [SeqRange(f, c, gap=True) for f, c in await conn.fetch(
                self.gaps.sql, *self.gaps.params(
                    {"node_id": node_id, "stream": stream, "seq": contiguous}))]
            out[stream] = (contiguous, sorted(above, key=lambda r: r.first))
        version = await conn.fetchval(self.desired.sql, node_id)
        return out, int(version or 0)


def _stream_info(row: Any) -> StreamInfo:
    return StreamInfo(row.node_id, row.stream, row.contiguous, row.stored_records,
                      row.gap_records, row.last_received)


class ChunkStore(Database):
    """Chunks, gaps and stream marks (part of `Store`)."""

    async def session_start(self, node_id: str) -> tuple[dict[str, tuple[int, list[SeqRange]]],
                                                         int]:
        """What a session needs before its welcome, in ONE read transaction: per stream of the
        node its contiguous mark and the ranges settled above it (`settled_above`), and the
        node's newest desired version (0 if none). On SQLite one hand-off to a reader's
        thread: in a reconnect storm thousands of hellos read at once, and three or more
        transactions each, several hand-offs a statement, held the four reader connections so
        long that waiters ran out of ``store_wait`` (issue 11)."""
        if self.dialect == "sqlite":
            return await self._sqlite_tx(partial(self._raw_start().read, node_id), write=False)
        return await self._pg_read(partial(self._raw_start().read_pg, node_id))

    def _start_statements(self) -> tuple[Any, Any, Any, Any]:
        stmts = getattr(self, "_start_stmts", None)
        if stmts is None:
            node, stream, seq = bindparam("node_id"), bindparam("stream"), bindparam("seq")
            stmts = self._start_stmts = (
                select(StreamRow.stream, StreamRow.contiguous).where(StreamRow.node_id == node),
                select(ChunkRow.seq_first, ChunkRow.seq_count)
                .where(ChunkRow.node_id == node, ChunkRow.stream == stream,
                       ChunkRow.seq_first >= seq).order_by(ChunkRow.seq_first),
                select(GapRow.seq_first, GapRow.seq_count)
                .where(GapRow.node_id == node, GapRow.stream == stream,
                       GapRow.seq_first >= seq).order_by(GapRow.seq_first),
                select(func.max(DesiredStateRow.version))
                .where(DesiredStateRow.node_id == node))
        return stmts

    def _raw_start(self) -> _RawStart:
        raw = getattr(self, "_raw_start_stmts", None)
        if raw is None:
            raw = self._raw_start_stmts = _RawStart(
                *(self.raw_statement(s, ()) for s in self._start_statements()))
        return raw

    async def load_streams(self, node_id: str) -> dict[str, StreamInfo]:
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(StreamRow).where(StreamRow.node_id == node_id)
                                       )).all()
        return {r.stream: _stream_info(r) for r in rows}

    async def settled_above(self, node_id: str, stream: str, from_seq: int, *,
                            limit: int = 100_000) -> list[SeqRange]:
        """Stored chunks and gaps of a stream starting at or above ``from_seq`` (the ranges that
        arrived out of order above the contiguous mark), in seq order."""
        async with self._tx(write=False) as conn:
            chunks = (await conn.execute(
                select(ChunkRow.seq_first, ChunkRow.seq_count)
                .where(ChunkRow.node_id == node_id, ChunkRow.stream == stream,
                       ChunkRow.seq_first >= from_seq)
                .order_by(ChunkRow.seq_first).limit(limit))).all()
            gaps = (await conn.execute(
                select(GapRow.seq_first, GapRow.seq_count)
                .where(GapRow.node_id == node_id, GapRow.stream == stream,
                       GapRow.seq_first >= from_seq)
                .order_by(GapRow.seq_first).limit(limit))).all()
        out = [SeqRange(r.seq_first, r.seq_count) for r in chunks]
        out += [SeqRange(r.seq_first, r.seq_count, gap=True) for r in gaps]
        return sorted(out, key=lambda r: r.first)

    async def commit_ingest(self, chunks: Sequence[ChunkWrite], gaps: Sequence[GapWrite] = (),
                            marks: Sequence[MarkWrite] = (), *,
                            fence: Callable[[AsyncConnection], Awaitable[None]] | None = None
                            ) -> IngestResult:
        """Store chunks and gaps and move contiguous marks, all in one transaction.

        A chunk or gap whose (node, stream, seq_first) is already stored is skipped (the
        primary key is the last guard against storing anything twice); stream counters count
        only what was inserted. Marks never move backwards. Raises `StorageError`.
        ``fence`` runs first in the same transaction; what it raises rolls everything back
        (a cloud pipeline's lease: `CloudPipelineStore.commit_pipeline_results`).
        """
        if self.dialect == "sqlite" and fence is None:  # one hand-off for all of it
            raw = self._raw_ingest()
            return (await self._sqlite_tx(partial(raw.commit, chunks, gaps, marks))).result()
        counted = _Counted.empty()
        by_key = {(c.node_id, c.stream, c.seq_first): c for c in chunks}
        gaps_by_key = {(g.node_id, g.stream, g.seq_first): g for g in gaps}
        chunk_insert, gap_insert, mark_upsert = self._ingest_statements()
        async with self._tx() as conn:
            if fence is not None:
                await fence(conn)
            if chunks:
                rows = await conn.execute(chunk_insert, [vars(c) for c in chunks])
                for r in rows:
                    counted.chunk(by_key[(r.node_id, r.stream, r.seq_first)])
            if gaps:
                rows = await conn.execute(gap_insert, [vars(g) for g in gaps])
                for r in rows:
                    counted.gap(gaps_by_key[(r.node_id, r.stream, r.seq_first)])
            # one executemany upsert, not one statement per stream: with many nodes each
            # sending rarely, a group commit touches as many streams as batches
            rows_ = counted.mark_rows(marks)
            if rows_:
                await conn.execute(mark_upsert, rows_)
        return counted.result()

    def _raw_ingest(self) -> _RawIngest:
        raw = getattr(self, "_raw_ingest_stmts", None)
        if raw is None:
            chunk_insert, gap_insert, mark_upsert = self._ingest_statements()
            raw = self._raw_ingest_stmts = _RawIngest(
                self.raw_statement(chunk_insert, [c.name for c in _CHUNKS.c]),
                self.raw_statement(gap_insert, [c.name for c in _GAPS.c]),
                self.raw_statement(mark_upsert, _MARK_KEYS))
        return raw

    def _ingest_statements(self) -> tuple[Any, Any, Any]:
        """The chunk and gap inserts and the mark upsert, built once per store: SQLAlchemy
        keeps a statement's cache key on the object, so a new object for every commit had its
        key computed again each time."""
        stmts = getattr(self, "_ingest_stmts", None)
        if stmts is None:
            stmts = self._ingest_stmts = (
                self._insert(_CHUNKS).on_conflict_do_nothing().returning(
                    _CHUNKS.c.node_id, _CHUNKS.c.stream, _CHUNKS.c.seq_first),
                self._insert(_GAPS).on_conflict_do_nothing().returning(
                    _GAPS.c.node_id, _GAPS.c.stream, _GAPS.c.seq_first),
                self._mark_upsert())
        return stmts

    def _mark_upsert(self) -> Any:
        """Insert a stream's row or add to its counters; the mark never moves back."""
        ins = self._insert(_STREAMS)
        excluded, t = ins.excluded, _STREAMS.c
        return ins.on_conflict_do_update(
            index_elements=[t.node_id, t.stream],
            set_={
                "contiguous": case((excluded.contiguous > t.contiguous, excluded.contiguous),
                                   else_=t.contiguous),
                "stored_records": t.stored_records + excluded.stored_records,
                "gap_records": t.gap_records + excluded.gap_records,
                "last_received": func.coalesce(excluded.last_received, t.last_received),
            })

    async def stream_stats(self, node_id: str | None = None) -> list[StreamInfo]:
        """Per (node, stream): contiguous mark, records stored and lost (`edgewise data stats`)."""
        q = select(StreamRow).order_by(StreamRow.node_id, StreamRow.stream)
        if node_id is not None:
            q = q.where(StreamRow.node_id == node_id)
        async with self._tx(write=False) as conn:
            return [_stream_info(r) for r in (await conn.execute(q)).all()]

    async def read_chunks(self, node_id: str, stream: str, *, from_seq: int = 0,
                          since: datetime | None = None, limit: int = 100,
                          include_quarantined: bool = False) -> list[StoredChunk]:
        """Stored chunks of one stream in seq order from ``from_seq`` (decode the payloads with
        `edgewise.sync.codec.decode`); ``since`` filters on the time they were received.
        Chunks sent while the node was quarantined are left out unless
        ``include_quarantined``."""
        q = (select(ChunkRow).where(ChunkRow.node_id == node_id, ChunkRow.stream == stream,
                                    ChunkRow.seq_first >= from_seq)
             .order_by(ChunkRow.seq_first).limit(limit))
        if since is not None:
            q = q.where(ChunkRow.received_at >= since)
        if not include_quarantined:
            q = q.where(ChunkRow.quarantined.is_(False))
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [StoredChunk(r.node_id, r.stream, r.seq_first, r.seq_count, r.records,
                            bool(r.compacted), bytes(r.payload), r.received_at,
                            bool(r.quarantined)) for r in rows]

    async def chunk_start(self, node_id: str, stream: str, seq: int) -> int:
        """The first seq of the stored chunk that holds ``seq`` (or ``seq`` when none starts at
        or below it): one index probe, where a data query starts reading."""
        if seq == 0:
            return 0
        async with self._tx(write=False) as conn:
            first = (await conn.execute(
                select(func.max(ChunkRow.seq_first)).where(
                    ChunkRow.node_id == node_id, ChunkRow.stream == stream,
                    ChunkRow.seq_first <= seq))).scalar()
        return int(first) if first is not None else seq

    async def list_gaps(self, node_id: str, stream: str | None = None) -> list[GapInfo]:
        q = select(GapRow).where(GapRow.node_id == node_id).order_by(GapRow.stream,
                                                                     GapRow.seq_first)
        if stream is not None:
            q = q.where(GapRow.stream == stream)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [GapInfo(r.node_id, r.stream, r.seq_first, r.seq_count, r.reason, r.received_at)
                for r in rows]

    async def purge_chunks(self, received_before: datetime, *, limit: int = 10_000) -> int:
        """Retention: delete up to ``limit`` chunks received before the cutoff (call in a loop
        until it returns less than ``limit``). Stream marks and counters are kept."""
        async with self._tx() as conn:
            keys = (await conn.execute(
                select(ChunkRow.node_id, ChunkRow.stream, ChunkRow.seq_first)
                .where(ChunkRow.received_at < received_before).limit(limit))).all()
            for k in keys:
                await conn.execute(delete(ChunkRow).where(and_(
                    ChunkRow.node_id == k.node_id, ChunkRow.stream == k.stream,
                    ChunkRow.seq_first == k.seq_first)))
        return len(keys)
