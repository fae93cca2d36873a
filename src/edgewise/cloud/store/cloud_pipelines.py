"""The store, cloud pipelines: the pipelines the control plane runs over ingested streams.

Table (migration 0006): ``cloud_pipelines``, one row per name with its YAML text, a digest of
it, a version that grows by one with every change, and who changed it when. `put_cloud_pipeline`
and `delete_cloud_pipeline` audit the change in the same transaction (``cloud-pipeline.set`` /
``cloud-pipeline.delete``, target ``cloud-pipeline:<name>``). The text is validated by the
caller (`edgewise.cloud.pipelines.spec`); the store keeps it as given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, String, Text, delete, insert, select, update
from sqlalchemy.orm import Mapped, mapped_column

from edgewise.cloud.store.audit import write_audit
from edgewise.cloud.store.db import Database, utc_now
from edgewise.cloud.store.models import Base, StreamRow


class CloudPipelineRow(Base):
    __tablename__ = "cloud_pipelines"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    updated: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(128))


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
