"""The CPU cost model's pure parts: cost records, the static table, features and their rates.

`StageCost`, `EngineCost` and `StreamCost` hold coefficients (microseconds per unit);
`feature_rates` turns the flow model's rates into units per second of each feature of an
operator and `stage_cpu_us` prices them; `STATIC` / `static_stage` / `STATIC_ENGINE` are the
fixed table used with ``--no-calibrate``. See `edgewise.plan.costs` for the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgewise.pipeline import registry
from edgewise.pipeline.spec import OutboxSettings
from edgewise.plan import flows as F
from edgewise.plan.workload import StageSpec

START_TS = 1_764_547_200.0  # 2025-12-01T00:00:00Z, a multiple of every common window size
SEED = 42
COMMIT_INTERVAL_S = float(OutboxSettings().commit_interval)
TICK_S = 0.1  # the engine's default tick (on_timer calls)
PACE_S = 0.01  # the engine calibration's pause, for parts measured after one
SLOW_PACE_S = 0.15  # its long pause (a few commits a second), for the writer's commit
INGEST_US = {  # protocol decoding per reading, before the engine sees it (static table; MQTT,
    # Modbus and OPC UA are calibrated per machine, `edgewise.plan.ingest_calibration` and
    # `edgewise.plan.device_calibration`: these are their figures on the development VM)
    "mqtt": 5.5, "http": 6.0, "modbus": 3.0, "opcua": 24.0, "file": 1.5, "simulator": 0.3,
}
INGEST_WAKE_US = {  # per batch the source hands over (a wake-up, a poll or a publish), static
    "mqtt": 26.0, "modbus": 470.0, "opcua": 660.0}
PLUGIN_CALL_US = 11.0  # event-loop CPU per call of a user function (hand-over), static
PLUGIN_WAKE_US = 120.0  # on top per call at the real pace (both threads woken up), static
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
    # a commit cut right after a batch (the loop is awake and warm: the cut is hot), whose
    # completion comes after the writer's fsync (the loop wakes up for it)
    commit_cut_us: float = 40.0  # the cut on the event loop, hot
    commit_done_rt_us: float = 150.0  # the completion on the event loop, woken up for it
    commit_slow_rt_us: float = 300.0  # writer, per group commit after SLOW_PACE_S asleep

    def writer_commit_us(self, commits_per_s: float) -> float:
        """The writer's CPU per group commit at this many commits a second: between its cost
        after a short pause (PACE_S) and after a long one (SLOW_PACE_S), by the log of the gap
        (a writer that sleeps longer wakes up on colder caches)."""
        gap = 1.0 / max(commits_per_s, 1e-9)
        share = (math.log(gap) - math.log(PACE_S)) / (math.log(SLOW_PACE_S) - math.log(PACE_S))
        share = min(1.0, max(0.0, share))
        return self.commit_rt_us + share * max(0.0, self.commit_slow_rt_us - self.commit_rt_us)


STATIC_ENGINE = EngineCost(20.0, 0.03, 100.0, 20.0, 0.0001, 250.0, 0.0001,
                           200.0, 250.0, 150.0, 150.0, 600.0, "static", 40.0, 150.0, 300.0)


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
    snapshot_gcs: float = 0.0  # collector runs a snapshot triggers (`edgewise.plan.gc_cost`)
    gc_coef: dict[str, float] = field(default_factory=dict)  # ... its calls, per feature unit
    # snapshot after the engine slept (a group commit at a site whose every batch starts one);
    # 0: not calibrated, `snapshot_us` counts
    snapshot_woken_us: float = 0.0

    def woken_snapshot_us(self) -> float:
        return self.snapshot_woken_us or self.snapshot_us

    def cold_extra_us(self) -> float:
        """What the snapshot costs more after the engine slept than between batches: from the
        snapshots timed after a sleep (a mean of many), else the paced figure."""
        return max(0.0, (self.snapshot_woken_us or self.snapshot_rt_us) - self.snapshot_us)

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
    if cost.source == "declared" or stage.function is not None:
        return cost.coef["record"] * fin.rate + cost.coef.get("call", 0.0) * fin.calls
    return cost.per_second(feature_rates(stage, config_of(stage), fin, fout))


def stage_gcs_per_s(stage: StageSpec, cost: StageCost, fin: F.Flow, fout: F.Flow) -> float:
    """Garbage-collector runs per second that a stage's calls cause (`edgewise.plan.gc_cost`),
    from its calibrated coefficients per feature; 0 where it has none."""
    if not cost.gc_coef or cost.source == "declared" or stage.function is not None:
        return 0.0
    rates = feature_rates(stage, config_of(stage), fin, fout)
    return sum(cost.gc_coef.get(k, 0.0) * v for k, v in rates.items())


def _declared(stage: StageSpec) -> StageCost | None:
    if stage.function is None and stage.cpu_us_per_record is None:
        return None
    per = stage.cpu_us_per_record if stage.cpu_us_per_record is not None else DEFAULT_FUNCTION_US
    coef = {"record": per}
    wake = 0.0
    if stage.function is not None:  # its own cost per call and the hand-over to its thread
        coef["call"] = stage.cpu_us_per_call + PLUGIN_CALL_US
        wake = PLUGIN_WAKE_US
    return StageCost(stage.operator or "function", coef, 0.0, 0.0, 0.0, "declared", wake)


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
