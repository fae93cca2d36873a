"""Engine calibration: what the engine itself, its committer and the outbox writer cost.

`_calibrate_engine` times the engine with no stages (back to back, idle and paced), one group
commit on the event loop (`_group_commit_costs`) and the writer thread's commits with fsync
(`_writer_costs`), in a temporary directory. `calibrate_site_engine` runs the engine with a
site's own sources and no stages at the real pace: what the node pays for batches, commits and
ticks at that site's gaps between batches. See `edgewise.plan.costs` for the model.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgewise.pipeline.batch import Batch
from edgewise.plan.cost_model import PACE_S, SLOW_PACE_S, START_TS, TICK_S
from edgewise.plan.gc_cost import GcWatch
from edgewise.plan.workload import SiteSpec


def _engine_doc(batch: int, batches: int, interval: float, realtime: bool,
                rate: float) -> dict[str, Any]:
    source: dict[str, Any] = {
        "id": "s", "type": "simulator", "profile": "custom", "realtime": realtime,
        "start": START_TS if not realtime else "now", "rate_hz": rate, "batch": batch,
        "groups": [{"prefix": "c", "count": batch, "spike_prob": 0.0}]}
    if not realtime:
        source["limit"] = batch * batches
    return {
        "apiVersion": "edgewise.io/v1", "kind": "Pipeline", "metadata": {"name": "calibration"},
        "spec": {"sources": [source],  # no sinks: what a batch costs the engine itself
                 "outbox": {"sync": "full", "commit_interval": interval}},
    }


def _engine_run(work: Path, batch: int, batches: int, interval: float,
                rate: float | None = None, span: float | None = None) -> tuple[
                    float, int, int, float]:
    """Event-loop thread CPU (the synthetic readings excluded) over the middle of a run: the
    CPU, batches, commits and wall seconds in that span. ``rate``: batches per second, paced
    (one tick of ``batch`` sensors per batch); None: back-to-back, ``batches`` batches."""
    from edgewise.pipeline.spec import parse_pipeline
    from edgewise.plan.source import plan_engine

    doc = _engine_doc(batch, batches, interval, rate is not None, rate or 10.0)
    spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False), "<calibration>")
    engine, srcs = plan_engine(spec, work)
    marks: list[tuple[float, float, int, int, float]] = []

    def mark() -> None:
        marks.append((time.thread_time(), sum(s.generation_s for s in srcs.values()),
                      engine.counters.batches_in, engine.commits, time.perf_counter()))

    async def main() -> None:
        task = asyncio.create_task(engine.run())
        if rate is None:
            for frac in (0.1, 0.9):
                while engine.counters.batches_in < frac * batches and not task.done():
                    await asyncio.sleep(0)
                mark()
        else:
            await asyncio.sleep(0.1)
            mark()
            await asyncio.sleep(span if span is not None else batches / rate)
            mark()
            engine.stop()
        await task

    asyncio.run(main())
    (c0, g0, b0, k0, w0), (c1, g1, b1, k1, w1) = marks
    return (c1 - c0) - (g1 - g0), b1 - b0, k1 - k0, w1 - w0


def _writer_costs(work: Path, pause: float) -> dict[str, float]:
    """The writer thread's CPU per commit (fsync on every commit, as on a node): fixed, per
    checkpoint byte, per chunk. Back to back (best of twelve), and after a pause as in real
    time (``pause``, and SLOW_PACE_S for the fixed part: the longer the writer sleeps, the
    colder its caches), where the mean counts (SQLite folds its write-ahead log into the
    database every so many pages: big checkpoints make that a real cost). The checkpoint
    changes size from one commit to the next, as a node's does (see `timed`)."""
    from edgewise.outbox import Outbox, PendingChunk
    from edgewise.sync import codec

    small, big = 1024, 256 * 1024
    chunk = {"sensor": np.array([f"c/{i:03d}" for i in range(200)], dtype=object),
             "ts": START_TS + np.arange(200) * 0.02,
             "value": np.round(np.random.default_rng(1).normal(50, 5, 200), 2)}
    enc = len(codec.encode(chunk))
    c0 = time.thread_time()
    for _ in range(12):
        codec.encode(chunk)
    t_encode = (time.thread_time() - c0) / 12 * 1e6
    with Outbox(work / "writer.db", 1 << 30, "full") as ob:
        ob.register_stream("s", 5)

        def timed(chunks: list[Any], size: int, sleep: float, n: int) -> float:
            out = []
            for i in range(n):
                # a byte more every other commit: a node's checkpoint changes size from one
                # commit to the next, and SQLite overwrites a row of unchanged size in place
                # (about half the CPU per byte of one written anew: 400 KB, 1.1 against 1.9 ms
                # on the development VM)
                blob = os.urandom(size + i % 2)
                if sleep:
                    time.sleep(sleep)
                c0 = time.thread_time()
                ob.commit(chunks, None, {"engine": blob})
                out.append(time.thread_time() - c0)
            return (min(out) if not sleep else float(np.mean(out))) * 1e6

        hot_small = timed([], small, 0.0, 12)
        hot_chunk = timed([PendingChunk("s", chunk, 200)], small, 0.0, 12)
        rt_small = timed([], small, pause, 16)
        rt_slow = timed([], small, SLOW_PACE_S, 6)
        rt_big = timed([], big, pause, 16)
        rt_chunk = timed([PendingChunk("s", chunk, 200)], small, pause, 16)
    per_byte = max(0.0, (rt_big - rt_small) / (big - small))
    return {"commit_us": hot_small, "checkpoint_byte_us": per_byte,
            "chunk_us": max(0.0, hot_chunk - hot_small - t_encode),
            "chunk_byte_us": per_byte, "commit_rt_us": max(0.0, rt_small - per_byte * small),
            "commit_slow_rt_us": max(0.0, rt_slow - per_byte * small),
            "chunk_rt_us": max(0.0, rt_chunk - rt_small - t_encode - per_byte * enc)}


def _group_commit_costs(work: Path, pause: float) -> tuple[float, float, float, float]:
    """Event-loop CPU of one group commit (cut, hand-over to the writer thread, completion and
    acknowledgements), back-to-back and after a pause; and of its two halves: the cut
    (``kick``) back to back, and the completion after a pause (the loop sleeps while the writer
    commits, and wakes up for the result)."""
    from edgewise.outbox import Outbox
    from edgewise.pipeline.commit import Committer

    batch = Batch({"sensor": np.array([f"c/{i:03d}" for i in range(16)], dtype=object),
                   "ts": START_TS + np.arange(16.0), "value": np.arange(16.0)}, 16)

    async def main(ob: Outbox) -> tuple[float, float]:
        committer = Committer(ob, lambda _p: {"engine": b"x" * 64}, lambda _p, _r: None)
        try:
            hot: list[float] = []
            paced: list[float] = []
            cut: list[float] = []
            done: list[float] = []
            for i in range(60):
                if i >= 40:
                    await asyncio.sleep(pause)
                committer.add("s", batch)
                committer.position("s", i)
                c0 = time.thread_time()
                committer.kick()
                c1 = time.thread_time()
                await committer.wait()
                c2 = time.thread_time()
                (hot if i < 40 else paced).append(c2 - c0)
                (cut if i < 40 else done).append(c1 - c0 if i < 40 else c2 - c1)
            return (float(np.min(hot[5:])) * 1e6, float(np.median(paced)) * 1e6,
                    float(np.min(cut[5:])) * 1e6, float(np.median(done)) * 1e6)
        finally:
            committer.close()

    with Outbox(work / "committer.db", 1 << 30, "normal") as ob:
        ob.register_stream("s", 5)
        return asyncio.run(main(ob))


def _calibrate_engine() -> dict[str, Any]:
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgewise-calibration-") as tmp:
        work = Path(tmp)
        # back-to-back, per batch and per record (each run's best of two)
        per_batch = []
        for i, (batch, batches) in enumerate([(16, 1500), (1024, 300)]):
            best = math.inf
            for rep in range(2):
                cpu, b, _k, _w = _engine_run(work / f"hot{i}-{rep}", batch, batches, 30.0)
                best = min(best, cpu / max(b, 1) * 1e6)
            per_batch.append((batch, best))
        (n1, y1), (n2, y2) = per_batch
        record_us = max(0.0, (y2 - y1) / (n2 - n1))
        batch_us = max(0.0, y1 - record_us * n1)
        commit_loop_us, commit_loop_rt, cut_us, done_rt = _group_commit_costs(work, PACE_S)
        # at the real pace: an idle engine (ticks only), then 100 batches a second
        cpu, _b, _k, wall = _engine_run(work / "idle", 16, 1, 30.0, 1e-3, 0.3)
        tick_rt = cpu * 1e6 / (wall / TICK_S)
        cpu, b, _k, wall = _engine_run(work / "paced", 16, 30, 30.0, 100.0)
        batch_rt = max(batch_us, (cpu * 1e6 - tick_rt * wall / TICK_S) / max(b, 1))
        writer = _writer_costs(work, PACE_S)
    return {"batch_us": batch_us, "record_us": record_us, "commit_loop_us": commit_loop_us,
            "batch_rt_us": batch_rt, "commit_loop_rt_us": max(commit_loop_us, commit_loop_rt),
            "tick_rt_us": tick_rt, **writer, "commit_cut_us": cut_us,
            "commit_done_rt_us": done_rt, "source": "calibrated",
            "seconds": time.perf_counter() - t_start}


SITE_WARM_S = 0.5  # not measured: start-up, first commits
SITE_MAX_RATE = 250_000.0  # readings/s at most (the realtime run's sample)


BALLAST_KEY = "planner-ballast"  # the checkpoint row standing in for the operators' state


def _with_ballast(engine: Any, size: int) -> None:
    """Every group commit of ``engine`` also writes ``size`` bytes of checkpoint (a byte more
    every other commit: a node's checkpoint changes size from one commit to the next, and
    SQLite writes a row of unchanged size in place, at about half the CPU per byte). The
    bytes are made once, so the event loop pays nothing for them; the writer thread pays
    what the site's operator state costs it, and the commits take as long as the site's do
    (the write-ahead log fills and is folded into the database as often)."""
    pads = (bytes(size), bytes(size + 1))
    snapshot = engine._snapshot
    count = [0]

    def padded(positions: dict[str, Any]) -> dict[str, bytes]:
        count[0] += 1
        return {**snapshot(positions), BALLAST_KEY: pads[count[0] % 2]}

    engine._snapshot = padded


def calibrate_site_engine(site: SiteSpec, span: float,
                          checkpoint_bytes: float = 0.0) -> dict[str, Any]:
    """The engine with the site's own sources and no stages, at the real pace for ``span``
    seconds after a warm-up: process CPU per second (the simulator's own work left out) of
    what the engine pays whatever the stages, its batches and records, its group commits
    (loop and writer; the checkpoint holds only source positions) and ticks, with every
    wake-up the site's own gaps between batches cause (the longer the engine sleeps, the
    colder it wakes up: a pause of 10 ms does not show what one of 250 ms costs). The same
    sample of sensors as the realtime run of ``--simulate``, scaled back; the sources' batches
    out of step as unsynchronised devices arrive. Also the group commits per second, and the
    garbage collector's runs per second (its full collections are left out of the cores:
    `edgewise.plan.gc_cost` counts them). ``checkpoint_bytes``: the
    packed size of the site's operator state, written with every commit as the node writes it
    (`_with_ballast`): the writer's CPU for those bytes is then in the cores, and the commits
    per second are those of a writer that stores them: on the pump station's 400 KB, the
    writer's commit took 4-7 ms (median) instead of 1-3 and longer than the 20 ms interval up
    to three times a second (230 ms once, when the shared disk stalled), and the realtime run
    made 28-49 commits a second where the engine without them made 44-49."""
    from edgewise.pipeline.spec import parse_pipeline
    from edgewise.plan import flows as F
    from edgewise.plan.source import (
        out_of_step,
        plan_engine,
        split_fields,
        started,
        value_columns,
    )

    full = sum(s.count * s.rate_hz for s in site.sources)
    fraction = min(1.0, SITE_MAX_RATE / max(full, 1e-9))
    sources = []
    got = 0.0
    for src in site.sources:
        cols = value_columns(src, site.name, fraction)
        n = sum(g["count"] for g in cols[0][1])
        got += n * src.rate_hz
        entry: dict[str, Any] = {
            "id": src.id, "type": "simulator", "profile": "custom", "seed": 42,
            "rate_hz": src.rate_hz, "groups": cols[0][1], "realtime": True, "start": "now",
            "batch": F.batch_records(src.count * src.rate_hz, src.count, src.protocol)}
        if src.fields:
            entry["fields"] = [{"name": name, "groups": g} for name, g in cols]
        sources.append(entry)
    doc = {"apiVersion": "edgewise.io/v1", "kind": "Pipeline",
           "metadata": {"name": f"{site.name}-engine"},
           "spec": {"sources": sources, "outbox": {"sync": "full", "max_bytes": "1GiB"}}}
    fields = split_fields(doc)
    with tempfile.TemporaryDirectory(prefix="edgewise-calibration-") as tmp, \
            GcWatch() as watch:
        spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False), "<calibration>")
        engine, srcs = plan_engine(spec, Path(tmp), fields=fields)
        if checkpoint_bytes >= 1:  # scaled like the rest when the sensors are sampled
            _with_ballast(engine, round(checkpoint_bytes * got / max(full, 1e-9)))
        out_of_step(srcs)
        marks: list[tuple[float, float, float, int, int, float]] = []

        def mark() -> None:
            marks.append((time.process_time(), time.perf_counter(),
                          sum(s.generation_s for s in srcs.values()), engine.commits,
                          watch.all_collections(), watch.all_full_s()))

        async def main() -> None:
            task = asyncio.create_task(engine.run())
            await started(srcs)
            await asyncio.sleep(SITE_WARM_S)
            mark()
            await asyncio.sleep(span)
            mark()
            engine.stop()
            await task

        asyncio.run(main())
    (c0, w0, g0, k0, n0, f0), (c1, w1, g1, k1, n1, f1) = marks
    wall = max(w1 - w0, 1e-3)
    share = got / max(full, 1e-9)
    # full collections are the collector's part (`edgewise.plan.gc_cost`), counted there
    return {"cores": max(0.0, (c1 - c0) - (g1 - g0) - (f1 - f0)) / wall / share,
            "commits_per_s": (k1 - k0) / wall, "span_s": wall, "fraction": share,
            "collections_per_s": (n1 - n0) / wall / share,
            "checkpoint_bytes": float(round(checkpoint_bytes)) if checkpoint_bytes >= 1 else 0.0}


def merge_site_engine(halves: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of `calibrate_site_engine` as one, made around `--simulate`'s realtime runs (E R E
    R ... R E, each realtime run between two of them, so that together they see the machine as
    that run did: on a shared machine, one run of 2 s a few seconds before it gave the bus
    0.042 or 0.088 cores, where the whole node measured 0.067 and 0.077). Rates are weighted by
    each run's measured span times the realtime runs it stands beside (one for the first and
    the last run, two for one between two realtime runs): with one realtime run, the mean of
    the two halves by their spans; with several, every realtime run's neighbours count alike.
    Each run's cores are kept (``halves``) and so is, per realtime run, the merge of its two
    neighbours (``rounds``: cores)."""
    spans = [max(h["span_s"], 1e-9) for h in halves]
    sides = [1.0 if k in (0, len(halves) - 1) else 2.0 for k in range(len(halves))]
    weights = [s * n for s, n in zip(spans, sides, strict=True)]
    total = sum(weights)
    out: dict[str, Any] = dict(halves[0])
    for key in ("cores", "commits_per_s", "collections_per_s"):
        out[key] = sum(h[key] * w for h, w in zip(halves, weights, strict=True)) / total
    out["span_s"] = sum(spans)
    out["halves"] = [h["cores"] for h in halves]
    pairs = zip(zip(halves, spans, strict=True), zip(halves[1:], spans[1:], strict=True),
                strict=False)
    out["rounds"] = [(a["cores"] * sa + b["cores"] * sb) / (sa + sb)
                     for (a, sa), (b, sb) in pairs]
    return out
