"""Site calibration: a site's own operators run in the engine on synthetic data, instrumented.

`SiteCalibration` builds the calibration pipeline (`_site_doc`, shaped by `_run_shape`), wraps
every stage's ``process`` and ``snapshot`` (`_instrument`: thread CPU and features per call),
runs it, fits the coefficients with `nnls`. `Turns` lets a calibration thread take turns with
a measurement on one CPU. Model and cache: `edgewise.plan.costs`.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import Batch
from edgewise.plan import flows as F
from edgewise.plan.cost_model import (
    SEED,
    START_TS,
    _has_percentiles,
    _window_shape,
    config_of,
    features_of,
    stage_cpu_us,
    static_stage,
)
from edgewise.plan.gc_cost import GcWatch, full_collection
from edgewise.plan.source import split_fields, value_columns
from edgewise.plan.workload import SiteSpec, StageSpec


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (drop the most negative, refit)."""
    active = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if np.all(sol >= 0):
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


WARM_CALLS = 2
BUDGET_S = 0.4  # thread CPU of a site's calibration run (by the static table)
MAX_PACE_S = 0.02  # the longest pause before a batch (wake-up costs level off by then)
PACED_CALLS = 12  # batches per source in a calibration that come after a pause
MIN_PERIOD_CALLS = 30  # batches per window at least, however fast event time runs


class _WindowTracker:
    """Per-call window features (groups touched, firing, values held), from the batches."""

    def __init__(self, cfg: Any) -> None:
        size, slide, self.m = _window_shape(cfg)
        self.slide_us = max(1, round(slide * 1e6))
        self.size_us = max(1, round(size * 1e6))
        self.key_by = list(cfg.key_by)
        self.time_field = cfg.time_field
        self.percentiles = _has_percentiles(cfg)
        self.held: dict[int, int] = {}
        self.watermark = -math.inf

    def features(self, batch: Batch) -> dict[str, float]:
        t = batch.columns[self.time_field].astype(np.float64)
        base = np.round(t * 1e6).astype(np.int64) // self.slide_us
        widx = (base[:, None] - np.arange(self.m)[None, :]).reshape(-1)
        windows, counts = np.unique(widx, return_counts=True)
        groups = 0
        for w, c in zip(windows.tolist(), counts.tolist(), strict=True):
            self.held[w] = self.held.get(w, 0) + c
            if not self.key_by:
                groups += 1
                continue
            rows = np.flatnonzero((base[:, None] - np.arange(self.m)[None, :] == w).any(axis=1))
            groups += int(_key_count(batch.take(rows), self.key_by)) if len(rows) < batch.n \
                else int(_key_count(batch, self.key_by))
        self.watermark = max(self.watermark, float(t.max()))
        due = [w for w in self.held if (w * self.slide_us + self.size_us) / 1e6 <= self.watermark]
        held = sum(self.held.pop(w) for w in due)
        return {"group": float(groups), "fire": float(bool(due)),
                "held": float(held) if self.percentiles else 0.0}

    def values_open(self) -> int:
        return sum(self.held.values())


def _key_count(batch: Batch, key_by: list[str]) -> float:
    if not key_by:
        return 1.0
    if len(key_by) == 1:
        return float(len(set(batch.columns[key_by[0]].tolist())))
    return float(len(set(zip(*(batch.columns[k].tolist() for k in key_by), strict=True))))


def _out_records(result: Any) -> int:
    if result is None or isinstance(result, Batch):
        return 0 if result is None else result.n
    return sum(b.n for b in result.values() if b is not None)


def _site_doc(site: SiteSpec, stages: list[StageSpec], seconds: float,
              compression: float, passengers: list[StageSpec] | None = None) -> dict[str, Any]:
    """The site's stages fed by simulator sources, back to back, event time ``compression``
    times faster, ``seconds`` of data (at the sensors' real rate). ``passengers``: user
    functions that run among them (as in production: their calls change their neighbours'
    costs) but are not fitted."""
    passengers = passengers or []
    used = {r for st in [*stages, *passengers] for r in st.inputs}
    sources = []
    for src in site.sources:
        if src.id not in used:
            continue
        cols = value_columns(src, site.name, 1.0)
        rate = src.count * src.rate_hz
        extra = {"fields": [{"name": n, "groups": g} for n, g in cols]} if src.fields else {}
        sources.append({
            "id": src.id, "type": "simulator", "profile": "custom", "seed": SEED,
            # fewer ticks per event second: the same batches cover more event time
            "rate_hz": src.rate_hz / compression, "groups": cols[0][1], **extra,
            "realtime": False,
            "start": START_TS, "batch": F.batch_records(rate, src.count, src.protocol),
            "limit": max(1, round(seconds * src.rate_hz)) * src.count})
    # the sinks production has (they run between the operators' calls, so they count): local
    # actions, and an outbox stream for every output meant for the cloud
    sinks: list[dict[str, Any]] = []
    for st in stages:
        if st.local is not None or st.operator in ("threshold", "anomaly"):
            sinks.append({"id": f"{st.id}-local", "type": "log", "inputs": [st.id],
                          "level": "DEBUG", "max_per_batch": 1})
        if st.to_cloud:
            sinks.append({"id": f"{st.id}-out", "type": "outbox", "inputs": [st.id],
                          "stream": st.id})
    return {"apiVersion": "edgewise.io/v1", "kind": "Pipeline",
            "metadata": {"name": f"{site.name}-calibration"},
            "spec": {"sources": sources,
                     "stages": [{"id": st.id, "type": st.operator, "inputs": list(st.inputs),
                                 **st.params} for st in stages] + [
                                {"id": st.id, "type": "python", "class": st.function,
                                 "inputs": list(st.inputs), "options": dict(st.params)}
                                for st in passengers],
                     "sinks": sinks, "outbox": {"sync": "normal", "max_bytes": "1GiB"}}}


def _run_shape(site: SiteSpec, stages: list[StageSpec], flows: dict[str, F.Flow],
               budget: float = 0.0) -> tuple[float, float]:
    """(seconds of data, compression) of a calibration run: about ``budget`` of CPU by the
    static table, and event time fast enough for the longest window fed by sensors to close
    3.5 times, but never so fast that one closes in fewer than MIN_PERIOD_CALLS batches; at
    least two FFT blocks."""
    per_s, longest, limit, fft_s = 0.0, 0.0, math.inf, 0.0
    sources = {s.id for s in site.sources}
    for st in stages:
        fin = F.merge([flows[r] for r in st.inputs])
        per_s += stage_cpu_us(st, static_stage(st, fin, flows[st.id]), fin, flows[st.id])
        cfg = config_of(st)
        period = 0.0
        if st.operator == "window":
            period = _window_shape(cfg)[1]
        elif st.operator == "downsample" and cfg.interval is not None:
            period = float(cfg.interval)
        elif st.operator == "fft":
            fft_s = max(fft_s, 2.2 * cfg.samples / max(fin.per_key_rate, 1e-9))
        if period and all(r in sources for r in st.inputs):
            # a stage fed by another windowed stage keeps its calls per window at any speed
            longest = max(longest, period)
            limit = min(limit, period * fin.calls / MIN_PERIOD_CALLS)
    per_s += sum(F.source_flow(s, site.name).calls for s in site.sources) * 30.0
    per_s = max(per_s, 1.0) * 1e-6
    budget = budget or BUDGET_S
    seconds = budget / per_s
    if fft_s > seconds:
        seconds = min(fft_s, 4 * budget / per_s)
    max_c = limit
    compression = max(1.0, min(max_c, 3.5 * longest / seconds)) if longest else 1.0
    return seconds, compression


class Turns:
    """Two threads taking turns, never running together: the caller's measurement and a
    calibration in a thread of its own. The calibration yields after ``slice_s`` of its thread
    CPU; the caller hands over at points of its choosing (`give`). Paired this finely, both see
    the machine in the same states, however its speed changes while they run."""

    def __init__(self, slice_s: float) -> None:
        self.slice_s = slice_s
        self._cal = threading.Event()
        self._main = threading.Event()
        self.stopping = False
        self.finished = False
        self.started = 0.0

    # the caller's side
    def give(self) -> None:
        if self.finished:
            return
        self._main.clear()
        self._cal.set()
        self._main.wait()

    def stop(self) -> None:
        self.stopping = True
        self.give()

    # the calibration's side
    def wait_turn(self) -> None:
        self._cal.wait()
        self.started = time.thread_time()

    def maybe_yield(self) -> None:
        if not self.stopping and time.thread_time() - self.started >= self.slice_s:
            self._cal.clear()
            self._main.set()
            self._cal.wait()
            self.started = time.thread_time()

    def done(self) -> None:
        self.finished = True
        self._main.set()


class SiteCalibration:
    """One calibration run of a site's stages in the engine, instrumented, then the fit."""

    def __init__(self, site: SiteSpec, stages: list[StageSpec], flows: dict[str, F.Flow],
                 budget: float = BUDGET_S, extra: float = 1.0,
                 passengers: list[StageSpec] | None = None) -> None:
        from edgewise.pipeline.spec import parse_pipeline

        self.t_start = time.perf_counter()
        self.site = site
        self.stages = stages
        self.seconds, self.compression = _run_shape(site, stages, flows, budget)
        self.passengers = passengers or []
        self.pcalls: dict[str, list[tuple[int, float, bool]]] = {
            st.id: [] for st in self.passengers}  # (records, CPU, after a pause) per call
        doc = _site_doc(site, stages, self.seconds * extra, self.compression, passengers)
        self.fields = split_fields(doc)
        self.spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False),
                                   f"<{site.name} calibration>")
        self.cfgs = {st.id: config_of(st) for st in stages}
        self.feats = {st.id: features_of(st.operator or "") for st in stages}
        self.rows: dict[str, list[list[float]]] = {st.id: [] for st in stages}
        self.costs: dict[str, list[float]] = {st.id: [] for st in stages}
        # the collector's runs per call
        self.gcs: dict[str, list[float]] = {st.id: [] for st in stages}
        self.paced: dict[str, list[bool]] = {st.id: [] for st in stages}
        # (CPU, bytes, values held, collections) per snapshot
        self.snaps: dict[str, list[tuple[float, int, int, int]]] = {
            st.id: [] for st in stages}
        self.woken: dict[str, list[float]] = {st.id: [] for st in stages}  # `_woken_snapshots`
        self.watch = GcWatch(promotions=True)
        self.last: dict[str, Any] = {}
        # pause before about PACED_CALLS batches of every source, as long as the engine idles
        # between two batches in real time (most of the gap; at most MAX_PACE_S)
        batches = sum(F.source_flow(s, site.name).calls for s in site.sources)
        self.pace = min(MAX_PACE_S, 0.8 / max(batches, 1e-9))
        self.pause_every = {s.id: max(8, round(F.source_flow(s, site.name).calls * self.seconds
                                               / PACED_CALLS))
                            for s in site.sources}

    def run(self, turns: Turns | None = None) -> None:
        """The site's stages in the engine on the synthetic data; with ``turns``, taking turns
        with the caller (and stopping when it says so)."""
        from edgewise.plan.source import plan_engine

        source_ids = {c.id for c in self.spec.sources}
        paused: set[int] = set()
        now = [False]  # routing a batch that came after a pause
        woken = [False, False]  # after this batch, `_woken_snapshots`; they slept before it

        def routed() -> None:  # a source's batch has been through the pipeline
            if woken[0]:  # it came after a source's pause; the next comes after their sleep
                self._woken_snapshots(raw)
            now[0], woken[0], woken[1] = False, False, woken[0]
            if turns is not None:
                turns.maybe_yield()
                if turns.stopping:
                    engine.stop()

        def observe(node: str, port: str, batch: Batch) -> Callable[[], None] | None:
            if node not in source_ids:
                return None
            woken[0] = id(batch) in paused
            now[0], woken[1] = woken[0] or woken[1], False
            paused.discard(id(batch))
            return routed

        with tempfile.TemporaryDirectory(prefix="edgewise-calibration-") as tmp, self.watch:
            engine, srcs = plan_engine(self.spec, Path(tmp), observer=observe,
                                       fields=self.fields)
            for sid, src in srcs.items():
                src.pause_every, src.pause_s, src.paused = self.pause_every[sid], self.pace, \
                    paused
            raw = {st.id: engine.stages[st.id].snapshot for st in self.stages}
            for st in self.stages:
                _instrument(engine.stages[st.id], st, self.cfgs[st.id], self.feats[st.id],
                            self.rows[st.id], self.costs[st.id], self.snaps[st.id],
                            self.paced[st.id], now, self.watch, self.gcs[st.id])
            for st in self.passengers:
                _instrument_function(engine.stages[st.id], self.pcalls[st.id], now)
            asyncio.run(engine.run())
        self.last = engine.stages

    def _woken_snapshots(self, raw: dict[str, Callable[[], Any]]) -> None:
        """Every stage's snapshot, packed, in the engine's order, after the engine slept
        ``pace`` seconds (at a site whose every batch starts a group commit after a sleep):
        timed, not kept, full collections left out. The retail store's 22 KB: 711-959 us,
        the run's snapshots between back-to-back batches 521-797 (as these without a sleep)."""
        time.sleep(self.pace)  # the engine asleep: nothing else runs meanwhile
        for sid, snapshot in raw.items():
            f0 = self.watch.full_s()
            c0 = time.thread_time()
            ckpt.pack(snapshot())
            self.woken[sid].append(time.thread_time() - c0 - (self.watch.full_s() - f0))

    def result(self) -> dict[str, Any]:
        """The fitted coefficients and state costs (a cache entry)."""
        out: dict[str, Any] = {"compression": self.compression,
                               "seconds_of_data": self.seconds, "stages": {}}
        for st in self.stages:
            sid = st.id
            feats = self.feats[sid]
            n = min(len(self.costs[sid]), len(self.rows[sid]), len(self.paced[sid]))
            coef = np.zeros(len(feats))
            gc_coef = np.zeros(len(feats))
            wake = 0.0
            if n > WARM_CALLS + 1:
                x = np.array(self.rows[sid][WARM_CALLS:n])
                y = np.array(self.costs[sid][WARM_CALLS:n]) * 1e6
                paced = np.array(self.paced[sid][WARM_CALLS:n], dtype=bool)
                coef = nnls(x[~paced], y[~paced])
                # the collections its calls trigger, per unit of the same features
                gc_coef = nnls(x, np.array(self.gcs[sid][WARM_CALLS:n], dtype=float))
                if paced.any():  # what a call after a pause costs beyond the model
                    wake = max(0.0, float(np.median(y[paced] - x[paced] @ coef)))
            snap_us, snap_bytes = _snapshot_cost(self.snaps[sid], self.cfgs[sid], st,
                                                 self.compression)
            woken = self.woken[sid][WARM_CALLS:] or self.woken[sid]
            scale = snap_us / max(_snapshot_cost(self.snaps[sid], self.cfgs[sid], st, 1.0)[0],
                                  1e-9) if snap_us else 1.0
            op = self.last.get(sid)
            snaps = self.snaps[sid]
            out["stages"][sid] = {
                "operator": st.operator, "coef": dict(zip(feats, coef.tolist(), strict=True)),
                "gc_coef": dict(zip(feats, gc_coef.tolist(), strict=True)),
                "snapshot_gcs": float(np.mean([s[3] for s in snaps])) if snaps else 0.0,
                "snapshot_us": snap_us, "snapshot_bytes": snap_bytes,
                "snapshot_woken_us": float(np.mean(woken)) * 1e6 * scale if woken else 0.0,
                "snapshot_rt_us": snap_us + (_paced_extra(op.snapshot, self.pace)
                                             if op else 0.0),
                "timer_us": _timer_us(op) if op is not None else 0.0,
                "wake_us": wake, "calls": n, "paced_calls": int(np.sum(self.paced[sid]))}
        # a full collection of this process with the operators' state alive (self.last); the
        # objects a middle collection promoted, on average over the run (`gc_cost`)
        out["gc_full_us"], out["gc_heap"], out["gc_promoted_per_middle"] = (
            *full_collection(self.pace), self.watch.promoted_per_middle())
        out["functions"] = {}
        for sid, calls in self.pcalls.items():  # user functions: per call and per record
            rows = [(n, c) for n, c, paced in calls[WARM_CALLS:] if not paced]
            if len(rows) < 3:
                continue
            x = np.array([[1.0, n] for n, _c in rows])
            y = np.array([c for _n, c in rows]) * 1e6
            call, record = nnls(x, y).tolist()
            out["functions"][sid] = {"call": call, "record": record, "calls": len(rows)}
        out["seconds"] = time.perf_counter() - self.t_start
        return out


def _calibrate_site(site: SiteSpec, stages: list[StageSpec], flows: dict[str, F.Flow],
                    passengers: list[StageSpec] | None = None) -> dict[str, Any]:
    cal = SiteCalibration(site, stages, flows, passengers=passengers)
    cal.run()
    return cal.result()


def _instrument_function(op: Any, calls: list[tuple[int, float, bool]],
                         now: list[bool]) -> None:
    """Time every call of a user function: the event loop's part (the hand-over) and the
    function's own, in its worker thread."""
    inner_cpu = [0.0]
    inner = op.inner
    fn_inner = inner.process

    def inner_process(batch: Batch) -> Any:
        t0 = time.thread_time()
        try:
            return fn_inner(batch)
        finally:
            inner_cpu[0] += time.thread_time() - t0

    inner.process = inner_process
    fn = op.process

    def timed_process(batch: Batch) -> Any:
        inner_cpu[0] = 0.0
        t0 = time.thread_time()
        try:
            return fn(batch)
        finally:
            calls.append((batch.n, time.thread_time() - t0 + inner_cpu[0], now[0]))

    op.process = timed_process


def _instrument(op: Any, st: StageSpec, cfg: Any, feats: tuple[str, ...],
                rows: list[list[float]], costs: list[float],
                snaps: list[tuple[float, int, int, int]], paced: list[bool],
                now: list[bool], watch: GcWatch, gcs: list[float]) -> None:
    """Wrap a stage's process (features, thread CPU per call, collections it triggered) and
    snapshot (CPU, bytes, collections); full collections are left out of the CPU (they are a
    part of their own, `edgewise.plan.gc_cost`)."""
    tracker = _WindowTracker(cfg) if st.operator == "window" else None
    key_by = list(getattr(cfg, "key_by", []) or [])
    process, snapshot = op.process, op.snapshot

    def timed_process(batch: Batch) -> Any:
        g0, f0 = watch.collections(), watch.full_s()
        c0 = time.thread_time()
        result = process(batch)
        costs.append(time.thread_time() - c0 - (watch.full_s() - f0))
        gcs.append(float(watch.collections() - g0))
        # features after the call: reading the batch first would warm the operator's caches
        f = {"call": 1.0, "record": float(batch.n), "out": float(_out_records(result))}
        if "key" in feats:
            f["key"] = _key_count(batch, key_by)
        if tracker is not None:
            f.update(tracker.features(batch))
        paced.append(now[0])
        rows.append([f.get(k, 0.0) for k in feats])
        return result

    def timed_snapshot() -> Any:
        g0, f0 = watch.collections(), watch.full_s()
        c0 = time.thread_time()
        state = snapshot()
        size = len(ckpt.pack(state))
        spent = time.thread_time() - c0 - (watch.full_s() - f0)
        snaps.append((spent, size, tracker.values_open() if tracker is not None else 0,
                      watch.collections() - g0))
        return state

    op.process = timed_process
    op.snapshot = timed_snapshot


def _snapshot_cost(snaps: list[tuple[float, int, int, int]], cfg: Any, st: StageSpec,
                   compression: float) -> tuple[float, float]:
    """Mean CPU (full collections left out: `edgewise.plan.gc_cost`) and mean size of the
    stage's snapshots; for percentile windows run faster, scaled to the values a window of
    real length holds (9 bytes each, packed)."""
    if not snaps:
        return 0.0, 0.0
    timed = snaps[WARM_CALLS:] if len(snaps) > 2 * WARM_CALLS else snaps  # after a warm-up
    cost = float(np.mean([s[0] for s in timed])) * 1e6
    size = float(np.mean([s[1] for s in snaps]))
    if st.operator == "window" and _has_percentiles(cfg) and compression > 1:
        extra = 9.0 * float(np.mean([s[2] for s in snaps])) * (compression - 1)
        cost *= (size + extra) / max(size, 1.0)
        size += extra
    return cost, size


def _timer_us(op: Any) -> float:
    c0 = time.thread_time()
    for _ in range(5):
        op.on_timer(0.0)
    return (time.thread_time() - c0) / 5 * 1e6


def _paced_extra(snapshot: Callable[[], Any], pace: float) -> float:
    """What a snapshot costs more after a pause (at a commit in real time, caches have cooled)
    than back to back, microseconds: the median of five against the best of five."""
    spent: dict[float, list[float]] = {0.0: [], pace: []}
    for pause in (0.0, pace):
        for _ in range(5):
            if pause:
                time.sleep(pause)
            c0 = time.thread_time()
            ckpt.pack(snapshot())
            spent[pause].append(time.thread_time() - c0)
    return max(0.0, float(np.median(spent[pace])) - min(spent[0.0])) * 1e6
