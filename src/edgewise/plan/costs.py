"""The CPU cost model: what each stage, the engine and its group commits cost on this machine.

Model. A stage's thread CPU per second of input is linear in rates the flow model gives::

    stage us/s = sum over features f of  coef[f] (us per unit) * rate[f] (units per second)

Every operator pays per ``call`` (a batch handed to it), per input ``record`` and per ``out``put
record; keyed operators per distinct ``key`` in a call; windows per ``group`` (a key and window
touched by a call), per ``fire`` (a call that closes windows; opening the keys' next windows
costs in proportion to the records emitted) and, with percentile aggregates, per value ``held``
until its window closes. The node's CPU adds the engine: per source batch and record (queue,
routing, bookkeeping), per group commit (at most one per ``commit_interval``, 20 ms by default:
the loop's hand-over, every operator's state snapshot, the writer's transaction with the
checkpoint bytes and one encoded chunk per stream), per engine tick, protocol decoding per
reading (`INGEST_US`, not calibrated: the simulator stands in for the protocol) and, because
the engine sleeps between batches, a wake-up cost per call of every stage.

Calibration (the default). `Calibrator.site` runs the site's own operators (same classes and
parameters, fed by the same sensors and signal statistics, in the batches of production, with
the sinks production has) inside the real engine on synthetic data, the sources taking turns in
event-time order as in real time; where a window would need too many batches to close, event
time runs faster so that it closes every thirty batches or more, and the fit separates the
per-call costs from the per-window ones. They run in the engine, together, because an
operator's cost per call depends on what runs between its calls: a threshold costs two to three
times more between window updates and outbox writes than in a tight loop of its own. Every
call's thread CPU (`time.thread_time`, measured after the first calls, with the features read
after the call so they do not warm its caches) goes into a non-negative least-squares fit.
Every so many batches the source pauses first, as real time does: those calls give the wake-up
cost beyond the fit. Snapshots are timed in the same run, and after a pause.
`Calibrator.engine` times the engine itself (no stages; back to back, idle and paced), its
committer and a real outbox with fsync, in a temporary directory. A workload's calibration
takes about a second (the engine's, once per machine, one and a half more) and is cached per
machine (CPU, Python, numpy, Edgewise code) in ``plan-calibration.json``.

Beside a measurement (`--simulate`), `Calibrator.paired` recalibrates in a thread of its own
that takes turns with the measurement on one CPU (`Turns`): a shared machine's speed changes
from one second to the next, and only estimates and measurements taken in alternation see the
same machine.

`STATIC` (``--no-calibrate``): a fixed table measured once on the 2-core development VM, for
when benchmarking at plan time is not wanted; on other machines it can be off by 2x.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline import registry
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.spec import OutboxSettings
from edgewise.plan import flows as F
from edgewise.plan.workload import SiteSpec, StageSpec

CACHE_FILE = "plan-calibration.json"
CACHE_VERSION = 4
START_TS = 1_764_547_200.0  # 2025-12-01T00:00:00Z, a multiple of every common window size
SEED = 42
COMMIT_INTERVAL_S = float(OutboxSettings().commit_interval)
TICK_S = 0.1  # the engine's default tick (on_timer calls)
INGEST_US = {  # protocol decoding per reading, before the engine sees it (not calibrated)
    "mqtt": 4.0, "http": 6.0, "modbus": 12.0, "opcua": 15.0, "file": 1.5, "simulator": 0.3,
}
DEFAULT_FUNCTION_US = 10.0  # per record, for a user function that declares no cost

FEATURES: dict[str, tuple[str, ...]] = {
    "window": ("call", "record", "group", "fire", "out", "held"),
    "fft": ("call", "record", "key", "out"),
    "threshold": ("call", "record", "key", "out"),
    "filter": ("call", "record", "out"),
    "map": ("call", "record", "out"),
}
KEYED = ("call", "record", "key", "out")
CALIBRATED = ("window", "threshold", "fft", "anomaly", "deadband", "downsample", "filter",
              "map", "rate_of_change")

# -- the static table (thread CPU in the engine on the 2-core development VM, microseconds) ----
STATIC: dict[str, dict[str, float]] = {
    "window": {"call": 50.0, "record": 1.0, "group": 1.0, "fire": 20.0, "out": 3.0,
               "held": 0.05},
    "threshold": {"call": 20.0, "record": 0.02, "out": 10.0},
    "fft": {"call": 15.0, "record": 0.2, "key": 3.0, "out": 100.0},
    "anomaly": {"call": 10.0, "record": 0.33},
    "deadband": {"call": 20.0, "record": 0.25},
    "downsample": {"call": 25.0, "record": 0.09},
    "filter": {"call": 7.0, "record": 0.012},
    "map": {"call": 4.0, "record": 0.003},
    "rate_of_change": {"call": 25.0, "record": 0.09},
}
STATIC_SNAPSHOT_US_PER_KEY = 2.0
STATIC_WAKE_US = 100.0


@dataclass(frozen=True)
class EngineCost:
    """Engine costs per unit, microseconds of CPU.

    *Hot* figures are back to back (caches warm). At the real rate the engine sleeps between
    batches and every wake-up runs on cold caches; the ``*_rt`` figures are measured paced, with
    a pause before every batch, commit or tick, and are what the node pays."""

    batch_us: float  # per source batch: queue, routing, bookkeeping (event loop), hot
    record_us: float  # per record of a source batch
    commit_loop_us: float  # per group commit on the event loop: cut, hand-over, acks, hot
    commit_us: float  # per group commit in the writer thread: transaction and fsync, hot
    checkpoint_byte_us: float  # writer, per byte of checkpoint
    chunk_us: float  # writer, per stream chunk stored, hot
    chunk_byte_us: float  # writer, per encoded byte stored
    batch_rt_us: float  # per source batch at the real rate (woken up for it)
    commit_loop_rt_us: float  # per group commit on the event loop at the real rate
    tick_rt_us: float  # per engine tick (every 100 ms) at the real rate
    commit_rt_us: float  # writer, per group commit at the real rate
    chunk_rt_us: float  # writer, per chunk at the real rate
    source: str  # "calibrated" | "static"


STATIC_ENGINE = EngineCost(20.0, 0.03, 100.0, 20.0, 0.0001, 250.0, 0.0001,
                           200.0, 250.0, 150.0, 150.0, 600.0, "static")


@dataclass(frozen=True)
class StageCost:
    """A stage's coefficients and its state cost at one site."""

    operator: str
    coef: dict[str, float]  # us per unit of each feature
    snapshot_us: float  # per group commit: snapshot and pack of its state
    snapshot_bytes: float  # size of that state, packed
    timer_us: float  # per engine tick
    source: str  # "calibrated" | "static" | "declared"
    wake_us: float = 0.0  # extra CPU of a call made after a pause (at the real pace)
    snapshot_rt_us: float = 0.0  # snapshot at a commit in real time (caches cooled)
    calls: int = 0  # calls timed per repetition when calibrated
    compression: float = 1.0  # how much faster event time ran in the calibration

    def per_second(self, rates: dict[str, float]) -> float:
        return sum(self.coef.get(k, 0.0) * v for k, v in rates.items())


@dataclass(frozen=True)
class StreamCost:
    """Encoding one commit's chunk of a stream."""

    encode_us: float  # per chunk of ``records`` records
    records: float
    payload: float  # bytes


# -- features of the flow model ----------------------------------------------------------------

def features_of(op: str) -> tuple[str, ...]:
    return FEATURES.get(op, KEYED)


def _window_shape(cfg: Any) -> tuple[float, float, int]:
    size = float(cfg.size)
    slide = float(cfg.slide or cfg.size)
    return size, slide, max(1, round(size / slide))


def _has_percentiles(cfg: Any) -> bool:
    return any(a.strip().startswith("p") for a in cfg.aggregates)


def config_of(stage: StageSpec) -> Any:
    return registry.resolve("operator", stage.operator or "").Config.model_validate(stage.params)


def feature_rates(stage: StageSpec, cfg: Any, fin: F.Flow, fout: F.Flow) -> dict[str, float]:
    """Units per second of every feature of the stage's operator, from the flow model."""
    op = stage.operator or ""
    calls = fin.calls
    batch = max(1.0, fin.batch)
    rates = {"call": calls, "record": fin.rate, "out": fout.rate,
             "key": calls * min(float(fin.keys), batch)}
    if op == "window":
        _size, slide, m = _window_shape(cfg)
        keys = max(1, fout.keys)
        per_call_keys = min(float(keys), batch)
        span = 1.0 / calls if calls else 0.0  # event time one call covers
        per_key = min(batch / per_call_keys * m, m + span / slide)
        rates.update(group=calls * per_call_keys * per_key, fire=min(calls, 1.0 / slide),
                     held=fin.rate * m if _has_percentiles(cfg) else 0.0)
    return {k: v for k, v in rates.items() if k in features_of(op)}


def stage_cpu_us(stage: StageSpec, cost: StageCost, fin: F.Flow, fout: F.Flow) -> float:
    """Thread-CPU microseconds per second of a stage at one site, from its cost model."""
    if cost.source == "declared":
        return cost.coef["record"] * fin.rate
    return cost.per_second(feature_rates(stage, config_of(stage), fin, fout))


def _declared(stage: StageSpec) -> StageCost | None:
    if stage.function is None and stage.cpu_us_per_record is None:
        return None
    per = stage.cpu_us_per_record if stage.cpu_us_per_record is not None else DEFAULT_FUNCTION_US
    return StageCost(stage.operator or "function", {"record": per}, 0.0, 0.0, 0.0, "declared")


def static_stage(stage: StageSpec, fin: F.Flow, fout: F.Flow) -> StageCost:
    declared = _declared(stage)
    if declared is not None:
        return declared
    op = stage.operator or ""
    coef = dict(STATIC.get(op, {"call": 20.0, "record": 0.2}))
    entries = 0
    if op == "window":
        entries = fout.keys
    elif op not in ("threshold", "filter", "map"):
        entries = fin.keys
    snap = STATIC_SNAPSHOT_US_PER_KEY * entries
    return StageCost(op, coef, snap, 64.0 * entries, 2.0, "static", STATIC_WAKE_US, 2 * snap)


# -- the machine ----------------------------------------------------------------------------------

_CODE = ("pipeline/operators", "pipeline/engine.py", "pipeline/commit.py", "pipeline/batch.py",
         "pipeline/checkpoint.py", "edge/outbox.py", "sync/codec.py", "plan/costs.py",
         "plan/source.py", "plan/flows.py", "sim/signals.py")


def machine_fingerprint() -> dict[str, str]:
    """What calibrated costs depend on: CPU, interpreter, numpy and the Edgewise code."""
    import edgewise

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    root = Path(edgewise.__file__).parent
    h = hashlib.sha256()
    for rel in _CODE:
        p = root / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            with contextlib.suppress(OSError):
                h.update(f.read_bytes())
    return {"cpu": model, "cores": str(os.cpu_count()), "python": sys.version.split()[0],
            "numpy": np.__version__, "edgewise": edgewise.__version__,
            "code": h.hexdigest()[:16]}


# -- fitting ------------------------------------------------------------------------------------

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


# -- the two sources of costs -------------------------------------------------------------------

class Costs:
    """Where the planner gets its CPU coefficients: this one is the static table."""

    calibrated = False

    def __init__(self) -> None:
        self.seconds = 0.0  # time spent calibrating in this run
        self.cached = 0  # results taken from the cache

    def engine(self) -> EngineCost:
        return STATIC_ENGINE

    def site(self, site: SiteSpec, stages: list[StageSpec],
             flows: dict[str, F.Flow]) -> dict[str, StageCost]:
        return {st.id: static_stage(st, F.merge([flows[r] for r in st.inputs]), flows[st.id])
                for st in stages}

    def stream(self, flow: F.Flow, records: float) -> StreamCost:
        payload = F.encoded_bytes(flow, 1.0).payload_per_chunk * records / max(flow.rate, 1e-9)
        return StreamCost(20.0 + 0.3 * records, records, payload)

    def paired(self, site: SiteSpec, stages: list[StageSpec],
               flows: dict[str, F.Flow]) -> Paired:
        """Nothing to calibrate beside a measurement: `Paired.step` does nothing."""
        return Paired(self, site, stages, flows)

    def describe(self) -> str:
        return ("CPU coefficients from the planner's static table (thread CPU measured once on "
                "a 2-core development VM; `--no-calibrate`)")

    def save(self) -> None:
        return None


class Calibrator(Costs):
    """Costs calibrated on this machine by micro-benchmarks, cached in ``cache_dir``."""

    calibrated = True

    def __init__(self, cache_dir: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.cache_dir = cache_dir
        self.say = progress or (lambda _m: None)
        self.machine = machine_fingerprint()
        self._entries: dict[str, Any] = {}
        self._dirty = False
        if cache_dir is not None:
            self._load()

    # -- cache ------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return self.cache_dir / CACHE_FILE if self.cache_dir is not None else None

    def _load(self) -> None:
        path = self.path
        if path is None or not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # a damaged cache is recalibrated, never trusted
        if data.get("version") == CACHE_VERSION and data.get("machine") == self.machine:
            self._entries = data.get("entries", {})

    def save(self) -> None:
        path = self.path
        if path is None or not self._dirty:
            return
        data = {"version": CACHE_VERSION, "machine": self.machine, "entries": self._entries}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".plan-calibration-", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return  # a cache we cannot write only costs time on the next run
        self._dirty = False

    def _cached(self, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        entry = self._entries.get(key)
        if entry is not None:
            self.cached += 1
            return entry
        t0 = time.perf_counter()
        entry = make()
        entry["calibrated_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.seconds += time.perf_counter() - t0
        self._entries[key] = entry
        self._dirty = True
        return entry

    def store(self, key: str, entry: dict[str, Any]) -> None:
        self._entries[key] = entry
        self._dirty = True

    def describe(self) -> str:
        where = f"cached in {self.path}" if self.cache_dir is not None else "not cached"
        return (f"CPU coefficients calibrated on this machine ({self.machine['cpu']}, "
                f"{self.machine['cores']} cores): the site's operators run in the engine on "
                "synthetic batches shaped like their input (thread CPU of every call, a linear "
                "model per operator fitted by non-negative least squares), the engine and "
                f"outbox alone, back to back and paced; {self.seconds:.1f} s of calibration in "
                f"this run, {self.cached} result(s) reused ({where})")

    # -- parts -------------------------------------------------------------------------------
    def engine(self) -> EngineCost:
        entry = self._cached("engine", _calibrate_engine)
        return EngineCost(**{k: v for k, v in entry.items() if k in EngineCost.__annotations__})

    def stream(self, flow: F.Flow, records: float) -> StreamCost:
        n = max(1, round(records))
        key = "stream:" + _digest(repr((flow.fields, flow.keys, flow.windowed,
                                        flow.key_prefixes, n)))

        def make() -> dict[str, Any]:
            from edgewise.sync import codec

            m = min(n, 50_000)
            cols = F.synth_chunk(flow, m, START_TS, max(1.0, m / max(flow.rate, 1e-9)),
                                 np.random.default_rng(3))
            best = math.inf
            size = 0
            for _ in range(5):
                t0 = time.thread_time()
                size = len(codec.encode(cols))
                best = min(best, time.thread_time() - t0)
            return {"encode_us": best * 1e6 * n / m, "payload": size * n / m}

        entry = self._cached(key, make)
        return StreamCost(entry["encode_us"], float(n), entry["payload"])

    def site(self, site: SiteSpec, stages: list[StageSpec],
             flows: dict[str, F.Flow]) -> dict[str, StageCost]:
        runnable = _runnable(site, stages)
        if not runnable:
            return Costs.site(self, site, stages, flows)

        def make() -> dict[str, Any]:
            self.say(f"calibrating the CPU model on this machine: site {site.name}")
            return _calibrate_site(site, runnable, flows)

        entry = self._cached(_site_key(site, runnable), make)
        return _site_costs(Costs.site(self, site, stages, flows), entry)

    def paired(self, site: SiteSpec, stages: list[StageSpec],
               flows: dict[str, F.Flow]) -> Paired:
        """A fresh calibration whose repetitions the caller interleaves with a measurement
        (`Paired.step`), so both see the machine in the same state: on a shared machine, speed
        changes from one minute to the next."""
        return Paired(self, site, stages, flows)


class Paired:
    """A site's calibration run in a thread of its own, taking turns with the caller's
    measurement (`Turns`): `start`, then `turn` whenever the caller pauses, then `finish`."""

    def __init__(self, owner: Costs, site: SiteSpec, stages: list[StageSpec],
                 flows: dict[str, F.Flow]) -> None:
        self.owner = owner
        self.site, self.stages, self.flows = site, stages, flows
        self.runnable = _runnable(site, stages) if owner.calibrated else []
        # windows close 3.5 times within a third of the turns (the static table may be off);
        # three times that much data, so that the measurement's end, not the data, stops it
        self.cal = SiteCalibration(site, self.runnable, flows, PAIRED_CPU_S / 3, 3.0) \
            if self.runnable else None
        self.turns: Turns | None = None
        self.last_turn: float | None = None
        self.failed: list[BaseException] = []
        self.worker: threading.Thread | None = None

    def start(self, turns: int) -> None:
        """Start the calibration thread; it will get ``turns`` turns of equal CPU."""
        if self.cal is None:
            return
        self.turns = Turns(PAIRED_CPU_S / max(1, turns))
        cal, tr = self.cal, self.turns

        def body() -> None:
            try:
                tr.wait_turn()
                cal.run(tr)
            except BaseException as exc:  # re-raised in the caller's thread
                self.failed.append(exc)
            finally:
                tr.done()

        self.worker = threading.Thread(target=body, name="edgewise-calibration", daemon=True)
        self.worker.start()

    def turn(self) -> None:
        """Give the calibration a turn as long (in thread CPU) as the caller's last stretch:
        each side then starts as often on caches the other has just filled."""
        if self.turns is None:
            return
        now = time.thread_time()
        if self.last_turn is not None:
            self.turns.slice_s = min(MAX_SLICE_S, max(MIN_SLICE_S, now - self.last_turn))
        w0 = time.perf_counter()
        self.turns.give()
        self.owner.seconds += time.perf_counter() - w0  # the calibration's share of the time
        self.last_turn = time.thread_time()

    def finish(self) -> dict[str, StageCost]:
        base = Costs.site(self.owner, self.site, self.stages, self.flows)
        if self.cal is None or self.turns is None or self.worker is None:
            return self.owner.site(self.site, self.stages, self.flows)
        w0 = time.perf_counter()
        self.turns.stop()
        self.worker.join()
        if self.failed:
            raise self.failed[0]
        entry = self.cal.result()
        self.owner.seconds += time.perf_counter() - w0
        entry["calibrated_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        entry["paired"] = True
        if isinstance(self.owner, Calibrator):
            self.owner.store(_site_key(self.site, self.runnable), entry)
        return _site_costs(base, entry)


def _site_key(site: SiteSpec, runnable: list[StageSpec]) -> str:
    return "site:" + _digest(repr((site.name, [s.model_dump_json() for s in site.sources],
                                   [st.model_dump_json() for st in runnable])))


def _site_costs(base: dict[str, StageCost], entry: dict[str, Any]) -> dict[str, StageCost]:
    out = dict(base)
    for sid, e in entry["stages"].items():
        out[sid] = StageCost(e["operator"], e["coef"], e["snapshot_us"], e["snapshot_bytes"],
                             e["timer_us"], "calibrated", e["wake_us"], e["snapshot_rt_us"],
                             e["calls"], entry["compression"])
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _runnable(site: SiteSpec, stages: list[StageSpec]) -> list[StageSpec]:
    """Stages the calibration can run: built-in operators whose inputs it can produce."""
    have = {s.id for s in site.sources}
    out = []
    for st in stages:
        if st.function is None and st.cpu_us_per_record is None and \
                st.operator in CALIBRATED and all(r in have for r in st.inputs):
            out.append(st)
            have.add(st.id)
    return out


# -- site calibration ---------------------------------------------------------------------------

WARM_CALLS = 2
BUDGET_S = 0.4  # thread CPU of a site's calibration run (by the static table)
PAIRED_CPU_S = 1.5  # thread CPU of a calibration taking turns with a measurement
MIN_SLICE_S, MAX_SLICE_S = 0.005, 0.2  # bounds of one turn of the calibration
PACE_S = 0.01  # a pause, for the engine's own parts measured after one
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
    if result is None:
        return 0
    if isinstance(result, Batch):
        return result.n
    return sum(b.n for b in result.values() if b is not None)


def _site_doc(site: SiteSpec, stages: list[StageSpec], seconds: float,
              compression: float) -> dict[str, Any]:
    """The site's stages fed by simulator sources, back to back, event time ``compression``
    times faster, ``seconds`` of data (at the sensors' real rate)."""
    used = {r for st in stages for r in st.inputs}
    sources = []
    for src in site.sources:
        if src.id not in used:
            continue
        groups = [{"prefix": prefix, "count": count, "base_low": sig.low,
                   "base_high": sig.high, "drift": sig.drift, "period_s": sig.period,
                   "noise": sig.noise, "spike_prob": sig.spike_prob,
                   "spike_value": sig.spike_value, "decimals": src.decimals}
                  for prefix, count, sig in F.source_groups(src, site.name)]
        rate = src.count * src.rate_hz
        sources.append({
            "id": src.id, "type": "simulator", "profile": "custom", "seed": SEED,
            # fewer ticks per event second: the same batches cover more event time
            "rate_hz": src.rate_hz / compression, "groups": groups, "realtime": False,
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
                                 **st.params} for st in stages],
                     "sinks": sinks, "outbox": {"sync": "normal", "max_bytes": "1GiB"}}}


def _run_shape(site: SiteSpec, stages: list[StageSpec], flows: dict[str, F.Flow],
               budget: float = 0.0) -> tuple[float, float]:
    """(seconds of data, compression) of a calibration run: about ``budget`` of CPU by the
    static table, and event time fast enough for the longest window fed by sensors to close
    3.5 times, but never so fast that one closes in fewer than MIN_PERIOD_CALLS batches; at
    least two FFT blocks."""
    per_s = 0.0
    longest = 0.0
    limit = math.inf
    fft_s = 0.0
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
                 budget: float = BUDGET_S, extra: float = 1.0) -> None:
        from edgewise.pipeline.spec import parse_pipeline

        self.t_start = time.perf_counter()
        self.site = site
        self.stages = stages
        self.seconds, self.compression = _run_shape(site, stages, flows, budget)
        doc = _site_doc(site, stages, self.seconds * extra, self.compression)
        self.spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False),
                                   f"<{site.name} calibration>")
        self.cfgs = {st.id: config_of(st) for st in stages}
        self.feats = {st.id: features_of(st.operator or "") for st in stages}
        self.rows: dict[str, list[list[float]]] = {st.id: [] for st in stages}
        self.costs: dict[str, list[float]] = {st.id: [] for st in stages}
        self.paced: dict[str, list[bool]] = {st.id: [] for st in stages}
        self.snaps: dict[str, list[tuple[float, int, int]]] = {st.id: [] for st in stages}
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
        from edgewise.pipeline.engine import Engine
        from edgewise.plan.source import install

        with tempfile.TemporaryDirectory(prefix="edgewise-calibration-") as tmp:
            engine = Engine(self.spec, Path(tmp))
            paused: set[int] = set()
            for sid, src in install(engine).items():
                src.pause_every, src.pause_s, src.paused = self.pause_every[sid], self.pace, \
                    paused
            now = [False]  # routing a batch that came after a pause
            for st in self.stages:
                _instrument(engine.stages[st.id], st, self.cfgs[st.id], self.feats[st.id],
                            self.rows[st.id], self.costs[st.id], self.snaps[st.id],
                            self.paced[st.id], now)
            route = engine._route

            def routed(node: str, port: str, batch: Batch) -> None:
                if node not in engine.sources:
                    route(node, port, batch)
                    return
                now[0] = id(batch) in paused
                paused.discard(id(batch))
                route(node, port, batch)
                now[0] = False
                if turns is not None:
                    turns.maybe_yield()
                    if turns.stopping:
                        engine.stop()

            engine._route = routed  # type: ignore[method-assign]
            asyncio.run(engine.run())
        self.last = engine.stages

    def result(self) -> dict[str, Any]:
        """The fitted coefficients and state costs (a cache entry)."""
        out: dict[str, Any] = {"compression": self.compression,
                               "seconds_of_data": self.seconds, "stages": {}}
        for st in self.stages:
            sid = st.id
            feats = self.feats[sid]
            n = min(len(self.costs[sid]), len(self.rows[sid]), len(self.paced[sid]))
            coef = np.zeros(len(feats))
            wake = 0.0
            if n > WARM_CALLS + 1:
                x = np.array(self.rows[sid][WARM_CALLS:n])
                y = np.array(self.costs[sid][WARM_CALLS:n]) * 1e6
                paced = np.array(self.paced[sid][WARM_CALLS:n], dtype=bool)
                coef = nnls(x[~paced], y[~paced])
                if paced.any():  # what a call after a pause costs beyond the model
                    wake = max(0.0, float(np.median(y[paced] - x[paced] @ coef)))
            snap_us, snap_bytes = _snapshot_cost(self.snaps[sid], self.cfgs[sid], st,
                                                 self.compression)
            op = self.last.get(sid)
            out["stages"][sid] = {
                "operator": st.operator, "coef": dict(zip(feats, coef.tolist(), strict=True)),
                "snapshot_us": snap_us, "snapshot_bytes": snap_bytes,
                "snapshot_rt_us": snap_us + (_paced_extra(op.snapshot, self.pace)
                                             if op else 0.0),
                "timer_us": _timer_us(op) if op is not None else 0.0,
                "wake_us": wake, "calls": n, "paced_calls": int(np.sum(self.paced[sid]))}
        out["seconds"] = time.perf_counter() - self.t_start
        return out


def _calibrate_site(site: SiteSpec, stages: list[StageSpec],
                    flows: dict[str, F.Flow]) -> dict[str, Any]:
    cal = SiteCalibration(site, stages, flows)
    cal.run()
    return cal.result()


def _instrument(op: Any, st: StageSpec, cfg: Any, feats: tuple[str, ...],
                rows: list[list[float]], costs: list[float],
                snaps: list[tuple[float, int, int]], paced: list[bool],
                now: list[bool]) -> None:
    """Wrap a stage's process (features, thread CPU per call) and snapshot (CPU, bytes)."""
    tracker = _WindowTracker(cfg) if st.operator == "window" else None
    key_by = list(getattr(cfg, "key_by", []) or [])
    process, snapshot = op.process, op.snapshot

    def timed_process(batch: Batch) -> Any:
        c0 = time.thread_time()
        result = process(batch)
        costs.append(time.thread_time() - c0)
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
        c0 = time.thread_time()
        state = snapshot()
        size = len(ckpt.pack(state))
        spent = time.thread_time() - c0
        snaps.append((spent, size, tracker.values_open() if tracker is not None else 0))
        return state

    op.process = timed_process
    op.snapshot = timed_snapshot


def _snapshot_cost(snaps: list[tuple[float, int, int]], cfg: Any, st: StageSpec,
                   compression: float) -> tuple[float, float]:
    """Median CPU and mean size of the stage's snapshots; for percentile windows run faster,
    scaled to the values a window of real length holds (9 bytes each, packed)."""
    if not snaps:
        return 0.0, 0.0
    cost = float(np.median([s[0] for s in snaps])) * 1e6
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


# -- engine calibration ---------------------------------------------------------------------------

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
    from edgewise.pipeline.engine import Engine
    from edgewise.pipeline.spec import parse_pipeline
    from edgewise.plan.source import install

    doc = _engine_doc(batch, batches, interval, rate is not None, rate or 10.0)
    spec = parse_pipeline(yaml.safe_dump(doc, sort_keys=False), "<calibration>")
    engine = Engine(spec, work)
    srcs = install(engine)
    marks: list[tuple[float, float, int, int, float]] = []

    def mark() -> None:
        committer = engine._committer
        marks.append((time.thread_time(), sum(s.generation_s for s in srcs.values()),
                      engine.counters.batches_in, committer.commits if committer else 0,
                      time.perf_counter()))

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
    time, where the mean counts (SQLite folds its write-ahead log into the database every so
    many pages: big checkpoints make that a real cost)."""
    from edgewise.edge.outbox import Outbox, PendingChunk
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
            for _ in range(n):
                blob = os.urandom(size)
                if sleep:
                    time.sleep(sleep)
                c0 = time.thread_time()
                ob.commit(chunks, None, {"engine": blob})
                out.append(time.thread_time() - c0)
            return (min(out) if not sleep else float(np.mean(out))) * 1e6

        hot_small = timed([], small, 0.0, 12)
        hot_chunk = timed([PendingChunk("s", chunk, 200)], small, 0.0, 12)
        rt_small = timed([], small, pause, 16)
        rt_big = timed([], big, pause, 16)
        rt_chunk = timed([PendingChunk("s", chunk, 200)], small, pause, 16)
    per_byte = max(0.0, (rt_big - rt_small) / (big - small))
    return {"commit_us": hot_small, "checkpoint_byte_us": per_byte,
            "chunk_us": max(0.0, hot_chunk - hot_small - t_encode),
            "chunk_byte_us": per_byte, "commit_rt_us": max(0.0, rt_small - per_byte * small),
            "chunk_rt_us": max(0.0, rt_chunk - rt_small - t_encode - per_byte * enc)}


def _committer_costs(work: Path, pause: float) -> tuple[float, float]:
    """Event-loop CPU of one group commit (cut, hand-over to the writer thread, completion and
    acknowledgements), back-to-back and after a pause."""
    from edgewise.edge.outbox import Outbox
    from edgewise.pipeline.commit import Committer

    batch = Batch({"sensor": np.array([f"c/{i:03d}" for i in range(16)], dtype=object),
                   "ts": START_TS + np.arange(16.0), "value": np.arange(16.0)}, 16)

    async def main(ob: Outbox) -> tuple[float, float]:
        committer = Committer(ob, lambda _p: {"engine": b"x" * 64}, lambda _p, _r: None)
        try:
            hot: list[float] = []
            paced: list[float] = []
            for i in range(60):
                if i >= 40:
                    await asyncio.sleep(pause)
                committer.add("s", batch)
                committer.position("s", i)
                c0 = time.thread_time()
                committer.kick()
                await committer.wait()
                (hot if i < 40 else paced).append(time.thread_time() - c0)
            return float(np.min(hot[5:])) * 1e6, float(np.median(paced)) * 1e6
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
        commit_loop_us, commit_loop_rt = _committer_costs(work, PACE_S)
        # at the real pace: an idle engine (ticks only), then 100 batches a second
        cpu, _b, _k, wall = _engine_run(work / "idle", 16, 1, 30.0, 1e-3, 0.3)
        tick_rt = cpu * 1e6 / (wall / TICK_S)
        cpu, b, _k, wall = _engine_run(work / "paced", 16, 30, 30.0, 100.0)
        batch_rt = max(batch_us, (cpu * 1e6 - tick_rt * wall / TICK_S) / max(b, 1))
        writer = _writer_costs(work, PACE_S)
    return {"batch_us": batch_us, "record_us": record_us, "commit_loop_us": commit_loop_us,
            "batch_rt_us": batch_rt, "commit_loop_rt_us": max(commit_loop_us, commit_loop_rt),
            "tick_rt_us": tick_rt, **writer, "source": "calibrated",
            "seconds": time.perf_counter() - t_start}


__all__ = ["INGEST_US", "STATIC", "Calibrator", "Costs", "EngineCost", "StageCost",
           "StreamCost", "feature_rates", "machine_fingerprint", "nnls", "stage_cpu_us"]
