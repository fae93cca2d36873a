"""Retention on the real store (SQLite): prune deletes exactly the chunks received before the
cutoff, over every node, in batches; marks and counters stay; the periodic task stops cleanly."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from edgewise.cloud.dataout.config import data_out_config
from edgewise.cloud.retention import parse_retention, prune, run_retention
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store
from edgewise.errors import ConfigError
from edgewise.sync import codec


def chunk(node: str, first: int, n: int, at: datetime) -> ChunkWrite:
    cols = {"ts": np.arange(first, first + n, dtype=np.float64),
            "value": np.round(np.arange(n) * 0.5, 1)}
    return ChunkWrite(node, "raw", first, n, n, False, codec.encode(cols), at)


@pytest.fixture
async def store(tmp_path: Path):
    async with Store.for_data_dir(tmp_path) as s:
        yield s


async def test_prune_deletes_exactly_the_old_chunks(store: Store) -> None:
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=8), now - timedelta(days=1)
    writes = [chunk(f"n{i}", s, 10, old) for i in range(3) for s in (0, 10, 20)]
    writes += [chunk(f"n{i}", 30, 10, recent) for i in range(3)]
    await store.commit_ingest(writes, [], [MarkWrite(f"n{i}", "raw", 40, now) for i in range(3)])
    assert await prune(store, timedelta(days=7), batch=4) == 9  # 3 batches of at most 4
    for i in range(3):
        left = await store.read_chunks(f"n{i}", "raw")
        assert [(c.seq_first, c.records) for c in left] == [(30, 10)]
    stats = await store.stream_stats()
    assert [(s.node_id, s.stored_records, s.contiguous) for s in stats] == [
        ("n0", 40, 40), ("n1", 40, 40), ("n2", 40, 40)]  # counters and marks are kept
    assert await prune(store, timedelta(days=7)) == 0
    assert await prune(store, now) == 3  # an absolute cutoff
    with pytest.raises(ValueError, match="timezone-aware"):
        await prune(store, datetime(2026, 1, 1))


async def test_run_retention_prunes_then_waits_and_stops(store: Store) -> None:
    now = datetime.now(UTC)
    await store.commit_ingest([chunk("n", 0, 5, now - timedelta(hours=3)),
                               chunk("n", 5, 5, now)], [], [])
    task = asyncio.create_task(run_retention(store, timedelta(hours=1), every=0.05))
    for _ in range(100):
        await asyncio.sleep(0.02)
        if len(await store.read_chunks("n", "raw")) == 1:
            break
    await store.commit_ingest([chunk("n", 10, 5, now - timedelta(hours=2))], [], [])
    for _ in range(100):  # the next period picks the late old chunk up too
        await asyncio.sleep(0.02)
        if [c.seq_first for c in await store.read_chunks("n", "raw")] == [5]:
            break
    assert [c.seq_first for c in await store.read_chunks("n", "raw")] == [5]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_retention_settings() -> None:
    assert parse_retention("7d") == timedelta(days=7)
    assert parse_retention("12h") == timedelta(hours=12)
    assert parse_retention(3600) == timedelta(hours=1)
    assert parse_retention(None) is None
    assert parse_retention("forever") is None
    assert parse_retention("0") is None
    with pytest.raises(ConfigError, match="retention: 'a week' is not a duration"):
        parse_retention("a week")
    cfg = data_out_config({"retention": "30d", "forwarders": [{"type": "nats"}]})
    assert cfg.retention == 30 * 86400.0
    assert cfg.forwarders[0].subject == "edgewise.{node}.{stream}"
    with pytest.raises(ConfigError, match="retention"):
        data_out_config({"retention": "soon"})
