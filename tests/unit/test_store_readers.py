"""The store's own readers (`edgewise.cloud.store.readers`). SQLite: one read transaction per
call in a reader's thread, never a write, at most ``size`` at once with a bounded wait for a
turn, and closed with every connection. PostgreSQL: the pool's bounded wait, and reads that go
on after the server dropped the pooled connections."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import asyncpg
import pytest

from edgewise.cloud.store import Store
from edgewise.cloud.store.notify import listen_dsn
from edgewise.cloud.store.readers import PgReaders, SqliteReaders
from edgewise.errors import StorageError

pytestmark = pytest.mark.asyncio


def _db(tmp_path: Path) -> str:
    path = tmp_path / "r.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (v INTEGER)")
        db.execute("INSERT INTO t VALUES (1), (2)")
    return str(path)


async def test_a_read_runs_in_a_reader_thread_in_one_transaction(tmp_path: Path) -> None:
    readers = SqliteReaders(_db(tmp_path), 2, 5.0)
    try:
        seen = await readers.run(lambda c: (c.in_transaction, threading.current_thread().name,
                                            c.execute("SELECT SUM(v) FROM t").fetchone()[0]))
        assert seen[0] is True and seen[1].startswith("store-read") and seen[2] == 3
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await readers.run(lambda c: c.execute("INSERT INTO t VALUES (3)"))
        # the failed read ended its transaction: the connection serves the next one
        assert await readers.run(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()[0]) \
            == 2
    finally:
        readers.close()


async def test_reads_beyond_the_readers_wait_their_turn_then_fail_after_the_wait(
        tmp_path: Path) -> None:
    readers = SqliteReaders(_db(tmp_path), 2, 0.3)
    release = threading.Event()
    try:
        held = [asyncio.create_task(readers.run(lambda _c: release.wait(10)))
                for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(StorageError, match=r"2 readers were busy for 0\.3 s"):
            await readers.run(lambda _c: None)
        waiting = asyncio.create_task(readers.run(lambda c: c.execute("SELECT 7").fetchone()))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        release.set()
        assert await asyncio.gather(*held) == [True, True]
        assert await waiting == (7,)
    finally:
        release.set()
        readers.close()
    with pytest.raises(StorageError, match="not open"):
        await readers.run(lambda _c: None)
    assert readers._conns == []


async def test_the_store_reads_through_its_readers_and_closes_them(tmp_path: Path) -> None:
    async with Store.for_data_dir(tmp_path) as store:
        readers = store._readers
        assert readers is not None
        assert await store.get_node("nobody") is None
        assert len(readers._conns) == 1
    assert store._readers is None and readers._conns == []


async def test_postgres_reads_go_on_after_the_server_dropped_the_pooled_connections(
        postgres: str) -> None:
    """A database restart (here: every reader's backend terminated) leaves pooled connections
    that fail at their next use; a read runs once more on a fresh one instead of answering a
    session upgrade with a storage error."""
    async with Store(postgres) as store:
        assert await store.get_node("nobody") is None
        assert await store.session_start("nobody") == ({}, 0)
        admin = await asyncpg.connect(listen_dsn(postgres))
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        assert killed >= 1
        assert await store.get_node("nobody") is None
        assert await store.quarantines(["nobody"]) == {}


async def test_postgres_reads_beyond_the_pool_fail_after_the_wait(postgres: str) -> None:
    readers = PgReaders(listen_dsn(postgres), 1, 0.3)
    release = asyncio.Event()
    try:
        async def hold(conn: object) -> int:
            await release.wait()
            return 1

        held = asyncio.create_task(readers.run(hold))
        await asyncio.sleep(0.3)
        with pytest.raises(StorageError, match=r"1 readers were busy for 0\.3 s"):
            await readers.run(lambda c: c.fetchval("SELECT 1"))
        release.set()
        assert await held == 1
        assert await readers.run(lambda c: c.fetchval("SELECT 2"), snapshot=False) == 2
    finally:
        release.set()
        await readers.close()
    with pytest.raises(StorageError, match="not open"):  # closed: no pool opened again
        await readers.run(lambda c: c.fetchval("SELECT 3"))
    assert readers._pool is None


async def test_a_read_waiting_for_its_turn_when_the_readers_close_fails_as_not_open(
        tmp_path: Path) -> None:
    readers = SqliteReaders(_db(tmp_path), 1, 5.0)
    release = threading.Event()
    held = asyncio.create_task(readers.run(lambda _c: release.wait(10)))
    await asyncio.sleep(0.1)
    waiting = asyncio.create_task(readers.run(lambda _c: None))
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(asyncio.to_thread(readers.close))
    await asyncio.sleep(0.1)
    release.set()
    await held
    with pytest.raises(StorageError, match="not open"):
        await waiting
    await closing
