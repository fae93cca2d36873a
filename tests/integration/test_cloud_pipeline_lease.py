"""The cloud pipeline lease in the store: one replica at a time, takeover after expiry, and
shipments fenced by the term (nothing stored by a replica that lost the pipeline)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from edgewise.cloud.pipelines.state import RunState
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store, database_url
from edgewise.cloud.store.cloud_pipelines import PipelineLeaseLost
from edgewise.sync import codec

T = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    return str(request.getfixturevalue("postgres"))


def result(seq: int) -> ChunkWrite:
    cols = {"window_start": np.array([float(seq)]), "count": np.array([1.0])}
    return ChunkWrite("cloud:fleet", "total", seq, 1, 1, False, codec.encode(cols), T)


async def test_one_runner_takeover_after_expiry_and_fenced_shipments(store_url: str) -> None:
    async with Store(store_url) as store:
        a = await store.take_pipeline_lease("fleet", "host/a", 15, now=T)
        assert a is not None and a.term == 1
        assert await store.take_pipeline_lease("fleet", "host/b", 15, now=T) is None
        assert await store.renew_pipeline_lease(a, now=T + timedelta(seconds=10))
        state = RunState({"engine": b"\x01\x02"}, {"total": 1}).encode()
        res = await store.commit_pipeline_results(a, [result(0)],
                                                  [MarkWrite("cloud:fleet", "total", 1, T)],
                                                  state, now=T + timedelta(seconds=11))
        assert len(res.chunks) == 1
        assert RunState.decode(await store.pipeline_state("fleet") or b"") == RunState(
            {"engine": b"\x01\x02"}, {"total": 1})
        # renewed by the shipment until T + 26 s: b must wait for that
        assert await store.take_pipeline_lease("fleet", "host/b", 15,
                                               now=T + timedelta(seconds=25)) is None
        b = await store.take_pipeline_lease("fleet", "host/b", 15,
                                            now=T + timedelta(seconds=27))
        assert b is not None and b.term == 2
        runner = await store.pipeline_runner("fleet")
        assert runner is not None and (runner.runner, runner.term) == ("host/b", 2)
        # a, late, can store nothing more and renew nothing
        with pytest.raises(PipelineLeaseLost):
            await store.commit_pipeline_results(a, [result(1)],
                                                [MarkWrite("cloud:fleet", "total", 2, T)],
                                                b"{}", now=T + timedelta(seconds=28))
        assert not await store.renew_pipeline_lease(a, now=T + timedelta(seconds=28))
        assert [c.seq_first for c in await store.read_chunks("cloud:fleet", "total")] == [0]
        assert (await store.stream_marks("total")) == {"cloud:fleet": 1}
        assert RunState.decode(await store.pipeline_state("fleet") or b"").next_seq == {
            "total": 1}
        # b releases it (stopping): a takes it at once, in a new term
        await store.release_pipeline_lease(b)
        a2 = await store.take_pipeline_lease("fleet", "host/a", 15,
                                             now=T + timedelta(seconds=29))
        assert a2 is not None and a2.term == 3


async def test_the_same_replica_started_again_takes_over_at_once_in_a_new_term(
        store_url: str) -> None:
    async with Store(store_url) as store:
        old = await store.take_pipeline_lease("fleet", "host/a", 15, now=T)
        new = await store.take_pipeline_lease("fleet", "host/a", 15,
                                              now=T + timedelta(seconds=1))
        assert old is not None and new is not None and (old.term, new.term) == (1, 2)
        with pytest.raises(PipelineLeaseLost):  # a process of the old term stores nothing
            await store.commit_pipeline_results(old, [result(0)], [], b"{}",
                                                now=T + timedelta(seconds=2))
        assert await store.read_chunks("cloud:fleet", "total") == []
        assert await store.renew_pipeline_lease(new, now=T + timedelta(seconds=2))
