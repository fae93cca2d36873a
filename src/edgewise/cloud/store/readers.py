"""SQLite reader connections of the store's own, for the hot reads (`Database._sqlite_tx` with
``write=False``: a session upgrade's node, a hello's quarantine, marks and desired version).

Each read is one function run in one of ``size`` threads, each with its own ``sqlite3``
connection, between BEGIN and COMMIT (one snapshot), in ONE hand-off (`run_in_executor`). The
SQLAlchemy pool's path to the same function costs a greenlet, a pool check-out, the driver's
queue and a rollback on return, another hand-off: about 0.5 ms of CPU a read, where a
reconnect storm makes three reads for every session (issue 11). The connections are opened
``query_only``: nothing written goes through them.

At most ``size`` reads run at once; a read waits at most ``wait`` seconds for its turn (the
store's ``store_wait``, as the pool's check-out), then fails with `StorageError`. `close`
waits for the reads running and closes every connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
            return await loop.run_in_executor(self._pool, self._read, fn)
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
            conn.execute("COMMIT")  # a read transaction: ends the snapshot either way

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
