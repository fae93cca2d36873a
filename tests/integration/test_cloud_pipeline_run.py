"""A cloud pipeline over ingested streams, in-process: the real engine reads three nodes'
chunks from the store, merges them in event time and stores a fleet-wide window as the
streams of ``cloud:<name>``; results equal the computation done offline, once each, also when
the run is stopped half-way and started again; a node that stays quiet past ``max_wait`` does
not hold the others back, and its late records go to the window's late port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.cloud.pipelines.runner import PipelineRun, direct_ship
from edgewise.cloud.pipelines.spec import parse_cloud_pipeline
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store, database_url
from edgewise.errors import SpecError
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec

NOW = datetime.now(UTC)
T0 = 1_700_000_000.0

PIPELINE = """\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {name: fleet}
spec:
  sources:
    - {id: ten, type: stream, stream: ten, nodes: {site: farm}, max_wait: MAXWAIT, poll: 0.05}
  stages:
    - {id: total, type: window, inputs: [ten], size: 10s, key_by: [], field: value,
       allowed_lateness: LATENESS, idle_timeout: 1000s,
       aggregates: [count, sum, min, max]}
  sinks:
    - {id: total-store, type: outbox, inputs: [total], stream: total}
    - {id: late-store, type: outbox, inputs: [total.late], stream: total-late}
"""


def spec_text(max_wait: str = "30s", lateness: str = "0s") -> str:
    return PIPELINE.replace("MAXWAIT", max_wait).replace("LATENESS", lateness)


async def enrol(store: Store, ca: CertificateAuthority, node_id: str) -> None:
    _plain, rec = EnrolmentToken.issue({"site": "farm"}, timedelta(hours=1), 1)
    await store.add_enrolment_token(rec)
    key = ec.generate_private_key(ec.SECP256R1())
    await store.enrol_node(rec.hash, node_id, ca.sign_node_csr(make_csr(key), node_id))


def readings(node: int, t_from: float, t_to: float) -> dict[str, np.ndarray]:
    ts = np.arange(t_from, t_to, 1.0)
    value = np.round((node + 1) * 10 + np.sin(ts) * 3, 2)
    return {"sensor": np.array([f"n{node}/s"] * len(ts), dtype=object), "ts": ts,
            "value": value}


async def put(store: Store, node_id: str, seq: int, cols: dict[str, np.ndarray]) -> int:
    n = len(cols["ts"])
    await store.commit_ingest(
        [ChunkWrite(node_id, "ten", seq, n, n, False, codec.encode(cols), NOW)], (),
        [MarkWrite(node_id, "ten", seq + n, NOW)])
    return seq + n


async def stored(store: Store, node: str, stream: str) -> dict[str, np.ndarray]:
    parts = [codec.decode(c.payload) for c in await store.read_chunks(node, stream,
                                                                      limit=100_000)]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


async def wait_for(cond: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():  # type: ignore[misc]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def offline(all_cols: list[dict[str, np.ndarray]], size: float = 10.0) -> dict[float, tuple]:
    ts = np.concatenate([c["ts"] for c in all_cols])
    v = np.concatenate([c["value"] for c in all_cols])
    out = {}
    for w in np.unique(np.floor(ts / size) * size):
        sel = (ts >= w) & (ts < w + size)
        out[float(w)] = (int(sel.sum()), float(v[sel].sum()), float(v[sel].min()),
                         float(v[sel].max()))
    return out


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"))


async def run_for(run: PipelineRun, cond: Callable[[], object]) -> None:
    task = asyncio.create_task(run.run())
    try:
        await wait_for(cond)
    finally:
        run.stop()
        await asyncio.wait_for(task, 30)


def test_cloud_pipeline_spec_refuses_edge_parts() -> None:
    bad = spec_text().replace("type: stream, stream: ten, nodes: {site: farm}, "
                              "max_wait: 30s, poll: 0.05", "type: simulator")
    bad = bad.replace("type: outbox, inputs: [total], stream: total",
                      "type: mqtt, inputs: [total], topic: x")
    with pytest.raises(SpecError) as exc:
        parse_cloud_pipeline(bad, "fleet.yaml")
    assert str(exc.value).splitlines() == [
        "fleet.yaml:6: spec.sources.0.type: a cloud pipeline's sources must be of type "
        "stream, not 'simulator'",
        "fleet.yaml:12: spec.sinks.0.type: a cloud pipeline's sinks must be of type outbox, "
        "not 'mqtt'"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_fleet_window_exactly_once_across_a_restart(
        tmp_path: Path, ca: CertificateAuthority, backend: str,
        request: pytest.FixtureRequest) -> None:
    url = (database_url(None, tmp_path) if backend == "sqlite"
           else request.getfixturevalue("postgres"))
    async with Store(url) as store:
        nodes = ["node-a", "node-b", "node-c"]
        for n in nodes:
            await enrol(store, ca, n)
        sent: list[dict[str, np.ndarray]] = []
        seqs = dict.fromkeys(nodes, 0)
        for i, n in enumerate(nodes):  # first half: 0..60 s of event time
            for t in range(0, 60, 20):
                cols = readings(i, T0 + t, T0 + t + 20)
                sent.append(cols)
                seqs[n] = await put(store, n, seqs[n], cols)
        spec = parse_cloud_pipeline(spec_text(), "fleet")
        run = PipelineRun(spec, tmp_path, store, direct_ship(store))

        async def half() -> bool:
            return len((await stored(store, "cloud:fleet", "total")).get("count", [])) >= 5

        await run_for(run, half)
        for i, n in enumerate(nodes):  # second half, read by a new run
            for t in range(60, 120, 20):
                cols = readings(i, T0 + t, T0 + t + 20)
                sent.append(cols)
                seqs[n] = await put(store, n, seqs[n], cols)
        run = PipelineRun(parse_cloud_pipeline(spec_text(), "fleet"), tmp_path, store,
                          direct_ship(store))

        async def all_closed() -> bool:
            return len((await stored(store, "cloud:fleet", "total")).get("count", [])) >= 11

        await run_for(run, all_closed)
        got = await stored(store, "cloud:fleet", "total")
        want = offline(sent)
        starts = got["window_start"].tolist()
        assert len(starts) == len(set(starts)) == 11  # each window once
        for j, w in enumerate(starts):
            c, s, lo, hi = want[w]
            assert (int(got["count"][j]), got["min"][j], got["max"][j]) == (c, lo, hi)
            assert got["sum"][j] == pytest.approx(s, rel=1e-12)
        assert await stored(store, "cloud:fleet", "total-late") == {}
        stats = {s.stream: s for s in await store.stream_stats("cloud:fleet")}
        assert stats["total"].contiguous == 11 and stats["total"].stored_records == 11


async def test_quiet_node_does_not_hold_back_the_others(tmp_path: Path,
                                                         ca: CertificateAuthority) -> None:
    async with Store(database_url(None, tmp_path)) as store:
        for n in ("node-a", "node-b", "node-c"):
            await enrol(store, ca, n)
        seqs = {"node-a": 0, "node-b": 0, "node-c": 0}
        for i, n in enumerate(("node-a", "node-b")):
            seqs[n] = await put(store, n, 0, readings(i, T0, T0 + 60))
        seqs["node-c"] = await put(store, "node-c", 0, readings(2, T0, T0 + 10))
        spec = parse_cloud_pipeline(spec_text(max_wait="1s", lateness="5s"), "fleet")
        run = PipelineRun(spec, tmp_path, store, direct_ship(store))
        task = asyncio.create_task(run.run())
        try:
            async def flowing() -> bool:  # windows up to 40 s close without node-c
                return len((await stored(store, "cloud:fleet", "total")).get("count", [])) >= 4

            await wait_for(flowing)
            # node-c comes back with 10..60 s: all behind the closed windows but the last
            await put(store, "node-c", seqs["node-c"], readings(2, T0 + 10, T0 + 60))

            async def late_counted() -> bool:
                return len((await stored(store, "cloud:fleet", "total-late")).get("ts", [])) > 0

            await wait_for(late_counted)
        finally:
            run.stop()
            await asyncio.wait_for(task, 30)
        late = await stored(store, "cloud:fleet", "total-late")
        got = await stored(store, "cloud:fleet", "total")
        # node-c's records for windows closed before it came back are late, the rest merged
        closed_before = {w for w in got["window_start"].tolist()}
        assert set(late["node"].tolist()) == {"node-c"}
        late_ts = late["ts"]
        assert all(np.floor((t - T0) / 10) * 10 + T0 in closed_before for t in late_ts)
        assert run.engine.counters.late == len(late_ts)
