"""The store's connection to its database: engines, migrations, one transaction at a time.

`Database` is the base of `Store` (`store.Store`): it owns the async SQLAlchemy engines (aiosqlite
by default, asyncpg by URL) and `_tx`, the one way into a transaction, which the concern modules
(`identity`, `chunks`, `twin`, `audit`) use and nothing outside the store does. The schema is
brought to the newest Alembic revision by `open` (under an advisory lock on PostgreSQL, under
SQLite's write lock otherwise), so several processes may open the same store at once.

SQLite: WAL, ``synchronous=FULL`` (an acknowledged batch survives power loss), one writer
connection in this process taking the write lock up front (``BEGIN IMMEDIATE``, so two writers
never deadlock on a lock upgrade), and separate reader connections. ``wait`` is how long a
transaction waits for a connection of the pool (SQLAlchemy's ``pool_timeout``; 30 s by default,
``--limit store_wait``) before it fails with `StorageError`. The database file is created
0600 (SQLite gives its ``-wal`` and ``-shm`` files the same mode) in a directory made 0700;
existing files with wider modes are tightened to 0600.

Database failures surface as `StorageError`.

**One hand-off per transaction** (SQLite, the hot writes: `_sqlite_tx`). aiosqlite runs every
DBAPI call in the connection's own thread and hands the result back to the event loop: a
cursor, an execute, a fetch and a close are four round trips each, so one group commit was about
a dozen (issue 11: the thread hand-offs and the SQLAlchemy layers around each statement were the
largest share of the steady-state CPU at a few hundred nodes). `_sqlite_tx` checks the write
connection out of the pool as any transaction does, and runs a plain function with the raw
``sqlite3`` connection in that thread, BEGIN IMMEDIATE to COMMIT, in ONE hand-off; the
statements are SQLAlchemy's, compiled once for SQLite (`RawStatement`: the SQL text, its
parameter order and SQLAlchemy's own bind processors, so what is stored is what the SQLAlchemy
path stores).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Self, TypeVar

import alembic.command
import alembic.config
import asyncpg
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from edgewise.cloud.store.readers import PgReaders, SqliteReaders
from edgewise.errors import ConfigError, StorageError

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


def private_sqlite_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would use the umask, often 0644),
    in a directory made 0700; tighten an existing file and its ``-wal`` / ``-shm`` to 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


T = TypeVar("T")

CONFLICTS = ("40P01", "40001")  # PostgreSQL: deadlock detected, serialization failure


class StorageConflict(StorageError):
    """The database aborted a transaction that conflicted with another (a deadlock): running
    it again may succeed."""


@dataclass(frozen=True)
class RawStatement:
    """A SQLAlchemy statement compiled once for SQLite's own driver (`Database._sqlite_tx`)."""

    sql: str
    names: tuple[str, ...]  # the parameters, in placeholder order
    procs: tuple[Callable[[Any], Any] | None, ...]  # SQLAlchemy's bind processor of each

    # a SELECT's columns: their names and SQLAlchemy's result processor of each (`row`)
    columns: tuple[str, ...] = ()
    results: tuple[Callable[[Any], Any] | None, ...] = ()

    def params(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(row[n] if p is None else p(row[n])
                     for n, p in zip(self.names, self.procs, strict=True))

    def row(self, values: Sequence[Any]) -> SimpleNamespace:
        """A row of the driver, as the SQLAlchemy path returns it (attributes by column name,
        values through the column types' result processors)."""
        return SimpleNamespace(**{
            n: v if p is None or v is None else p(v)
            for n, p, v in zip(self.columns, self.results, values, strict=True)})


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T],
                    begin: str = "BEGIN IMMEDIATE") -> T:
    """In the connection's thread: ``fn`` between ``begin`` and COMMIT (ROLLBACK if it
    raises)."""
    conn.execute(begin)
    try:
        out = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


def utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


class Database:
    """Engines and transactions of one store; see the module docstring."""

    def __init__(self, url: str, *, wait: float = 30.0) -> None:
        self.url = url
        self.wait = wait  # s a transaction waits for a pooled connection
        self._write: AsyncEngine | None = None
        self._read: AsyncEngine | None = None
        self._readers: SqliteReaders | None = None  # SQLite: the hot reads' own connections
        self._pg_readers: PgReaders | None = None  # PostgreSQL: the same (`_pg_read`)
        self.dialect = ""

    def __repr__(self) -> str:
        return f"Store({make_url(self.url).render_as_string(hide_password=True)!r})"

    @property
    def shared(self) -> bool:
        """Whether other control-plane processes may use this database too (PostgreSQL:
        `cloud serve --processes N`, replicas); SQLite takes one writing process. Decides the
        replica bus (`app`) and where re-authentication nonces are kept (`device_api`)."""
        return self.url.startswith("postgresql")

    def describe(self) -> str:
        """The store as its operator knows it: ``SQLite file PATH`` or ``PostgreSQL database
        NAME on HOST:PORT as USER`` (never the password)."""
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite":
            return ("SQLite in memory" if url.database in (None, "", ":memory:")
                    else f"SQLite file {url.database}")
        where = f"{url.host or 'localhost'}{f':{url.port}' if url.port else ''}"
        user = f" as {url.username}" if url.username else ""
        return f"{url.get_backend_name()} database {url.database or '?'} on {where}{user}" \
            .replace("postgresql database", "PostgreSQL database", 1)

    @classmethod
    def for_data_dir(cls, data_dir: str | Path, db: str | None = None) -> Self:
        return cls(database_url(db, data_dir))

    # -- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> Self:
        """Connect and migrate to the newest schema. Raises `StorageError`."""
        if self._write is not None:
            raise StorageError("store is already open")
        url = make_url(self.url)
        self.dialect = url.get_backend_name()
        try:
            if self.dialect == "sqlite":
                if url.database and url.database != ":memory:":
                    private_sqlite_file(Path(url.database))
                self._write = self._sqlite_engine(immediate=True, pool_size=1)
                self._read = self._sqlite_engine(immediate=False, pool_size=4)
                if url.database and url.database != ":memory:":
                    self._readers = SqliteReaders(url.database, 4, self.wait)
            else:
                self._write = create_async_engine(self.url, pool_size=10, max_overflow=10,
                                                  pool_pre_ping=True, pool_timeout=self.wait)
                self._read = self._write
                self._pg_readers = PgReaders(
                    url.set(drivername="postgresql").render_as_string(hide_password=False),
                    4, self.wait)
            async with self._write.begin() as conn:
                await conn.run_sync(self._migrate)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, (SQLAlchemyError, OSError)):
                raise StorageError(f"cannot open the store ({self.describe()}): {exc}") from None
            raise
        return self

    def _sqlite_engine(self, *, immediate: bool, pool_size: int) -> AsyncEngine:
        engine = create_async_engine(self.url, pool_size=pool_size, max_overflow=0,
                                     pool_timeout=self.wait, connect_args={"timeout": 30})

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
        readers, self._readers = self._readers, None
        if readers is not None:
            await asyncio.to_thread(readers.close)  # waits for the reads running
        pg_readers, self._pg_readers = self._pg_readers, None
        if pg_readers is not None:
            await pg_readers.close()
        for engine in {id(e): e for e in (self._write, self._read) if e is not None}.values():
            await engine.dispose()
        self._write = self._read = None

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[AsyncConnection]:
        """One transaction. Raises `StorageConflict` when PostgreSQL aborted it for a
        deadlock or a serialization failure (the caller may run it again), `StorageError`
        for any other database failure; `IntegrityError` passes through."""
        engine = self._write if write else self._read
        if engine is None:
            raise StorageError("store is not open")
        try:
            async with engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            if getattr(getattr(exc, "orig", None), "sqlstate", None) in CONFLICTS:
                raise StorageConflict(f"database conflict: {exc}") from None
            raise StorageError(f"database error: {exc}") from None

    def raw_statement(self, stmt: Any, keys: Iterable[str]) -> RawStatement:
        """``stmt`` (with the columns ``keys`` bound) compiled for the write engine's dialect,
        for `_sqlite_tx`."""
        assert self._write is not None
        dialect = self._write.dialect
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys))
        names = tuple(compiled.positiontup or ())
        selected = list(getattr(stmt, "selected_columns", ()))
        return RawStatement(
            compiled.string, names,
            tuple(compiled.binds[n].type._cached_bind_processor(dialect) for n in names),
            tuple(c.key for c in selected),
            tuple(c.type._cached_result_processor(dialect, None) for c in selected))

    async def _sqlite_tx(self, fn: Callable[[sqlite3.Connection], T], *,
                         write: bool = True) -> T:
        """(SQLite) ``fn(connection)`` as one transaction in one hand-off to the connection's
        thread (module docstring): the write connection (BEGIN IMMEDIATE), or with
        ``write=False`` a reader (BEGIN: one snapshot for all its reads). ``fn`` runs off the
        event loop: it may use only its connection and its own arguments. Raises
        `StorageError`."""
        engine = self._write if write else self._read
        if engine is None:
            raise StorageError("store is not open")
        try:
            if not write and self._readers is not None:
                return await self._readers.run(fn)
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver = raw.driver_connection  # the aiosqlite connection
                # aiosqlite's queue into its thread (one call, one hand-off each way)
                return await driver._execute(  # type: ignore[union-attr]
                    _in_transaction, driver._conn, fn,  # type: ignore[union-attr]
                    "BEGIN IMMEDIATE" if write else "BEGIN")
        except (sqlite3.Error, SQLAlchemyError, ValueError) as exc:  # ValueError: closed
            raise StorageError(f"database error: {exc}") from None

    async def _pg_read(self, fn: Callable[[Any], Awaitable[T]], *, snapshot: bool = True) -> T:
        """(PostgreSQL) ``await fn(asyncpg connection)`` in one read-only transaction (not for
        ``snapshot=False``: one statement) of the hot reads' own pool
        (`edgewise.cloud.store.readers`); statements from `raw_statement`. Raises
        `StorageError`."""
        if self._pg_readers is None:
            raise StorageError("store is not open")
        try:
            return await self._pg_readers.run(fn, snapshot=snapshot)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                OSError) as exc:
            raise StorageError(f"database error: {exc}") from None

    def _insert(self, model: Any) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(model)

    def _upsert(self, model: Any, *columns: str) -> Any:
        """Insert or replace a row by ``node_id``, setting ``columns`` (executemany); built once
        per store and table, so SQLAlchemy's cache key for it is computed once."""
        cache: dict[Any, Any] = self.__dict__.setdefault("_upserts", {})
        stmt = cache.get(model)
        if stmt is None:
            ins = self._insert(model.__table__)
            stmt = cache[model] = ins.on_conflict_do_update(
                index_elements=[model.__table__.c.node_id],
                set_={c: getattr(ins.excluded, c) for c in columns})
        return stmt

    async def schema_revision(self) -> str | None:
        async with self._tx(write=False) as conn:
            row = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).first()
        return row[0] if row else None
