"""The store, releases and their signed TUF metadata.

Tables (migration 0004): ``releases`` (one row per published version: its manifest bytes, their
digest, counts, who published it), ``tuf_metadata`` (every signed version of every top-level
role, kept: nodes fetch ``<n>.root.json`` for each root version and ``<n>.snapshot.json`` /
``<n>.targets.json`` by version). File contents are not in the database: they are on disk
(`cloud.releases.blobs`).

`update_tuf` is the one way metadata changes: in ONE write transaction it reads the newest
metadata of each role, hands it to a pure function (sign, rotate, re-sign) and inserts what that
returns; `publish_release` does the same together with the new release row, so a release and
the targets that sign it appear at once or not at all. A concurrent writer that took the same
version number makes the transaction fail (primary key) and it is tried again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, Integer, LargeBinary, String, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Mapped, mapped_column

from edgewise.cloud.store.audit import write_audit
from edgewise.cloud.store.db import Database, utc_now
from edgewise.cloud.store.models import Base
from edgewise.errors import BadRequest, ConfigError, StorageError
from edgewise.security.tuf.repository import TopMetadata

ROLES = ("root", "targets", "snapshot", "timestamp")
ATTEMPTS = 5  # transactions tried when a concurrent writer takes the same version

TufChange = Callable[[TopMetadata | None], TopMetadata | None]
"""``newest -> next`` (None: nothing to change); pure, it may run again on a conflict."""


class ReleaseRow(Base):
    __tablename__ = "releases"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the manifest bytes
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    files: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))


class TufMetadataRow(Base):
    __tablename__ = "tuf_metadata"

    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[datetime]


@dataclass(frozen=True)
class ReleaseInfo:
    version: str
    digest: str
    files: int
    bytes: int
    created: datetime
    created_by: str

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "digest": self.digest, "files": self.files,
                "bytes": self.bytes, "created": self.created.isoformat(),
                "created_by": self.created_by}


def _info(r: ReleaseRow) -> ReleaseInfo:
    return ReleaseInfo(r.version, r.digest, r.files, r.bytes, r.created, r.created_by)


class ReleaseExists(BadRequest):
    """A release of this version exists with other content (409)."""

    status = 409


class ReleaseStore(Database):
    """Releases and TUF metadata (part of `Store`)."""

    async def _top(self, conn: AsyncConnection) -> TopMetadata | None:
        newest: dict[str, bytes] = {}
        for role in ROLES:
            row = (await conn.execute(
                select(TufMetadataRow.data).where(TufMetadataRow.role == role)
                .order_by(TufMetadataRow.version.desc()).limit(1))).first()
            if row is not None:
                newest[role] = bytes(row.data)
        if "root" not in newest:
            return None
        return TopMetadata(newest["root"], newest.get("targets"), newest.get("snapshot"),
                           newest.get("timestamp"))

    async def _save(self, conn: AsyncConnection, old: TopMetadata | None, new: TopMetadata,
                    t: datetime) -> list[str]:
        saved = []
        for role in ROLES:
            data = getattr(new, role)
            if data is None or (old is not None and getattr(old, role) == data):
                continue
            await conn.execute(insert(TufMetadataRow).values(
                role=role, version=new.version(role), data=data, created=t))
            saved.append(f"{role} v{new.version(role)}")
        return saved

    async def tuf_top(self) -> TopMetadata | None:
        """The newest signed metadata of each role (None: no root yet, `keys init` not run)."""
        async with self._tx(write=False) as conn:
            return await self._top(conn)

    async def tuf_metadata(self, role: str, version: int | None = None) -> bytes | None:
        """One role's signed bytes: ``version``, or the newest."""
        q = select(TufMetadataRow.data).where(TufMetadataRow.role == role)
        q = (q.where(TufMetadataRow.version == version) if version is not None
             else q.order_by(TufMetadataRow.version.desc()).limit(1))
        async with self._tx(write=False) as conn:
            row = (await conn.execute(q)).first()
        return None if row is None else bytes(row.data)

    async def update_tuf(self, change: TufChange, *, actor: str, action: str,
                         now: datetime | None = None) -> TopMetadata | None:
        """Apply ``change`` to the newest metadata and store the result, in one transaction
        (audited as ``action`` when something was signed). Returns what is newest after."""
        t = utc_now(now)
        for attempt in range(ATTEMPTS):
            try:
                async with self._tx() as conn:
                    old = await self._top(conn)
                    new = change(old)
                    if new is None:
                        return old
                    saved = await self._save(conn, old, new, t)
                    if saved:
                        await write_audit(conn, t, actor, action, "tuf", {"signed": saved})
                    return new
            except IntegrityError:
                if attempt == ATTEMPTS - 1:
                    raise StorageError("TUF metadata: concurrent writers kept taking the same "
                                       "version; retry") from None
        raise AssertionError("not reached")

    async def publish_release(self, version: str, manifest: bytes, digest: str, files: int,
                              total: int, sign: TufChange, *, actor: str,
                              now: datetime | None = None) -> tuple[ReleaseInfo, bool]:
        """Store release ``version`` and the metadata ``sign`` makes for it, in one transaction.

        The same manifest again is no change (``False``); another manifest under a version
        that exists is `ReleaseExists`. Returns the release and whether it is new."""
        t = utc_now(now)
        for attempt in range(ATTEMPTS):
            try:
                async with self._tx() as conn:
                    row = (await conn.execute(
                        select(ReleaseRow).where(ReleaseRow.version == version))).first()
                    if row is not None:
                        if row.digest != digest:
                            raise ReleaseExists(
                                f"release {version} exists with other content (manifest "
                                f"{row.digest[:12]}); publish under a new version")
                        return _info(row), False
                    old = await self._top(conn)
                    new = sign(old)
                    if new is None:
                        raise ConfigError("no TUF metadata to sign the release into")
                    await conn.execute(insert(ReleaseRow).values(
                        version=version, digest=digest, manifest=manifest, files=files,
                        bytes=total, created=t, created_by=actor))
                    saved = await self._save(conn, old, new, t)
                    await write_audit(conn, t, actor, "release.publish", f"release:{version}",
                                      {"digest": digest, "files": files, "bytes": total,
                                       "signed": saved})
                    return ReleaseInfo(version, digest, files, total, t, actor), True
            except IntegrityError:
                if attempt == ATTEMPTS - 1:
                    raise StorageError(f"release {version}: concurrent writers; retry") from None
        raise AssertionError("not reached")

    async def get_release(self, version: str) -> tuple[ReleaseInfo, bytes] | None:
        """A release and its manifest bytes."""
        async with self._tx(write=False) as conn:
            row = (await conn.execute(
                select(ReleaseRow).where(ReleaseRow.version == version))).first()
        return None if row is None else (_info(row), bytes(row.manifest))

    async def list_releases(self, limit: int = 1000) -> list[ReleaseInfo]:
        """Newest first."""
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(
                select(ReleaseRow.version, ReleaseRow.digest, ReleaseRow.files,
                       ReleaseRow.bytes, ReleaseRow.created, ReleaseRow.created_by)
                .order_by(ReleaseRow.created.desc(), ReleaseRow.version).limit(limit))).all()
        return [ReleaseInfo(*r) for r in rows]

    async def count_releases(self) -> int:
        async with self._tx(write=False) as conn:
            return int((await conn.execute(select(func.count()).select_from(ReleaseRow)))
                       .scalar_one())
