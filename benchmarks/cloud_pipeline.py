"""Cloud pipeline throughput over ingested streams, and what it does to ingest latency (issue 13).

Part 1, throughput: ``--nodes`` nodes' chunks (``--chunks`` per node of ``--records`` readings,
50 sensors each) are put in a fresh SQLite store; a cloud pipeline (the `stream` source over
all nodes, a 10 s tumbling window per sensor with count, mean, min, max, its outbox, the
shipper into the store) runs until every record is consumed and every result is stored.
Our figure: records/s end to end. Baseline from the same run: the same window operator fed
the same decoded batches in memory (no store reads, merge, outbox or shipping): the ceiling.

Part 2, ingest latency with and without a running cloud pipeline, same run: the control
plane's group commit (`GroupCommitter`, as sessions use it) stores one 200-record chunk of node
0's stream ``lat`` every 10 ms; its ack latency (submit to durable commit: when a session
acknowledges the batch to its node) and the event loop's lag (a 1 ms sleep's overshoot) are
sampled in ``--rounds`` alternating phases of ``--seconds`` each: *without* (no cloud pipeline
worker at all) and *with* (the worker, as the control plane runs it: its own thread, loop and
store connection, under a lease, running a cloud pipeline over the very stream being
ingested: a 10 s window per sensor, its results stored beside the ingest; sampled once the run
reads the stream, after its start-up). The phases alternate (without, with; with, without;
...), so a shared machine's changes in load and anything that depends on the order fall on
both. Last, *backlog*: the same with a
second pipeline consuming a fresh backlog of part 1's size (the worker at full speed).

Run: python benchmarks/cloud_pipeline.py [--nodes 3 --chunks 100 --records 5000 --seconds 5
     --rounds 4] [--db URL: part 2 on that database (default: SQLite in a temporary folder)]
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit_json, print_table

from edgewise.cloud.ingest import GroupCommitter
from edgewise.cloud.metrics import Metrics
from edgewise.cloud.pipelines.runner import PipelineRun, direct_ship
from edgewise.cloud.pipelines.spec import parse_cloud_pipeline
from edgewise.cloud.pipelines.worker import CloudPipelineWorker
from edgewise.cloud.store import ChunkWrite, MarkWrite, Store, database_url
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.operators.window import Window, WindowConfig
from edgewise.security.pki import CertificateAuthority, make_csr
from edgewise.security.tokens import EnrolmentToken
from edgewise.sync import codec

T0 = 1_764_547_200.0
SENSORS = 50


def pipeline(name: str, stream: str = "raw") -> str:
    return f"""\
apiVersion: edgewise.io/v1
kind: Pipeline
metadata: {{name: {name}}}
spec:
  sources:
    - {{id: raw, type: stream, stream: {stream}, max_wait: 2s, poll: 0.05}}
  stages:
    - {{id: tens, type: window, inputs: [raw], size: 10s, idle_timeout: 100000s,
       aggregates: [count, mean, min, max]}}
  sinks:
    - {{id: tens-store, type: outbox, inputs: [tens], stream: tens}}
"""


def chunk_cols(node: int, c: int, records: int) -> dict[str, np.ndarray]:
    per = records // SENSORS
    ts = T0 + c * per / 10 + np.repeat(np.arange(per) / 10, SENSORS)
    rng = np.random.default_rng(node * 1_000_003 + c)
    return {"sensor": np.tile(np.array([f"s{i:03d}" for i in range(SENSORS)], dtype=object),
                              per),
            "ts": ts, "value": np.round(rng.normal(50, 5, per * SENSORS), 2)}


async def fill(store: Store, nodes: list[str], chunks: int, records: int, base: int = 0
               ) -> list[dict[str, np.ndarray]]:
    now = datetime.now(UTC)
    cols_all = []
    for c in range(base, base + chunks):
        writes, marks = [], []
        for i, n in enumerate(nodes):
            cols = chunk_cols(i, c, records)
            cols_all.append(cols)
            k = len(cols["ts"])
            writes.append(ChunkWrite(n, "raw", c * k, k, k, False, codec.encode(cols), now))
            marks.append(MarkWrite(n, "raw", (c + 1) * k, now))
        await store.commit_ingest(writes, (), marks)
    return cols_all


async def enrol(store: Store, n: int) -> list[str]:
    ca = CertificateAuthority.create(Path(tempfile.mkdtemp()) / "ca")
    ids = []
    for i in range(n):
        _p, tok = EnrolmentToken.issue({"site": "b"}, timedelta(hours=1), 1)
        await store.add_enrolment_token(tok)
        key = ec.generate_private_key(ec.SECP256R1())
        await store.enrol_node(tok.hash, f"node-{i}", ca.sign_node_csr(make_csr(key), f"node-{i}"))
        ids.append(f"node-{i}")
    return ids


async def stored(store: Store, node: str, stream: str) -> int:
    return sum(s.stored_records for s in await store.stream_stats(node) if s.stream == stream)


async def throughput(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with Store(database_url(None, tmp)) as store:
        nodes = await enrol(store, args.nodes)
        cols = await fill(store, nodes, args.chunks, args.records)
        total = sum(len(c["ts"]) for c in cols)
        # baseline: the window alone over the same batches, in memory, in event-time order
        batches = [Batch(c) for c in cols]
        op = Window("w", WindowConfig(size=10, idle_timeout=100000,
                                      aggregates=["count", "mean", "min", "max"]),
                    RunContext("b", tmp))
        t = time.perf_counter()
        for b in batches:
            op.process(b)
        base_s = time.perf_counter() - t
        run = PipelineRun(parse_cloud_pipeline(pipeline("bench"), "bench"), tmp, store,
                          direct_ship(store))
        src = run.sources["raw"]
        t = time.perf_counter()
        task = asyncio.create_task(run.run())
        while src.records < total:
            await asyncio.sleep(0.01)
        consumed_s = time.perf_counter() - t
        # every window but the last closes once all is read: wait for all of them stored
        starts = np.unique(np.floor((np.concatenate([c["ts"] for c in cols]) - T0) / 10))
        out = (len(starts) - 1) * SENSORS
        while await stored(store, "cloud:bench", "tens") < out:
            await asyncio.sleep(0.01)
        stored_s = time.perf_counter() - t
        run.stop()
        await task
    return {"records": total, "cloud_records_per_s": round(total / stored_s),
            "cloud_consumed_per_s": round(total / consumed_s),
            "window_alone_records_per_s": round(total / base_s), "results": out}


class Feeder:
    """One 200-record chunk of node 0's stream ``lat`` every 10 ms through the group commit,
    event time moving on 0.4 s a chunk; samples ack latency and loop lag."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer
        self.k = 0

    async def run(self, seconds: float, lat: list[float], lag: list[float]) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            payload = codec.encode(chunk_cols(0, self.k, 200))
            now = datetime.now(UTC)
            seq = self.k * 200
            t = time.perf_counter()
            await self.committer.submit(
                [ChunkWrite("node-0", "lat", seq, 200, 200, False, payload, now)], (),
                [MarkWrite("node-0", "lat", seq + 200, now)])
            lat.append(time.perf_counter() - t)
            self.k += 1
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lag.append(time.perf_counter() - t - 0.001)
            await asyncio.sleep(0.009)


def figures_of(lat: list[float], lag: list[float]) -> dict[str, Any]:
    return {"ack_p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
            "ack_p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
            "loop_lag_p99_ms": round(1000 * float(np.percentile(lag, 99)), 2),
            "acks": len(lat)}


async def started(worker: CloudPipelineWorker, name: str) -> None:
    deadline = time.monotonic() + 60
    while worker.status().get(name, {}).get("state") != "running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"cloud pipeline {name} did not start: {worker.status()}")
        await asyncio.sleep(0.05)


async def with_pipeline(feeder: Feeder, url: str, tmp: Path, seconds: float,
                        sample: tuple[list[float], list[float]]) -> int:
    """Start the worker (it takes the lease of the pipeline ``live`` over the ingested
    stream), feed unsampled until the run reads the stream (its merge waits for the nodes
    without the stream for max_wait, 2 s, after each start), then feed ``seconds`` sampled;
    stop the worker. The records the run read while sampled."""
    worker = CloudPipelineWorker(url, tmp / "worker", poll=0.2)
    await asyncio.to_thread(worker.start)
    try:
        await started(worker, "live")
        deadline = time.monotonic() + 30
        while (worker.status()["live"].get("readings_in", 0) == 0
               and time.monotonic() < deadline):
            await feeder.run(0.1, [], [])
        before = worker.status()["live"].get("readings_in", 0)
        await feeder.run(seconds, *sample)
        return int(worker.status()["live"].get("readings_in", 0) - before)
    finally:
        await asyncio.to_thread(worker.stop)


async def ingest_latency(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    url = args.db or database_url(None, tmp)
    async with Store(url) as store:
        nodes = await enrol(store, args.nodes)
        async with GroupCommitter(store, Metrics()) as committer:
            feeder = Feeder(committer)
            await store.put_cloud_pipeline("live", pipeline("live", "lat"), actor="bench")
            samples: dict[str, tuple[list[float], list[float]]] = {
                p: ([], []) for p in ("without", "with", "backlog")}
            live_in = 0
            await feeder.run(1.0, [], [])  # warm-up, not sampled
            for r in range(args.rounds):  # without, with; then with, without; ...
                for phase in (("without", "with") if r % 2 == 0 else ("with", "without")):
                    if phase == "without":
                        await feeder.run(args.seconds, *samples["without"])
                    else:
                        live_in += await with_pipeline(feeder, url, tmp, args.seconds,
                                                       samples["with"])
            worker = CloudPipelineWorker(url, tmp / "worker", poll=0.2)
            await asyncio.to_thread(worker.start)
            await fill(store, nodes, args.chunks, args.records)
            await store.put_cloud_pipeline("bench", pipeline("bench"), actor="bench")
            await started(worker, "bench")
            await feeder.run(args.seconds, *samples["backlog"])
            backlog_in = worker.status()["bench"].get("readings_in", 0)
            await asyncio.to_thread(worker.stop)
    out = {p: figures_of(*v) for p, v in samples.items()}
    out["with"]["pipeline_records_in"] = live_in
    out["backlog"]["pipeline_records_in"] = backlog_in
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--records", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--db", default=None,
                   help="the store of part 2 (default: SQLite, temporary; part 1 always SQLite)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        tp = await throughput(Path(a), args)
        lat = await ingest_latency(Path(b), args)
    print_table("cloud pipeline throughput", [
        ("cloud pipeline, end to end (records/s)", f"{tp['cloud_records_per_s']:,}",
         f"{tp['records']:,} records, {tp['results']:,} results"),
        ("  consumed by the engine (records/s)", f"{tp['cloud_consumed_per_s']:,}", ""),
        ("baseline: the window alone in memory", f"{tp['window_alone_records_per_s']:,}", ""),
    ])
    w, c, b = lat["without"], lat["with"], lat["backlog"]
    print_table("ingest ack latency (group commit, 1 chunk of 200 / 10 ms)", [
        ("ack p50 / p99 (ms), pipeline running", f"{c['ack_p50_ms']} / {c['ack_p99_ms']}",
         f"without: {w['ack_p50_ms']} / {w['ack_p99_ms']}"),
        ("loop lag p99 (ms), pipeline running", str(c["loop_lag_p99_ms"]),
         f"without: {w['loop_lag_p99_ms']}"),
        ("ack p50 / p99 (ms), pipeline on a backlog", f"{b['ack_p50_ms']} / {b['ack_p99_ms']}",
         f"records in: {b['pipeline_records_in']:,}"),
        ("loop lag p99 (ms), pipeline on a backlog", str(b["loop_lag_p99_ms"]), ""),
    ])
    emit_json({"throughput": tp, "ingest": lat, "nodes": args.nodes, "chunks": args.chunks,
               "records_per_chunk": args.records, "seconds": args.seconds,
               "rounds": args.rounds, "store": "postgresql" if args.db else "sqlite"})


if __name__ == "__main__":
    asyncio.run(main())
