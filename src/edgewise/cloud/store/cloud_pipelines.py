"""The store, cloud pipelines: the pipelines the control plane runs over ingested streams.

Table (migration 0006): ``cloud_pipelines``, one row per name with its YAML text, a digest of
it, a version that grows by one with every change, and who changed it when. `put_cloud_pipeline`
and `delete_cloud_pipeline` audit the change in the same transaction (``cloud-pipeline.set`` /
``cloud-pipeline.delete``, target ``cloud-pipeline:<name>``). The text is validated by the
caller (`edgewise.cloud.pipelines.spec`); the store keeps it as given.

Table (migration 0010): ``cloud_pipeline_runs``, one row per name (kept when the pipeline is
deleted, so a pipeline set again continues its sequence numbers): the replica that runs it
(``runner``), a fencing ``term`` and ``lease_until``, and the run's ``state`` as of its last
shipment. **One runner per pipeline**: `take_pipeline_lease` succeeds only when the lease is
free, expired or the caller's own replica's (a restarted process), and bumps the term;
`commit_pipeline_results` stores results, marks and the state in one transaction fenced by
(runner, term), raising `PipelineLeaseLost` (nothing stored) when another replica took over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    LargeBinary,
    String,
    Text,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Mapped, mapped_column

from edgewise.cloud.store.audit import write_audit
from edgewise.cloud.store.chunks import ChunkStore
from edgewise.cloud.store.db import Database, utc_now
from edgewise.cloud.store.models import Base, StreamRow
from edgewise.cloud.store.records import ChunkWrite, IngestResult, MarkWrite
from edgewise.errors import EdgewiseError


class CloudPipelineRow(Base):
    __tablename__ = "cloud_pipelines"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    updated: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(128))


class CloudPipelineRunRow(Base):
    __tablename__ = "cloud_pipeline_runs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    runner: Mapped[str | None] = mapped_column(String(128))
    term: Mapped[int] = mapped_column(BigInteger)
    lease_until: Mapped[datetime | None]
    state: Mapped[bytes | None] = mapped_column(LargeBinary)
    shipped_at: Mapped[datetime | None]


class PipelineLeaseLost(EdgewiseError):
    """Another replica runs the cloud pipeline now; nothing of this write was stored."""


@dataclass(frozen=True)
class PipelineLease:
    """A replica's hold on one cloud pipeline: who, in which term, renewed for how long."""

    name: str
    runner: str
    term: int
    seconds: float


@dataclass(frozen=True)
class CloudPipelineRunner:
    runner: str | None
    term: int
    lease_until: datetime | None
    shipped_at: datetime | None


@dataclass(frozen=True)
class CloudPipelineInfo:
    name: str
    text: str
    digest: str
    version: int
    updated: datetime
    updated_by: str


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _info(r: CloudPipelineRow | object) -> CloudPipelineInfo:
    return CloudPipelineInfo(r.name, r.text, r.digest, int(r.version),  # type: ignore[attr-defined]
                             r.updated, r.updated_by)  # type: ignore[attr-defined]


class CloudPipelineStore(Database):
    """Cloud pipelines (part of `Store`)."""

    async def put_cloud_pipeline(self, name: str, text: str, *, actor: str,
                                 now: datetime | None = None) -> tuple[CloudPipelineInfo, bool]:
        """Store a pipeline's text under its name; (the row, whether it changed). The same text
        again changes nothing and is not audited. Audited as ``cloud-pipeline.set``."""
        t = utc_now(now)
        digest = text_digest(text)
        async with self._tx() as conn:
            old = (await conn.execute(select(CloudPipelineRow).where(
                CloudPipelineRow.name == name))).first()
            if old is not None and old.digest == digest:
                return _info(old), False
            version = 1 if old is None else int(old.version) + 1
            values = {"text": text, "digest": digest, "version": version, "updated": t,
                      "updated_by": actor}
            if old is None:
                await conn.execute(insert(CloudPipelineRow).values(name=name, **values))
            else:
                await conn.execute(update(CloudPipelineRow).where(
                    CloudPipelineRow.name == name).values(**values))
            await write_audit(conn, t, actor, "cloud-pipeline.set", f"cloud-pipeline:{name}",
                              {"version": version, "digest": digest[:16]})
        return CloudPipelineInfo(name, text, digest, version, t, actor), True

    async def get_cloud_pipeline(self, name: str) -> CloudPipelineInfo | None:
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(CloudPipelineRow).where(
                CloudPipelineRow.name == name))).first()
        return None if row is None else _info(row)

    async def list_cloud_pipelines(self) -> list[CloudPipelineInfo]:
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(CloudPipelineRow).order_by(
                CloudPipelineRow.name))).all()
        return [_info(r) for r in rows]

    async def delete_cloud_pipeline(self, name: str, *, actor: str,
                                    now: datetime | None = None) -> bool:
        """Remove a pipeline (its stored results stay); False if there is none. Audited."""
        t = utc_now(now)
        async with self._tx() as conn:
            gone = (await conn.execute(delete(CloudPipelineRow).where(
                CloudPipelineRow.name == name))).rowcount
            if gone:
                await write_audit(conn, t, actor, "cloud-pipeline.delete",
                                  f"cloud-pipeline:{name}", {})
        return bool(gone)

    async def stream_marks(self, stream: str) -> dict[str, int]:
        """Per node, the contiguous mark of one stream (what a cloud pipeline may read)."""
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(StreamRow.node_id, StreamRow.contiguous).where(
                StreamRow.stream == stream))).all()
        return {r.node_id: int(r.contiguous) for r in rows}

    # -- runs: one replica per pipeline ------------------------------------------------------
    async def take_pipeline_lease(self, name: str, runner: str, seconds: float,
                                  now: datetime | None = None) -> PipelineLease | None:
        """Run ``name`` as ``runner`` when nobody holds it, the lease expired or ``runner``
        held it (the same replica started again); the new term, or None."""
        t = utc_now(now)
        async with self._tx() as conn:
            await conn.execute(self._insert(CloudPipelineRunRow).values(
                name=name, runner=None, term=0).on_conflict_do_nothing())
            taken = (await conn.execute(
                update(CloudPipelineRunRow).where(
                    CloudPipelineRunRow.name == name,
                    or_(CloudPipelineRunRow.runner.is_(None),
                        CloudPipelineRunRow.runner == runner,
                        CloudPipelineRunRow.lease_until < t))
                .values(runner=runner, term=CloudPipelineRunRow.term + 1,
                        lease_until=t + timedelta(seconds=seconds)))).rowcount
            if taken != 1:
                return None
            term = (await conn.execute(select(CloudPipelineRunRow.term).where(
                CloudPipelineRunRow.name == name))).scalar_one()
        return PipelineLease(name, runner, int(term), seconds)

    async def renew_pipeline_lease(self, lease: PipelineLease,
                                   now: datetime | None = None) -> bool:
        """Extend the lease; False when another replica holds the pipeline now."""
        t = utc_now(now)
        async with self._tx() as conn:
            return (await conn.execute(update(CloudPipelineRunRow).where(
                *_fenced(lease)).values(
                lease_until=t + timedelta(seconds=lease.seconds)))).rowcount == 1

    async def release_pipeline_lease(self, lease: PipelineLease) -> None:
        """Give the pipeline up (a replica stopping), so another takes it over at once."""
        async with self._tx() as conn:
            await conn.execute(update(CloudPipelineRunRow).where(*_fenced(lease))
                               .values(runner=None, lease_until=None))

    async def pipeline_runner(self, name: str) -> CloudPipelineRunner | None:
        async with self._tx(write=False) as conn:
            r = (await conn.execute(select(
                CloudPipelineRunRow.runner, CloudPipelineRunRow.term,
                CloudPipelineRunRow.lease_until, CloudPipelineRunRow.shipped_at).where(
                CloudPipelineRunRow.name == name))).first()
        return None if r is None else CloudPipelineRunner(r.runner, int(r.term), r.lease_until,
                                                          r.shipped_at)

    async def pipeline_state(self, name: str) -> bytes | None:
        """The run's state as of its last shipment (None: nothing shipped with one yet)."""
        async with self._tx(write=False) as conn:
            return (await conn.execute(select(CloudPipelineRunRow.state).where(
                CloudPipelineRunRow.name == name))).scalar_one_or_none()

    async def commit_pipeline_results(self, lease: PipelineLease, chunks: Sequence[ChunkWrite],
                                      marks: Sequence[MarkWrite], state: bytes,
                                      now: datetime | None = None) -> IngestResult:
        """Results, marks and the run's state in one transaction, fenced by the lease (which it
        renews); `PipelineLeaseLost` (nothing stored) when another replica runs it now."""
        t = utc_now(now)

        async def fence(conn: AsyncConnection) -> None:
            done = (await conn.execute(update(CloudPipelineRunRow).where(*_fenced(lease))
                                       .values(state=state, shipped_at=t,
                                               lease_until=t + timedelta(
                                                   seconds=lease.seconds)))).rowcount
            if done != 1:
                raise PipelineLeaseLost(f"cloud pipeline {lease.name}: another replica runs "
                                        f"it now (term {lease.term} is over)")

        # `Store` is both: the chunks' own insert, in the transaction the fence opens
        return await cast(ChunkStore, self).commit_ingest(chunks, (), marks, fence=fence)


def _fenced(lease: PipelineLease) -> tuple[Any, ...]:
    return (CloudPipelineRunRow.name == lease.name, CloudPipelineRunRow.runner == lease.runner,
            CloudPipelineRunRow.term == lease.term)
