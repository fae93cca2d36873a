"""A virtual node's updater: what it does when its desired state assigns a release.

`NodeUpdater` drives the agent's own slot state machine (`edgewise.edge.updater.machine`:
`should_apply`, `begin_staging`, `switch`, `commit`, `rollback`, `refuse`) with time instead
of files: no download, no slot on disk, no process restart (unless ``restart``). The node
reports what the agent reports, built by the same code: the status line
(`machine.status_line`, ``release V``, ``release V on trial``, ``; release W failed (PHASE):
REASON``), the heartbeat's ``release`` and ``release_failed``, and engine counters that start
again at 0 when the release is switched in or rolled back (the agent restarts its engine).

An update takes ``D`` seconds, drawn uniformly from `Behaviour.apply_s` for each node and
release: staging the first half, the trial on the health gate the second. Whether it fails is
fixed per node and release (`Behaviour.fails`): with a rate ``r`` (a decimal fraction, exact),
node ``i`` fails when ``floor((i+1)·r) > floor(i·r)``, so of nodes ``0..N-1`` exactly
``floor(N·r)`` fail, spread evenly by index (the rollout's order is a hash of the node ids, so
they fall into the waves at random). A failure in phase ``gate`` switches, goes on trial and
rolls back (``release V failed (gate): ...``); in ``verify`` or ``install`` the release is
refused before the switch, for good. Both are failures a rollout counts at once (not
``download``/``switch``, which the node would retry: cloud/rollouts/machine.py).

Per node this is a handful of attributes and one deadline the session loop already waits on
(`NodeUpdater.next_at`), no task of its own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from edgewise.edge.updater import machine
from edgewise.errors import ConfigError

PHASES = ("gate", "verify", "install")
REASONS = {"gate": "alarms beyond their bound (simulated)",
           "verify": "a file does not match its hash (simulated)",
           "install": "its wheel does not install (simulated)"}
MAX_APPLY_S = 3600.0


def parse_rate(text: str) -> tuple[str | None, Fraction]:
    """``0.05``, ``5%`` or ``VERSION=0.05`` → (version or None for every release, rate)."""
    version, sep, value = text.rpartition("=")
    value = value.strip()
    try:
        rate = (Fraction(value[:-1].strip()) / 100 if value.endswith("%")
                else Fraction(value))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"--release-failure-rate: {text!r}: write a fraction (0.05), a "
                          "percent (5%) or VERSION=RATE") from None
    if not 0 <= rate <= 1:
        raise ConfigError(f"--release-failure-rate: {text!r}: between 0 and 1 (0% and 100%)")
    return (version.strip() or None) if sep else None, rate


def parse_seconds_range(text: str) -> tuple[float, float]:
    """``1-5`` → (1.0, 5.0); ``2`` → (2.0, 2.0)."""
    lo, sep, hi = text.partition("-")
    try:
        a = float(lo)
        b = float(hi) if sep else a
    except ValueError:
        raise ConfigError(f"--apply-seconds: {text!r}: write SECONDS or MIN-MAX (e.g. 1-5)"
                          ) from None
    if not (0 <= a <= b <= MAX_APPLY_S) or math.isnan(a) or math.isnan(b):
        raise ConfigError(f"--apply-seconds: {text!r}: 0 <= MIN <= MAX <= {MAX_APPLY_S:g}")
    return a, b


@dataclass(frozen=True)
class Behaviour:
    """How every virtual node of a run treats a release."""

    rates: dict[str | None, Fraction] = field(default_factory=dict)  # version (None: any)
    phase: str = "gate"  # where a failing release fails (PHASES)
    apply_s: tuple[float, float] = (1.0, 5.0)  # an update's duration, uniform in this range
    restart: bool = False  # the session restarts at a switch and a rollback, as the agent's

    def rate(self, version: str) -> Fraction:
        return self.rates.get(version, self.rates.get(None, Fraction(0)))

    def fails(self, index: int, version: str) -> bool:
        r = self.rate(version)
        return (index + 1) * r.numerator // r.denominator > index * r.numerator // r.denominator

    def duration(self) -> float:
        lo, hi = self.apply_s
        return lo if hi <= lo else random.uniform(lo, hi)


class NodeUpdater:
    """One virtual node's releases (module docstring). `assign` when a desired state is
    applied; `advance` when the loop time reaches `next_at`."""

    def __init__(self, index: int, behaviour: Behaviour) -> None:
        self.index = index
        self.behaviour = behaviour
        self.state = machine.SlotState()
        self.assigned: str | None = None
        self.step: str | None = None  # "switch" (staging) or "gate" (on trial)
        self.next_at = math.inf  # loop time of the next step
        self.half = 0.0  # s: half of this update's duration
        self.started = 0.0  # loop time the update began
        self.engine_starts = 0  # the engine was restarted this often (switch, rollback)

    @property
    def busy(self) -> bool:
        return self.step is not None

    def reportable(self) -> bool:
        return self.state != machine.SlotState() or self.step is not None

    def status_line(self) -> str:
        return machine.status_line(self.state) if self.reportable() else ""

    def health(self) -> dict[str, Any]:
        """The heartbeat's ``release`` and ``release_failed`` (as `edge.health`)."""
        if not self.reportable():
            return {}
        return {"release": self.state.running_version,
                "release_failed": self.state.failed[-1] if self.state.failed else None}

    def assign(self, release: str | None, now: float) -> bool:
        """The newest applied desired state assigns ``release``; True if staging began."""
        self.assigned = release
        if self.step is not None or not machine.should_apply(self.state, release):
            return False
        assert release is not None
        self.state = machine.begin_staging(self.state, release)
        self.step = "switch"
        self.half = self.behaviour.duration() / 2
        self.started = now
        self.next_at = now + self.half
        return True

    def advance(self, now: float, wall: float) -> str | None:
        """Take the step that is due: ``switched``, ``refused``, ``superseded``,
        ``committed`` or ``rolled_back`` (None: nothing due). ``wall``: Unix time, for the
        failure's record."""
        if self.step is None or now < self.next_at:
            return None
        b = self.behaviour
        if self.step == "switch":
            version = self.state.staging_version or ""
            if self.assigned != version:  # never switch to an assignment that is not newest
                self.state = machine.abandon_staging(self.state)
                outcome = "superseded"
            elif b.fails(self.index, version) and b.phase != "gate":
                self.state = machine.refuse(self.state, version, b.phase, REASONS[b.phase],
                                            wall, permanent=True)
                outcome = "refused"
            else:
                slot = self.state.staging or machine.SLOTS[0]
                self.state = machine.switch(self.state, machine.Release(slot, version, "sim"),
                                            None)
                self.engine_starts += 1
                self.step = "gate"
                self.next_at = now + self.half
                return "switched"
        else:
            version = self.state.running_version or ""
            if b.fails(self.index, version):
                self.state = machine.rollback(self.state, "gate", REASONS["gate"], wall)
                self.engine_starts += 1
                outcome = "rolled_back"
            else:
                self.state = machine.commit(self.state)
                outcome = "committed"
        self.step = None
        self.next_at = math.inf
        self.assign(self.assigned, now)  # a newer assignment that came meanwhile
        return outcome
