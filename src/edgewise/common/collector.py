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

`scale_young`, called by the control plane's maintenance round, raises that threshold with the
live sessions, `YOUNG_PER_SESSION` each (at most `MAX_YOUNG`). At 10,000 sessions 20,000 was
too low: a session's waiting objects were promoted again, and full collections of 1.8-3.8
million objects paused the process for 1.4-4.6 s every two to three minutes (ack p99 1.6 s in
the steady state, 7 s in a whole scenario). With 100,000 there was no full collection in the
steady state; docs/benchmarks.md, *The young threshold at 10,000 nodes*, has that pair and a
run of this code that did not reproduce its gain in CPU and latency.

Only for a process that serves: a library or a test process keeps Python's defaults
(`scale_young` does nothing there). `restore` undoes it (tests).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

YOUNG_THRESHOLD = 20_000  # net allocations of tracked objects between young collections
YOUNG_PER_SESSION = 10  # and with many sessions: this many per live session...
MAX_YOUNG = 200_000  # ...up to this (at most that many objects of cyclic garbage wait)

_base: int | None = None  # the young threshold `tune_for_server` set; None: not tuned


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
    global _base
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, before[1], before[2])
    _base = young
    return CollectorState(before, gc.get_freeze_count())


def scale_young(sessions: int) -> int | None:
    """In a process tuned by `tune_for_server`: set the young threshold to `YOUNG_PER_SESSION`
    per live session, not below the tuned one and not above `MAX_YOUNG`; the threshold set.
    None (nothing changed) in a process that was not tuned."""
    if _base is None:
        return None
    young = min(MAX_YOUNG, max(_base, YOUNG_PER_SESSION * sessions))
    now = gc.get_threshold()
    if now[0] != young:
        gc.set_threshold(young, now[1], now[2])
    return young


def restore(state: CollectorState) -> None:
    """Undo `tune_for_server`: the thresholds before, nothing frozen."""
    global _base
    gc.set_threshold(*state.thresholds)
    gc.unfreeze()
    _base = None
