"""The cyclic garbage collector's settings for a server process holding many sessions (issue 11).

With CPython's default thresholds (700, 10, 10), a control plane holding 1,000 device sessions
(`benchmarks/fleet_steady.py`, docs/benchmarks.md *Steady CPU: the garbage collector*) ran about
four young collections a second and a full one every 20 to 30 s, each full one 350 to 470 ms
over some 330,000 tracked objects: about a fifth of the busy samples of its event loop.
What those collections walked was mostly not garbage. Each session waits for its next message
(seconds, at one message per node every few seconds) in coroutines and futures made for that
message; alive at the young collections, they were promoted to the oldest generation, and that
promotion is what triggers full collections (CPython collects everything once the promoted
objects reach a quarter of the old generation). Reference counting then freed them, soon after;
a full collection found a few hundred objects of real (cyclic) garbage.

`tune_for_server`:

* collects once and freezes what exists then (`gc.freeze`: the modules, classes and
  configuration of a process that has just started; no collection walks them again);
* raises the young generation's threshold from 700 to `YOUNG_THRESHOLD` net allocations (the
  older generations keep their default ratios, 10 and 10). A session's short-lived objects are
  then freed by reference counting before any collection sees them; what still triggers
  collections is cyclic garbage, at most `YOUNG_THRESHOLD` objects of it waiting (a few MB).

Only for a process that serves: a library or a test process keeps Python's defaults.
`restore` undoes it (tests).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

YOUNG_THRESHOLD = 20_000  # net allocations of tracked objects between young collections


@dataclass(frozen=True)
class CollectorState:
    """What `tune_for_server` changed: the thresholds before, and how many objects it froze."""

    thresholds: tuple[int, int, int]
    frozen: int


def tune_for_server(young: int = YOUNG_THRESHOLD) -> CollectorState:
    """Collect, freeze what survives, and set the young generation's threshold to ``young``
    (the other two thresholds are kept); the state before, for `restore`."""
    if young < 1:
        raise ValueError(f"the young generation's threshold must be >= 1, not {young}")
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, before[1], before[2])
    return CollectorState(before, gc.get_freeze_count())


def restore(state: CollectorState) -> None:
    """Undo `tune_for_server`: the thresholds before, nothing frozen."""
    gc.set_threshold(*state.thresholds)
    gc.unfreeze()
