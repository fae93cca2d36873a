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
reading and per batch (`ingest_us`: MQTT calibrated with the real source against a minimal
broker, `edgewise.plan.ingest_calibration`; Modbus and OPC UA with the real sources against a
device server in a child process, `edgewise.plan.device_calibration`; other protocols from
`INGEST_US`) and, because
the engine sleeps between batches, a wake-up cost per call of every stage; and the garbage
collector's full collections (`edgewise.plan.gc_cost`). A user function
costs its declared microseconds per record plus the calibrated hand-over per call.

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

Layout: `edgewise.plan.cost_model` (cost records, static table, feature rates),
`edgewise.plan.site_calibration` (`SiteCalibration`, `Turns`, `nnls`),
`edgewise.plan.engine_calibration` (the engine's own costs) and `edgewise.plan.machine`
(`machine_fingerprint`); this module keeps the two sources of costs (`Costs`, `Calibrator`
with its cache, `Paired`).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgewise.common.files import write_atomic
from edgewise.errors import StorageError
from edgewise.plan import flows as F
from edgewise.plan.calibration_scope import passengers as _passengers
from edgewise.plan.calibration_scope import runnable as _runnable
from edgewise.plan.cost_model import (
    INGEST_US,
    INGEST_WAKE_US,
    PACE_S,
    PLUGIN_CALL_US,
    PLUGIN_WAKE_US,
    START_TS,
    STATIC_ENGINE,
    EngineCost,
    StageCost,
    StreamCost,
    static_stage,
)
from edgewise.plan.device_calibration import calibrate_modbus, calibrate_opcua
from edgewise.plan.encoding import encoded_bytes, synth_chunk
from edgewise.plan.engine_calibration import (
    _calibrate_engine,
    calibrate_site_engine,
    merge_site_engine,
)
from edgewise.plan.gc_cost import full_collection
from edgewise.plan.ingest_calibration import calibrate_mqtt, calibrate_plugin_call
from edgewise.plan.machine import machine_fingerprint
from edgewise.plan.site_calibration import SiteCalibration, Turns, _calibrate_site
from edgewise.plan.workload import SiteSpec, StageSpec

CACHE_FILE = "plan-calibration.json"
CACHE_VERSION = 11
PAIRED_CPU_S = 1.5  # thread CPU of a calibration taking turns with a measurement
MIN_SLICE_S, MAX_SLICE_S = 0.005, 0.2  # bounds of one turn of the calibration
T = TypeVar("T")
SITE_ENGINE_S = 3.0  # seconds the engine runs with a site's sources at the real pace


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
        out = {st.id: static_stage(st, F.merge([flows[r] for r in st.inputs]), flows[st.id])
               for st in stages}
        for st in stages:
            if st.function is not None:
                c = out[st.id]
                call = st.cpu_us_per_call + self.plugin_call_us()
                out[st.id] = replace(c, coef={**c.coef, "call": call},
                                     wake_us=self.plugin_wake_us())
        return out

    def site_engine(self, site: SiteSpec, checkpoint_bytes: float = 0.0
                    ) -> dict[str, float] | None:
        """The engine with the site's sources alone at the real pace (cores, commits per
        second), each commit writing ``checkpoint_bytes`` of operator state, calibrated; None:
        the static table models it part by part."""
        return None

    def site_engine_around(self, site: SiteSpec, span: float, checkpoint_bytes: float,
                           between: Callable[[int], T], rounds: int = 1
                           ) -> tuple[dict[str, Any] | None, list[T]]:
        """`site_engine` measured again beside ``rounds`` calls of ``between`` (the
        measurement it stands beside; called with the round's index), in runs of half
        ``span`` seconds: one before the first call, one after each (E M E M E ... M E), and
        what each call returned (`merge_site_engine`)."""
        return None, [between(k) for k in range(rounds)]

    def ingest_us(self, protocol: str) -> tuple[float, float]:
        """(CPU us per reading, per batch handed over) of decoding a protocol's messages."""
        return INGEST_US.get(protocol, 10.0), INGEST_WAKE_US.get(protocol, 0.0)

    def gc_full(self, site: SiteSpec,
                stages: list[StageSpec]) -> tuple[float, float, float | None]:
        """CPU us of one full collection of the garbage collector with the site's operator
        state alive, the objects it leaves alive, and the objects a middle collection promoted
        on average in the site's calibration, None where it saw none (`edgewise.plan.gc_cost`);
        the static table has no collector part."""
        return 0.0, 0.0, None

    def plugin_call_us(self) -> float:
        """Event-loop CPU us of one call of a user function (the hand-over to its thread)."""
        return PLUGIN_CALL_US

    def plugin_wake_us(self) -> float:
        """What a user function's call costs on top at the real pace (threads woken up)."""
        return PLUGIN_WAKE_US

    def stream(self, flow: F.Flow, records: float) -> StreamCost:
        payload = encoded_bytes(flow, 1.0).payload_per_chunk * records / max(flow.rate, 1e-9)
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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(data).encode())
        except (OSError, StorageError):
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

    def site_engine(self, site: SiteSpec, checkpoint_bytes: float = 0.0
                    ) -> dict[str, float] | None:
        def make() -> dict[str, Any]:
            self.say(f"calibrating the engine at the real pace: site {site.name}")
            return calibrate_site_engine(site, SITE_ENGINE_S, checkpoint_bytes)

        return self._cached(_site_engine_key(site, checkpoint_bytes), make)

    def site_engine_around(self, site: SiteSpec, span: float, checkpoint_bytes: float,
                           between: Callable[[int], T], rounds: int = 1
                           ) -> tuple[dict[str, Any] | None, list[T]]:
        # in halves around every measurement, so that the two see the machine alike: a
        # shared machine's speed drifts from one minute to the next (`merge_site_engine`)
        def half() -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                return calibrate_site_engine(site, span / 2, checkpoint_bytes)
            finally:
                self.seconds += time.perf_counter() - t0

        halves = [half()]
        results: list[T] = []
        for k in range(max(1, rounds)):
            results.append(between(k))
            halves.append(half())
        entry = merge_site_engine(halves)
        entry["calibrated_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.store(_site_engine_key(site, checkpoint_bytes), entry)
        return entry, results

    def ingest_us(self, protocol: str) -> tuple[float, float]:
        if protocol == "mqtt":
            entry = self._cached("ingest:mqtt", calibrate_mqtt)
            return entry["us_per_message"], entry["us_per_wake"]
        device = {"modbus": calibrate_modbus, "opcua": calibrate_opcua}.get(protocol)
        if device is None or not _importable(protocol):
            return Costs.ingest_us(self, protocol)

        def make() -> dict[str, Any]:
            self.say(f"calibrating {protocol} decoding on this machine")
            assert device is not None
            return device()

        try:
            entry = self._cached(f"ingest:{protocol}", make)
        except (RuntimeError, OSError) as exc:  # the device server did not start: not cached
            self.say(f"{protocol} decoding not calibrated ({exc}); the static table is used")
            return Costs.ingest_us(self, protocol)
        return entry["us_per_reading"], entry["us_per_batch"]

    def gc_full(self, site: SiteSpec,
                stages: list[StageSpec]) -> tuple[float, float, float | None]:
        entry = self._entries.get(_site_key(site, _runnable(site, stages) + _passengers(
            site, stages, _runnable(site, stages))))
        if entry is None or "gc_full_us" not in entry:
            # no operator calibrated at this site: the process as it is (libraries, no state)
            entry = self._cached("gc-full", lambda: dict(zip(
                ("gc_full_us", "gc_heap"), full_collection(PACE_S), strict=True)))
        per_middle = entry.get("gc_promoted_per_middle")
        return float(entry["gc_full_us"]), float(entry["gc_heap"]), per_middle

    def plugin_call_us(self) -> float:
        return self._cached("plugin-call", calibrate_plugin_call)["call_us"]

    def plugin_wake_us(self) -> float:
        return self._cached("plugin-call", calibrate_plugin_call)["wake_us"]

    def stream(self, flow: F.Flow, records: float) -> StreamCost:
        n = max(1, round(records))
        key = "stream:" + _digest(repr((flow.fields, flow.keys, flow.windowed,
                                        flow.key_prefixes, n)))

        def make() -> dict[str, Any]:
            from edgewise.sync import codec

            m = min(n, 50_000)
            cols = synth_chunk(flow, m, START_TS, max(1.0, m / max(flow.rate, 1e-9)),
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
        passengers = _passengers(site, stages, runnable)
        if not runnable and not passengers:
            return Costs.site(self, site, stages, flows)

        def make() -> dict[str, Any]:
            self.say(f"calibrating the CPU model on this machine: site {site.name}")
            return _calibrate_site(site, runnable, flows, passengers)

        entry = self._cached(_site_key(site, runnable + passengers), make)
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
        self.passengers = _passengers(site, stages, self.runnable) if owner.calibrated else []
        # windows close 3.5 times within a third of the turns (the static table may be off);
        # three times that much data, so that the measurement's end, not the data, stops it
        self.cal = SiteCalibration(site, self.runnable, flows, PAIRED_CPU_S / 3, 3.0,
                                   self.passengers) if self.runnable or self.passengers else None
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
            self.owner.store(_site_key(self.site, self.runnable + self.passengers), entry)
        return _site_costs(base, entry)


def _importable(protocol: str) -> bool:
    """Whether the client library of a device protocol is installed (the `industrial` extra)."""
    import importlib.util

    return importlib.util.find_spec({"modbus": "pymodbus", "opcua": "asyncua"}[protocol]) \
        is not None


def _site_engine_key(site: SiteSpec, checkpoint_bytes: float = 0.0) -> str:
    return "site-engine:" + _digest(repr(([s.model_dump_json() for s in site.sources],
                                          round(checkpoint_bytes))))


def _site_key(site: SiteSpec, runnable: list[StageSpec]) -> str:
    return "site:" + _digest(repr((site.name, [s.model_dump_json() for s in site.sources],
                                   [st.model_dump_json() for st in runnable])))


def _site_costs(base: dict[str, StageCost], entry: dict[str, Any]) -> dict[str, StageCost]:
    out = dict(base)
    for sid, e in entry.get("functions", {}).items():  # user functions, run among the others
        out[sid] = StageCost("function", {"call": e["call"], "record": e["record"]}, 0.0, 0.0,
                             0.0, "calibrated", base[sid].wake_us, calls=e["calls"])
    for sid, e in entry["stages"].items():
        out[sid] = StageCost(e["operator"], e["coef"], e["snapshot_us"], e["snapshot_bytes"],
                             e["timer_us"], "calibrated", e["wake_us"], e["snapshot_rt_us"],
                             e["calls"], entry["compression"], e["snapshot_gcs"],
                             e["gc_coef"], e["snapshot_woken_us"])
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


__all__ = ["Calibrator", "Costs", "Paired"]
