"""Reader connections of the store's own, for the hot reads: a session upgrade's node, a
hello's quarantine, marks and desired version (`Database._sqlite_tx` with ``write=False`` on
SQLite, `Database._pg_read` on PostgreSQL).

Each read is one function run in one of ``size`` threads, each with its own ``sqlite3``
connection, between BEGIN and COMMIT (one snapshot), in ONE hand-off (`run_in_executor`). The
SQLAlchemy pool's path to the same function costs a greenlet, a pool check-out, the driver's
queue and a rollback on return, another hand-off: about 0.5 ms of CPU a read, where a
reconnect storm makes three reads for every session (issue 11). The connections are opened
``query_only``: nothing written goes through them.

At most ``size`` reads run at once; a read waits at most ``wait`` seconds for its turn (the
store's ``store_wait``, as the pool's check-out), then fails with `StorageError`. `close`
waits for the reads running and closes every connection.

On PostgreSQL (`PgReaders`) the same reads go through an asyncpg pool of their own, without
SQLAlchemy's layers, pre-ping and reset query: about 2 ms of CPU a read through SQLAlchemy (six
round trips), where a one-statement read is one round trip here. JSON
columns are decoded as SQLAlchemy's asyncpg dialect decodes them, so the rows are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import asyncpg

from edgewise.errors import StorageError

T = TypeVar("T")


class SqliteReaders:
    def __init__(self, path: str, size: int, wait: float) -> None:
        self.path = path
        self.size = size
        self.wait = wait
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="store-read")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._turns = asyncio.Semaphore(size)  # no queue in the executor: waiters wait here
        self._closed = False

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` in a reader's thread, inside one read transaction."""
        if self._closed:
            raise StorageError("store is not open")
        try:
            if self._turns.locked():  # all busy: wait, bounded (no timer on the fast path)
                await asyncio.wait_for(self._turns.acquire(), self.wait)
            else:
                await self._turns.acquire()
        except TimeoutError:
            raise StorageError(f"the store's {self.size} readers were busy for {self.wait:g} s "
                               "(--limit store_wait)") from None
        try:
            loop = asyncio.get_running_loop()
            try:
                future = loop.run_in_executor(self._pool, self._read, fn)
            except RuntimeError:  # closed while this read waited for its turn
                raise StorageError("store is not open") from None
            return await future
        finally:
            self._turns.release()

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:  # a read transaction: ends the snapshot either way
                conn.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                               check_same_thread=False)
        for pragma in ("busy_timeout=30000", "query_only=ON"):
            conn.execute(f"PRAGMA {pragma}")
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()


# what a connection the server dropped raises at its next use (asyncpg's protocol may also
# find itself mid-operation: InternalClientError)
DROPPED = (asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.PostgresConnectionError,
           asyncpg.exceptions.OperatorInterventionError, ConnectionError)


class PgReaders:
    def __init__(self, dsn: str, size: int, wait: float) -> None:
        self.dsn = dsn
        self.size = size
        self.wait = wait
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._closed = False

    async def run(self, fn: Callable[[Any], Awaitable[T]], *, snapshot: bool = True) -> T:
        """``await fn(connection)`` with a pooled connection, inside one read-only transaction
        (``snapshot=False``: without, for one statement, which sees one snapshot anyway)."""
        if self._closed:
            raise StorageError("store is not open")
        pool = self._pool or await self._open()
        for attempt in (1, 2):
            try:
                conn = await pool.acquire(timeout=self.wait)
            except TimeoutError:
                raise StorageError(f"the store's {self.size} readers were busy for "
                                   f"{self.wait:g} s (--limit store_wait)") from None
            try:
                if not snapshot:
                    return await fn(conn)
                async with conn.transaction(readonly=True):
                    return await fn(conn)
            except DROPPED as exc:
                # a pooled connection the server dropped (a restart, a terminated backend):
                # closed here (unless the pool already took it back as closed), replaced by
                # the pool; a read may run again, and a second failure is the caller's
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                if attempt == 2:
                    raise StorageError(f"database error: {exc}") from None
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def _open(self) -> Any:
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self.dsn, min_size=0, max_size=self.size,
                                                       init=_json_codecs, reset=_as_is)
        return self._pool

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _as_is(_conn: Any) -> None:
    """A connection back in the pool needs no reset query (asyncpg's default, one more round
    trip a read): these readers change no session state (asyncpg itself still rolls back a
    transaction left open)."""


async def _json_codecs(conn: Any) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")
