"""The garbage collector's part of node cores: CPython's full collections.

Reference counting frees most objects at once; the cyclic collector runs when tracked objects
(lists, dicts, instances) accumulate: a young collection every ``threshold0`` (700) net
allocations, every ``threshold1 + 1``-th (11th) of them a middle one instead, and every
``threshold2 + 1``-th (11th) of those a *full* one, which traverses every live object of the
process (the libraries' objects and the operators' state: 15-40 ms on the development VM at
the real pace, on cold caches). A group commit's snapshot builds its state as lists (a
ten-minute window of 800 keys: about 2,000 of them), so at 26 commits a second a site triggers
about 80 collections a second and a full one every 1.5 s: 10-30 ms of CPU a second that a
snapshot's median never shows (one snapshot in 40 pays it) and that a 2 s measurement catches
zero, one or two times.

The model: full collections per second = collections per second / ((threshold1 + 1) *
(threshold2 + 1)), but at most the objects promoted per second over a quarter of the heap
(CPython's long-lived rule: a full collection waits until a quarter as many objects as the last
one left alive have been promoted since); collections per second = those the snapshots cause
per group commit (`SiteCalibration`: the mean per snapshot of each stage) x commits + those the
stages' calls cause (fitted per feature, like their CPU) + those of the engine with the site's
sources alone (counted in its calibration run); objects promoted per second = middle
collections per second (collections / (threshold1 + 1)) x the objects a middle collection
promoted on average over the whole site calibration (`GcWatch.promoted_per_middle`; none seen:
the count alone decides); cores = full collections per second x the time of one
(`full_collection`, measured with the site's operator state alive, after a pause, with the heap
it leaves). The promotions are not taken from the calls and snapshots a middle collection
happened to fall in: one in eleven collections is one, so a calibration's timed snapshots
caught one or two of them or none, and with none the rule allowed no full collection at all
(the hospital ward's collector part 0.0001 cores in one run where the others had 0.003-0.006).

Young and middle collections stay inside the costs they interrupt (a snapshot's mean, a stage's
fit); full ones are taken out of every timed call (`GcWatch.full_s`) and counted here only.
"""

from __future__ import annotations

import gc
import threading
import time
from types import TracebackType

import numpy as np

FULL = 2  # the oldest generation
FULL_REPEATS = 5  # timed full collections, after a pause each


def collections_per_full() -> float:
    """Collections (of any generation) per full collection, from the interpreter's thresholds
    (121 with CPython's defaults)."""
    _t0, t1, t2 = gc.get_threshold()
    return float((t1 + 1) * (t2 + 1))


def promoted_per_s(collections_per_s: float, per_middle: float) -> float:
    """Objects promoted to the oldest generation per second: one middle collection every
    ``threshold1 + 1`` collections, each promoting ``per_middle`` objects."""
    return collections_per_s / (gc.get_threshold()[1] + 1) * per_middle


def full_per_s(collections_per_s: float, promoted_per_s: float, heap: float) -> float:
    """Full collections per second: one every `collections_per_full` collections, but not
    before a quarter as many objects as the last one left alive (``heap``) have been promoted
    to the oldest generation since (CPython's long-lived rule; ``promoted_per_s``: objects
    that survive middle collections). With a heap of 95,000 objects (the planner's process
    with matplotlib loaded) and the wind farm's snapshots, the rule holds them to 0.8 a second
    where the count alone allows 1.1."""
    if not gc.isenabled():
        return 0.0
    by_count = collections_per_s / collections_per_full()
    if heap <= 0:
        return by_count
    return min(by_count, promoted_per_s / (heap / 4.0))


class GcWatch:
    """Counts the collector's runs, the objects its middle collections promote to the oldest
    generation (``promotions``: costs a look at the young generations before each) and the
    thread CPU of full collections, per thread, while entered (a `gc.callbacks` hook;
    collections run in the thread that allocated)."""

    def __init__(self, promotions: bool = False) -> None:
        self._counts: dict[int, int] = {}
        self._full: dict[int, float] = {}
        self._start: dict[int, float] = {}
        self._promoted: dict[int, int] = {}
        self._young: dict[int, int] = {}
        self._middles = 0  # middle collections whose promotions were counted, all threads
        self.promotions = promotions

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._hook)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)

    def _hook(self, phase: str, info: dict[str, int]) -> None:
        tid = threading.get_ident()
        gen = info.get("generation")
        if phase == "start":
            if self.promotions and gen == FULL - 1:  # what it may promote: both young lists
                self._young[tid] = len(gc.get_objects(0)) + len(gc.get_objects(1))
            self._start[tid] = time.thread_time()
            return
        self._counts[tid] = self._counts.get(tid, 0) + 1
        young = self._young.pop(tid, None)
        if young is not None:
            self._middles += 1
            self._promoted[tid] = self._promoted.get(tid, 0) + max(
                0, young - info.get("collected", 0))
        t0 = self._start.pop(tid, None)
        if gen == FULL and t0 is not None:
            self._full[tid] = self._full.get(tid, 0.0) + time.thread_time() - t0

    def collections(self) -> int:
        """Collections of any generation in this thread so far."""
        return self._counts.get(threading.get_ident(), 0)

    def promoted(self) -> int:
        """Objects middle collections promoted to the oldest generation in this thread."""
        return self._promoted.get(threading.get_ident(), 0)

    def all_promoted(self) -> int:
        return sum(self._promoted.values())

    def promoted_per_middle(self) -> float | None:
        """Objects a middle collection promoted on average, all threads (``promotions``);
        None before the first."""
        return self.all_promoted() / self._middles if self._middles else None

    def full_s(self) -> float:
        """Thread CPU of full collections in this thread so far, seconds."""
        return self._full.get(threading.get_ident(), 0.0)

    def all_collections(self) -> int:
        return sum(self._counts.values())

    def all_full_s(self) -> float:
        return sum(self._full.values())


def full_collection(pause: float, repeats: int = FULL_REPEATS) -> tuple[float, int]:
    """Thread CPU of one full collection of this process as it is now (call it with the
    operators' state alive), each after ``pause`` seconds asleep as between a node's batches:
    the median, microseconds; and the objects it leaves alive (the heap of the long-lived
    rule)."""
    spent = []
    for _ in range(repeats):
        time.sleep(pause)
        c0 = time.thread_time()
        gc.collect()
        spent.append(time.thread_time() - c0)
    return float(np.median(spent)) * 1e6, len(gc.get_objects(FULL))
