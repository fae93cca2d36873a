"""`Store`: the control plane's database behind one async interface (SQLite or PostgreSQL).

SQLAlchemy 2.0 Core statements on the ORM tables of `models`, on an async engine (aiosqlite by
default, asyncpg by URL). Every public method is one transaction. The schema is brought to the
newest Alembic revision by `Store.open` (under an advisory lock on PostgreSQL, under SQLite's
write lock otherwise), so several processes may open the same store at once.

SQLite: WAL, ``synchronous=FULL`` (an acknowledged batch survives power loss), one writer
connection in this process taking the write lock up front (``BEGIN IMMEDIATE``, so two writers
never deadlock on a lock upgrade), and separate reader connections.

Database failures surface as `StorageError`; token problems as the `security.tokens` errors.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import alembic.command
import alembic.config
from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from edgewise.cloud.store.models import (
    AuditRow,
    ChunkRow,
    DesiredStateRow,
    EnrolmentTokenRow,
    GapRow,
    Node,
    OperatorTokenRow,
    ReportedStateRow,
    Revocation,
    StreamRow,
)
from edgewise.cloud.store.records import (
    AuditEntry,
    ChunkWrite,
    EnrolmentTokenInfo,
    GapInfo,
    GapWrite,
    IngestResult,
    MarkWrite,
    NodeInfo,
    OperatorTokenInfo,
    ReportedInfo,
    SeqRange,
    StoredChunk,
    StreamInfo,
)
from edgewise.errors import ConfigError, StorageError
from edgewise.security.pki import IssuedCert, validate_node_id
from edgewise.security.tls import RevocationList
from edgewise.security.tokens import (
    EnrolmentToken,
    OperatorToken,
    TokenExpired,
    TokenInvalid,
    TokenUsedUp,
    validate_labels,
)
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import AuditRecord, LwwMap
from edgewise.sync.twin_state import DesiredState, ReportedState

DB_FILE = "edgewise.db"
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_PG_MIGRATION_LOCK = 0x65646777  # "edgw": advisory lock id held while migrating


def database_url(db: str | None, data_dir: str | Path | None) -> str:
    """The async SQLAlchemy URL for ``--db`` (or SQLite in ``data_dir`` when not given).

    Accepts ``postgresql://…`` / ``postgres://…`` (asyncpg is added), ``sqlite:///path``
    (aiosqlite is added) and URLs that already name an async driver. Raises `ConfigError`.
    """
    if not db:
        if data_dir is None:
            raise ConfigError("give --data DIR (SQLite in DIR) or --db URL")
        return f"sqlite+aiosqlite:///{Path(data_dir).resolve() / DB_FILE}"
    try:
        url = make_url(db)
    except ArgumentError:
        raise ConfigError(
            f"--db {db!r} is not a database URL (e.g. postgresql://user@host/db)"
        ) from None
    driver = url.drivername
    if driver in ("postgresql", "postgres", "postgresql+asyncpg"):
        url = url.set(drivername="postgresql+asyncpg")
    elif driver in ("sqlite", "sqlite+aiosqlite"):
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        raise ConfigError(f"--db: unsupported database {driver!r}; use postgresql:// or sqlite://")
    return url.render_as_string(hide_password=False)


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _node_info(row: Any) -> NodeInfo:
    return NodeInfo(
        id=row.id, labels=dict(row.labels or {}), key_fingerprint=row.key_fingerprint,
        cert_serial=int(row.cert_serial, 16), cert_expiry=row.cert_expiry, status=row.status,
        created=row.created, last_seen=row.last_seen, revoked=bool(row.revoked),
    )


def _stream_info(row: Any) -> StreamInfo:
    return StreamInfo(row.node_id, row.stream, row.contiguous, row.stored_records,
                      row.gap_records, row.last_received)


def new_node_id() -> str:
    """A fresh random node id (``node-`` and 12 hex digits)."""
    return f"node-{secrets.token_hex(6)}"


class Store:
    """The control plane's store. ``async with Store(url) as store:`` or `open` / `close`.

    See the package docstring (`edgewise.cloud.store`) for the method list.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._write: AsyncEngine | None = None
        self._read: AsyncEngine | None = None
        self.dialect = ""

    def __repr__(self) -> str:
        return f"Store({make_url(self.url).render_as_string(hide_password=True)!r})"

    @classmethod
    def for_data_dir(cls, data_dir: str | Path, db: str | None = None) -> Store:
        return cls(database_url(db, data_dir))

    # -- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> Store:
        """Connect and migrate to the newest schema. Raises `StorageError`."""
        if self._write is not None:
            raise StorageError("store is already open")
        url = make_url(self.url)
        self.dialect = url.get_backend_name()
        try:
            if self.dialect == "sqlite":
                if url.database and url.database != ":memory:":
                    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
                self._write = self._sqlite_engine(immediate=True, pool_size=1)
                self._read = self._sqlite_engine(immediate=False, pool_size=4)
            else:
                self._write = create_async_engine(self.url, pool_size=10, max_overflow=10,
                                                  pool_pre_ping=True)
                self._read = self._write
            async with self._write.begin() as conn:
                await conn.run_sync(self._migrate)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, (SQLAlchemyError, OSError)):
                raise StorageError(f"cannot open the store {self!r}: {exc}") from None
            raise
        return self

    def _sqlite_engine(self, *, immediate: bool, pool_size: int) -> AsyncEngine:
        engine = create_async_engine(self.url, pool_size=pool_size, max_overflow=0,
                                     connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_connection.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000",
                           "foreign_keys=ON"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _migrate(self, conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        cfg = alembic.config.Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        alembic.command.upgrade(cfg, "head")

    async def close(self) -> None:
        for engine in {id(e): e for e in (self._write, self._read) if e is not None}.values():
            await engine.dispose()
        self._write = self._read = None

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[AsyncConnection]:
        engine = self._write if write else self._read
        if engine is None:
            raise StorageError("store is not open")
        try:
            async with engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StorageError(f"database error: {exc}") from None

    def _insert(self, model: Any) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(model)

    async def schema_revision(self) -> str | None:
        async with self._tx(write=False) as conn:
            row = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).first()
        return row[0] if row else None

    # -- enrolment tokens ---------------------------------------------------------------------
    async def add_enrolment_token(self, token: EnrolmentToken, *, now: datetime | None = None
                                  ) -> None:
        async with self._tx() as conn:
            await conn.execute(insert(EnrolmentTokenRow).values(
                hash=token.hash, labels=dict(token.labels), expires_at=token.expires_at,
                uses_left=token.uses_left, created=_now(now)))

    async def _consume_token(self, conn: AsyncConnection, token_hash: str, now: datetime
                             ) -> dict[str, str]:
        # One conditional UPDATE: two nodes racing for a single-use token cannot both win.
        result = await conn.execute(
            update(EnrolmentTokenRow)
            .where(EnrolmentTokenRow.hash == token_hash, EnrolmentTokenRow.uses_left > 0,
                   EnrolmentTokenRow.expires_at > now)
            .values(uses_left=EnrolmentTokenRow.uses_left - 1)
        )
        row = (await conn.execute(
            select(EnrolmentTokenRow.labels, EnrolmentTokenRow.expires_at,
                   EnrolmentTokenRow.uses_left).where(EnrolmentTokenRow.hash == token_hash)
        )).first()
        if result.rowcount == 1 and row is not None:
            return dict(row.labels or {})
        if row is None:
            raise TokenInvalid("unknown enrolment token")
        if row.expires_at <= now:
            raise TokenExpired(
                f"enrolment token expired at {row.expires_at:%Y-%m-%d %H:%M:%S %Z}; create a "
                "new one with `edgewise cloud token create`"
            )
        raise TokenUsedUp(
            "enrolment token has been used up; create a new one with `edgewise cloud token create`"
        )

    async def use_enrolment_token(self, token_hash: str, *, now: datetime | None = None
                                  ) -> dict[str, str]:
        """Use one use of a token atomically; its labels. Raises `TokenInvalid`,
        `TokenExpired`, `TokenUsedUp` (nothing changes then)."""
        async with self._tx() as conn:
            return await self._consume_token(conn, token_hash, _now(now))

    async def list_enrolment_tokens(self, *, now: datetime | None = None,
                                    include_spent: bool = False) -> list[EnrolmentTokenInfo]:
        t = _now(now)
        q = select(EnrolmentTokenRow).order_by(EnrolmentTokenRow.created)
        if not include_spent:
            q = q.where(EnrolmentTokenRow.uses_left > 0, EnrolmentTokenRow.expires_at > t)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [EnrolmentTokenInfo(r.hash[:12], dict(r.labels), r.expires_at, r.uses_left,
                                   r.created) for r in rows]

    async def purge_enrolment_tokens(self, *, now: datetime | None = None) -> int:
        """Delete expired and used-up tokens; how many."""
        async with self._tx() as conn:
            res = await conn.execute(delete(EnrolmentTokenRow).where(or_(
                EnrolmentTokenRow.uses_left <= 0, EnrolmentTokenRow.expires_at <= _now(now))))
        return res.rowcount

    # -- nodes --------------------------------------------------------------------------------
    async def enrol_node(self, token_hash: str, node_id: str, issued: IssuedCert, *,
                         now: datetime | None = None) -> NodeInfo:
        """Use the token and register the node with its first certificate, in one transaction.

        The node gets the token's labels. Raises the token errors, or `StorageError` if the
        node id is taken (ids are random; retry with a new one).
        """
        validate_node_id(node_id)
        t = _now(now)
        try:
            async with self._tx() as conn:
                labels = await self._consume_token(conn, token_hash, t)
                await conn.execute(insert(Node).values(
                    id=node_id, labels=labels, key_fingerprint=issued.fingerprint,
                    cert_serial=f"{issued.serial:x}", cert_expiry=issued.not_after,
                    status="enrolled", created=t, last_seen=None, revoked=False))
                await self._audit(conn, t, f"node:{node_id}", "node.enrol", f"node:{node_id}",
                                  {"labels": labels, "serial": f"{issued.serial:x}",
                                   "token": token_hash[:12]})
        except IntegrityError:
            raise StorageError(f"node id {node_id} is already taken") from None
        return NodeInfo(node_id, labels, issued.fingerprint, issued.serial, issued.not_after,
                        "enrolled", t, None, False)

    async def get_node(self, node_id: str) -> NodeInfo | None:
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(Node).where(Node.id == node_id))).first()
        return _node_info(row) if row else None

    async def list_nodes(self, labels: Mapping[str, str] | None = None, *, limit: int = 1000,
                         after: str | None = None) -> list[NodeInfo]:
        """Nodes in id order, ``limit`` at a time after id ``after`` (keyset paging), whose
        labels include every ``labels`` pair (JSONB containment on PostgreSQL)."""
        q = select(Node).order_by(Node.id).limit(limit)
        if after is not None:
            q = q.where(Node.id > after)
        for key, value in validate_labels(labels or {}).items():
            if self.dialect == "postgresql":
                q = q.where(type_coerce(Node.labels, postgresql.JSONB).contains({key: value}))
            else:
                q = q.where(func.json_extract(Node.labels, f'$."{key}"') == value)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [_node_info(r) for r in rows]

    async def count_nodes(self) -> int:
        async with self._tx(write=False) as conn:
            return int((await conn.execute(select(func.count()).select_from(Node))).scalar_one())

    async def set_node_labels(self, node_id: str, labels: Mapping[str, str], *, actor: str,
                              now: datetime | None = None) -> NodeInfo:
        """Replace a node's labels (audited). Raises `ConfigError` for bad labels, `KeyError`
        for an unknown node."""
        clean = validate_labels(labels)
        t = _now(now)
        async with self._tx() as conn:
            res = await conn.execute(update(Node).where(Node.id == node_id).values(labels=clean))
            if res.rowcount != 1:
                raise KeyError(node_id)
            await self._audit(conn, t, actor, "node.label", f"node:{node_id}", {"labels": clean})
            row = (await conn.execute(select(Node).where(Node.id == node_id))).one()
        return _node_info(row)

    async def record_renewal(self, node_id: str, issued: IssuedCert, *,
                             now: datetime | None = None) -> None:
        """A renewed or re-authenticated certificate (same key) becomes the node's current one."""
        t = _now(now)
        async with self._tx() as conn:
            res = await conn.execute(
                update(Node).where(Node.id == node_id, Node.key_fingerprint == issued.fingerprint,
                                   Node.revoked.is_(False))
                .values(cert_serial=f"{issued.serial:x}", cert_expiry=issued.not_after))
            if res.rowcount != 1:
                raise StorageError(f"node {node_id} is unknown, revoked or has another key")
            await self._audit(conn, t, f"node:{node_id}", "node.certificate", f"node:{node_id}",
                              {"serial": f"{issued.serial:x}",
                               "expires_at": issued.not_after.isoformat()})

    async def set_node_status(self, node_id: str, status: str, *,
                              now: datetime | None = None) -> None:
        """Status (``online`` / ``offline``) and last-seen time; revoked nodes stay revoked."""
        async with self._tx() as conn:
            await conn.execute(update(Node).where(Node.id == node_id, Node.revoked.is_(False))
                               .values(status=status, last_seen=_now(now)))

    async def touch_nodes(self, seen: Mapping[str, datetime]) -> None:
        """Last-seen times of many nodes in one transaction (the app flushes these in batches)."""
        if not seen:
            return
        stmt = (update(Node).where(Node.id == bindparam("nid"))
                .values(last_seen=bindparam("seen")))
        async with self._tx() as conn:
            await conn.execute(stmt.execution_options(synchronize_session=False),
                               [{"nid": k, "seen": v} for k, v in seen.items()])

    async def revoke_node(self, node_id: str, *, reason: str, actor: str,
                          now: datetime | None = None) -> NodeInfo:
        """Revoke the node's current serial and its key (no renewal, no re-authentication),
        mark it revoked, audit it. Update the app's `RevocationList` with the result (or use
        `load_revocations`). Raises `KeyError` for an unknown node."""
        t = _now(now)
        async with self._tx() as conn:
            row = (await conn.execute(select(Node).where(Node.id == node_id))).first()
            if row is None:
                raise KeyError(node_id)
            await conn.execute(update(Node).where(Node.id == node_id)
                               .values(revoked=True, status="revoked"))
            for values in ({"serial": row.cert_serial}, {"fingerprint": row.key_fingerprint}):
                await conn.execute(self._insert(Revocation).values(
                    node_id=node_id, reason=reason, created=t, **values).on_conflict_do_nothing())
            await self._audit(conn, t, actor, "node.revoke", f"node:{node_id}",
                              {"reason": reason, "serial": row.cert_serial,
                               "fingerprint": row.key_fingerprint})
            row = (await conn.execute(select(Node).where(Node.id == node_id))).one()
        return _node_info(row)

    # -- revocations --------------------------------------------------------------------------
    async def add_revocation(self, *, serial: int | None = None, fingerprint: str | None = None,
                             node_id: str | None = None, reason: str = "",
                             now: datetime | None = None) -> None:
        if serial is None and fingerprint is None:
            raise ValueError("revoke a serial, a key fingerprint or both")
        t = _now(now)
        async with self._tx() as conn:
            if serial is not None:
                await conn.execute(self._insert(Revocation).values(
                    serial=f"{serial:x}", node_id=node_id, reason=reason, created=t
                ).on_conflict_do_nothing())
            if fingerprint is not None:
                await conn.execute(self._insert(Revocation).values(
                    fingerprint=fingerprint.lower(), node_id=node_id, reason=reason, created=t
                ).on_conflict_do_nothing())

    async def list_revocations(self) -> tuple[list[int], list[str]]:
        """Every revoked serial and every revoked key fingerprint."""
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(select(Revocation.serial, Revocation.fingerprint))).all()
        return ([int(r.serial, 16) for r in rows if r.serial],
                [r.fingerprint for r in rows if r.fingerprint])

    async def load_revocations(self) -> RevocationList:
        serials, fingerprints = await self.list_revocations()
        return RevocationList(serials=serials, fingerprints=fingerprints)

    # -- operator tokens ----------------------------------------------------------------------
    async def add_operator_token(self, token: OperatorToken, *, actor: str = "system",
                                 now: datetime | None = None) -> None:
        t = _now(now)
        async with self._tx() as conn:
            await conn.execute(insert(OperatorTokenRow).values(
                hash=token.hash, name=token.name, role=token.role.value, created=t,
                expires_at=token.expires_at, revoked=False))
            await self._audit(conn, t, actor, "token.create", f"operator-token:{token.name}",
                              {"role": token.role.value, "hash": token.hash[:12]})

    async def get_operator_token(self, token_hash: str) -> OperatorToken | None:
        """The token with this hash, or None if unknown or revoked (expiry: `authorize`)."""
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(OperatorTokenRow).where(
                OperatorTokenRow.hash == token_hash, OperatorTokenRow.revoked.is_(False)))).first()
        return OperatorToken(row.hash, row.name, row.role, row.expires_at) if row else None

    async def list_operator_tokens(self) -> list[OperatorTokenInfo]:
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(
                select(OperatorTokenRow).order_by(OperatorTokenRow.created))).all()
        return [OperatorTokenInfo(r.hash[:12], r.name, r.role, r.created, r.expires_at,
                                  bool(r.revoked)) for r in rows]

    async def revoke_operator_token(self, token_hash: str, *, actor: str,
                                    now: datetime | None = None) -> bool:
        t = _now(now)
        async with self._tx() as conn:
            res = await conn.execute(update(OperatorTokenRow).where(
                OperatorTokenRow.hash == token_hash).values(revoked=True))
            if res.rowcount == 1:
                await self._audit(conn, t, actor, "token.revoke", "operator-token",
                                  {"hash": token_hash[:12]})
        return res.rowcount == 1

    # -- ingest -------------------------------------------------------------------------------
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
                            marks: Sequence[MarkWrite] = ()) -> IngestResult:
        """Store chunks and gaps and move contiguous marks, all in one transaction.

        A chunk or gap whose (node, stream, seq_first) is already stored is skipped (the
        primary key is the last guard against storing anything twice); stream counters count
        only what was inserted. Marks never move backwards. Raises `StorageError`.
        """
        inserted: set[tuple[str, str, int]] = set()
        gap_keys: set[tuple[str, str, int]] = set()
        stored: dict[tuple[str, str], int] = {}
        lost: dict[tuple[str, str], int] = {}
        last: dict[tuple[str, str], datetime] = {}
        by_key = {(c.node_id, c.stream, c.seq_first): c for c in chunks}
        gaps_by_key = {(g.node_id, g.stream, g.seq_first): g for g in gaps}
        async with self._tx() as conn:
            if chunks:
                stmt = self._insert(ChunkRow).on_conflict_do_nothing().returning(
                    ChunkRow.node_id, ChunkRow.stream, ChunkRow.seq_first)
                rows = await conn.execute(stmt, [vars(c) for c in chunks])
                for r in rows:
                    key = (r.node_id, r.stream, r.seq_first)
                    inserted.add(key)
                    c = by_key[key]
                    stored[key[:2]] = stored.get(key[:2], 0) + c.records
                    last[key[:2]] = max(last.get(key[:2], c.received_at), c.received_at)
            if gaps:
                stmt = self._insert(GapRow).on_conflict_do_nothing().returning(
                    GapRow.node_id, GapRow.stream, GapRow.seq_first)
                rows = await conn.execute(stmt, [vars(g) for g in gaps])
                for r in rows:
                    key = (r.node_id, r.stream, r.seq_first)
                    gap_keys.add(key)
                    g = gaps_by_key[key]
                    lost[key[:2]] = lost.get(key[:2], 0) + g.seq_count
            mark_of = {(m.node_id, m.stream): m for m in marks}
            for key in sorted(set(mark_of) | set(stored) | set(lost)):
                m = mark_of.get(key)
                when = m.last_received if m else last.get(key)
                ins = self._insert(StreamRow).values(
                    node_id=key[0], stream=key[1], contiguous=m.contiguous if m else 0,
                    stored_records=stored.get(key, 0), gap_records=lost.get(key, 0),
                    last_received=when)
                excluded = ins.excluded
                await conn.execute(ins.on_conflict_do_update(
                    index_elements=[StreamRow.node_id, StreamRow.stream],
                    set_={
                        "contiguous": case(
                            (excluded.contiguous > StreamRow.contiguous, excluded.contiguous),
                            else_=StreamRow.contiguous),
                        "stored_records": StreamRow.stored_records + excluded.stored_records,
                        "gap_records": StreamRow.gap_records + excluded.gap_records,
                        "last_received": func.coalesce(excluded.last_received,
                                                       StreamRow.last_received),
                    }))
        return IngestResult(frozenset(inserted), frozenset(gap_keys), sum(stored.values()))

    async def stream_stats(self, node_id: str | None = None) -> list[StreamInfo]:
        """Per (node, stream): contiguous mark, records stored and lost (`edgewise data stats`)."""
        q = select(StreamRow).order_by(StreamRow.node_id, StreamRow.stream)
        if node_id is not None:
            q = q.where(StreamRow.node_id == node_id)
        async with self._tx(write=False) as conn:
            return [_stream_info(r) for r in (await conn.execute(q)).all()]

    async def read_chunks(self, node_id: str, stream: str, *, from_seq: int = 0,
                          since: datetime | None = None, limit: int = 100) -> list[StoredChunk]:
        """Stored chunks of one stream in seq order from ``from_seq`` (decode the payloads with
        `edgewise.sync.codec.decode`); ``since`` filters on the time they were received."""
        q = (select(ChunkRow).where(ChunkRow.node_id == node_id, ChunkRow.stream == stream,
                                    ChunkRow.seq_first >= from_seq)
             .order_by(ChunkRow.seq_first).limit(limit))
        if since is not None:
            q = q.where(ChunkRow.received_at >= since)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [StoredChunk(r.node_id, r.stream, r.seq_first, r.seq_count, r.records,
                            bool(r.compacted), bytes(r.payload), r.received_at) for r in rows]

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

    # -- desired state ------------------------------------------------------------------------
    async def put_desired_state(
        self, node_id: str, *, pipelines: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None,
        expires_at: datetime | None = None, actor: str, now: datetime | None = None,
    ) -> DesiredState:
        """Store the node's next desired version (previous + 1) and audit it; the caller then
        pokes a live session (``app[SESSIONS].notify_desired(node_id, version)``).
        Raises `ConfigError` for an invalid state, `KeyError` for an unknown node."""
        t = _now(now)
        for attempt in range(5):
            try:
                async with self._tx() as conn:
                    if (await conn.execute(select(Node.id).where(Node.id == node_id))).first() \
                            is None:
                        raise KeyError(node_id)
                    top = (await conn.execute(
                        select(func.max(DesiredStateRow.version))
                        .where(DesiredStateRow.node_id == node_id))).scalar()
                    try:
                        state = DesiredState(
                            (top or 0) + 1, dict(pipelines or {}), dict(config or {}),
                            dict(labels or {}),
                            expires_at.timestamp() if expires_at is not None else None)
                    except ValueError as exc:
                        raise ConfigError(str(exc)) from None
                    await conn.execute(insert(DesiredStateRow).values(
                        node_id=node_id, version=state.version, body=state.to_wire(),
                        created=t, expires_at=expires_at))
                    await self._audit(conn, t, actor, "desired.set", f"node:{node_id}",
                                      {"version": state.version,
                                       "pipelines": sorted(state.pipelines)})
                return state
            except IntegrityError:  # a concurrent writer took this version: take the next
                if attempt == 4:
                    raise StorageError(f"cannot store a desired state for {node_id}") from None
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def get_desired_state(self, node_id: str, version: int | None = None
                                ) -> DesiredState | None:
        """The newest desired state of a node (or the given version), or None."""
        q = select(DesiredStateRow.body).where(DesiredStateRow.node_id == node_id)
        if version is not None:
            q = q.where(DesiredStateRow.version == version)
        q = q.order_by(DesiredStateRow.version.desc()).limit(1)
        async with self._tx(write=False) as conn:
            body = (await conn.execute(q)).scalar()
        return DesiredState.from_wire(body) if body is not None else None

    async def desired_version(self, node_id: str) -> int:
        """The newest desired version of a node, 0 if it has none."""
        async with self._tx(write=False) as conn:
            v = (await conn.execute(select(func.max(DesiredStateRow.version))
                                    .where(DesiredStateRow.node_id == node_id))).scalar()
        return int(v or 0)

    # -- reported state -----------------------------------------------------------------------
    async def get_reported_state(self, node_id: str) -> ReportedInfo | None:
        async with self._tx(write=False) as conn:
            row = (await conn.execute(select(ReportedStateRow).where(
                ReportedStateRow.node_id == node_id))).first()
        return ReportedInfo(ReportedState.from_wire(row.body), row.updated) if row else None

    async def merge_reported_state(self, node_id: str, reported: ReportedState, *,
                                   at: HLC | None = None, now: datetime | None = None
                                   ) -> list[AuditRecord]:
        """Store a node's report. Setpoints merge by HLC last-writer-wins with what is stored
        (writes from the cloud included); each write that lost goes to the audit log."""
        t = _now(now)
        async with self._tx() as conn:
            old = (await conn.execute(select(ReportedStateRow.body).where(
                ReportedStateRow.node_id == node_id))).scalar()
            base = LwwMap.from_wire(old["setpoints"]) if old else LwwMap()
            merged, losses = base.merge(reported.setpoints, at=at)
            body = ReportedState(reported.applied_version, reported.status,
                                 dict(reported.counters), merged).to_wire()
            await self._upsert_reported(conn, node_id, body, t)
            for loss in losses:
                await self._audit(conn, t, f"node:{node_id}", "setpoint.overwritten",
                                  f"node:{node_id}", _audit_detail(loss))
        return losses

    async def merge_setpoints(self, node_id: str, setpoints: LwwMap, *, actor: str,
                              at: HLC | None = None, now: datetime | None = None
                              ) -> list[AuditRecord]:
        """Cloud-side setpoint writes: merged into the stored reported state by the same rule."""
        t = _now(now)
        async with self._tx() as conn:
            old = (await conn.execute(select(ReportedStateRow.body).where(
                ReportedStateRow.node_id == node_id))).scalar()
            current = ReportedState.from_wire(old) if old else ReportedState(None, "unknown")
            merged, losses = current.setpoints.merge(setpoints, at=at)
            body = ReportedState(current.applied_version, current.status,
                                 dict(current.counters), merged).to_wire()
            await self._upsert_reported(conn, node_id, body, t)
            await self._audit(conn, t, actor, "setpoint.set", f"node:{node_id}",
                              {"keys": sorted(setpoints.entries())})
            for loss in losses:
                await self._audit(conn, t, actor, "setpoint.overwritten", f"node:{node_id}",
                                  _audit_detail(loss))
        return losses

    async def _upsert_reported(self, conn: AsyncConnection, node_id: str,
                               body: dict[str, Any], t: datetime) -> None:
        ins = self._insert(ReportedStateRow).values(node_id=node_id, body=body, updated=t)
        await conn.execute(ins.on_conflict_do_update(
            index_elements=[ReportedStateRow.node_id],
            set_={"body": ins.excluded.body, "updated": ins.excluded.updated}))

    # -- audit --------------------------------------------------------------------------------
    async def _audit(self, conn: AsyncConnection, t: datetime, actor: str, action: str,
                     target: str, detail: Mapping[str, Any]) -> None:
        await conn.execute(insert(AuditRow).values(ts=t, actor=actor, action=action,
                                                   target=target, detail=dict(detail)))

    async def audit(self, actor: str, action: str, target: str,
                    detail: Mapping[str, Any] | None = None, *,
                    now: datetime | None = None) -> None:
        """Append one entry to the audit log (every mutating operator call writes one)."""
        async with self._tx() as conn:
            await self._audit(conn, _now(now), actor, action, target, detail or {})

    async def list_audit(self, *, target: str | None = None, actor: str | None = None,
                         limit: int = 100, before_id: int | None = None) -> list[AuditEntry]:
        """Newest first; page with ``before_id`` (the smallest id of the previous page)."""
        q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if target is not None:
            q = q.where(AuditRow.target == target)
        if actor is not None:
            q = q.where(AuditRow.actor == actor)
        if before_id is not None:
            q = q.where(AuditRow.id < before_id)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(q)).all()
        return [AuditEntry(r.id, r.ts, r.actor, r.action, r.target, dict(r.detail or {}))
                for r in rows]


def _audit_detail(loss: AuditRecord) -> dict[str, Any]:
    wire = loss.to_wire()
    value = wire["lost_value"]
    if isinstance(value, bytes):
        wire["lost_value"] = value.hex()
    return wire

