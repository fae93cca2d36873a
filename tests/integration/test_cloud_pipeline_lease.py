"""The cloud pipeline lease in the store: one replica at a time, takeover after expiry, and
shipments fenced by the term (nothing stored by a replica that lost the pipeline)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable, Sequence, Set
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


async def test_a_takeover_on_another_data_dir_continues_from_the_stored_state(
        tmp_path: Path) -> None:
    """Replica a runs the pipeline and dies abruptly (its task cancelled, whatever it had not
    shipped lost with its folder); replica b, with a data directory of its own, takes over
    from the state stored with a's last shipment: every window once, equal to the offline
    computation, and data out is handed each stored result once."""
    from test_cloud_pipeline_run import enrol, offline, put, readings, spec_text, stored, wait_for

    from edgewise.cloud.pipelines.runner import PipelineRun
    from edgewise.cloud.pipelines.spec import parse_cloud_pipeline
    from edgewise.security.pki import CertificateAuthority

    ca = CertificateAuthority.create(tmp_path / "ca")
    forwarded: list[tuple[str, str, int]] = []

    async def forward(chunks: Sequence[ChunkWrite], inserted: Set[tuple[str, str, int]]
                      ) -> None:
        forwarded.extend(k for c in chunks if (k := (c.node_id, c.stream, c.seq_first))
                         in inserted)

    async with Store(database_url(None, tmp_path)) as store:
        nodes = ["node-a", "node-b", "node-c"]
        sent = []
        for i, n in enumerate(nodes):
            await enrol(store, ca, n)
            seq = 0
            for t in range(0, 120, 20):
                cols = readings(i, T0S + t, T0S + t + 20)
                sent.append(cols)
                seq = await put(store, n, seq, cols)

        async def windows() -> int:
            return len((await stored(store, "cloud:fleet", "total")).get("count", []))

        lease_a = await store.take_pipeline_lease("fleet", "host/a", 15)
        assert lease_a is not None
        run_a = PipelineRun(parse_cloud_pipeline(spec_text(), "fleet"), tmp_path / "a", store,
                            lease=lease_a, start=None, forward=forward)
        task = asyncio.create_task(run_a.run())
        await wait_for(lambda: _at_least(windows, 4))
        task.cancel()  # no final commit, no final shipment
        with contextlib.suppress(asyncio.CancelledError):
            await task
        shutil.rmtree(tmp_path / "a")  # a's disk is gone with it
        lease_b = await store.take_pipeline_lease(
            "fleet", "host/b", 15, now=datetime.now(UTC) + timedelta(seconds=20))
        assert lease_b is not None and lease_b.term == 2
        start = RunState.decode(await store.pipeline_state("fleet") or b"")
        run_b = PipelineRun(parse_cloud_pipeline(spec_text(), "fleet"), tmp_path / "b", store,
                            lease=lease_b, start=start, forward=forward)
        task = asyncio.create_task(run_b.run())
        try:
            await wait_for(lambda: _at_least(windows, 11))
            await asyncio.sleep(0.5)  # anything repeated would be stored by now
        finally:
            run_b.stop()
            await asyncio.wait_for(task, 30)
        got = await stored(store, "cloud:fleet", "total")
        want = offline(sent)
        starts = got["window_start"].tolist()
        assert len(starts) == len(set(starts)) == 11  # each closed window once
        for j, w in enumerate(starts):
            c, s, lo, hi = want[w]
            assert (int(got["count"][j]), got["min"][j], got["max"][j]) == (c, lo, hi)
            assert got["sum"][j] == pytest.approx(s, rel=1e-12)
        chunks = await store.read_chunks("cloud:fleet", "total", limit=1000)
        assert sorted(k for k in forwarded if k[1] == "total") == [
            ("cloud:fleet", "total", c.seq_first) for c in chunks]


T0S = 1_700_000_000.0


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n
