"""The store's own SQLite readers (`edgewise.cloud.store.readers`): one read transaction per
call in a reader's thread, never a write, at most ``size`` at once with a bounded wait for a
turn, and closed with every connection."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from edgewise.cloud.store import Store
from edgewise.cloud.store.readers import SqliteReaders
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
