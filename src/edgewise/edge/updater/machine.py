"""The slot state machine as pure data: what the node runs, and what to do next.

Nothing here touches a disk, a clock or a process: every function takes a `SlotState` (what
``DATA/releases/state.json`` holds) and returns the next one, or a `StartDecision`. The I/O
shell (`edgewise.edge.updater.store`, `.stage`, `.updater`, `.launcher`) persists each new
state with one atomic write *before* acting on it, so a power loss at any instant leaves a
state from which `on_start` finds the way back. docs/updates.md, "Applying a release on the
node", draws the machine; tests/unit/test_updater_machine.py walks it as a table.

States of the node (``active``/``pending``/``staging``):

* no release: ``active`` None, the installed agent runs the desired state's pipelines;
* committed: ``active`` set, ``pending`` None;
* on trial: ``active`` set, ``pending`` = how many times it has been started so far; a start
  with ``pending >= max_attempts`` rolls back before anything else runs;
* staging: ``staging`` names the inactive slot being written; it is never started and its
  content is thrown away or reused (by hash) by the next staging.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

SLOTS = ("a", "b")
MAX_FAILED = 20  # versions remembered as failed (not tried again)
MAX_REASON = 2000  # characters of a failure's reason kept


class TransitionError(ValueError):
    """An event that does not fit the state (a bug in the caller, never the network's)."""


@dataclass(frozen=True)
class Release:
    """A release installed in a slot; ``digest`` is the sha256 of its manifest bytes."""

    slot: str
    version: str
    digest: str

    def to_json(self) -> dict[str, str]:
        return {"slot": self.slot, "version": self.version, "digest": self.digest}

    @classmethod
    def from_json(cls, d: Any) -> Release | None:
        if d is None:
            return None
        if not isinstance(d, dict) or d.get("slot") not in SLOTS:
            raise ValueError(f"bad release entry {d!r:.80}")
        version, digest = d.get("version"), d.get("digest")
        if not isinstance(version, str) or not isinstance(digest, str):
            raise ValueError(f"bad release entry {d!r:.80}")
        return cls(d["slot"], version, digest)


@dataclass(frozen=True)
class Failure:
    """Why a release is not running: ``phase`` is download, verify, install, validate, gate or
    start; ``at`` Unix seconds."""

    version: str
    phase: str
    reason: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "phase": self.phase, "reason": self.reason,
                "at": self.at}

    @classmethod
    def from_json(cls, d: Any) -> Failure | None:
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ValueError(f"bad failure entry {d!r:.80}")
        v, p, r, at = d.get("version"), d.get("phase"), d.get("reason"), d.get("at")
        if not (isinstance(v, str) and isinstance(p, str) and isinstance(r, str)
                and isinstance(at, int | float)):
            raise ValueError(f"bad failure entry {d!r:.80}")
        return cls(v, p, r, float(at))


@dataclass(frozen=True)
class SlotState:
    """What ``state.json`` holds. ``previous`` is what a rollback returns to (None: no release,
    the installed agent); ``alarm_rate`` the alarms per second of the release before the switch
    (the gate's baseline)."""

    active: Release | None = None
    previous: Release | None = None
    pending: int | None = None  # starts so far of the active release on trial; None: committed
    staging: str | None = None  # the slot being written
    staging_version: str | None = None
    last_failure: Failure | None = None
    failed: tuple[str, ...] = ()  # versions that failed here, newest last: not tried again
    alarm_rate: float | None = None

    @property
    def running_version(self) -> str | None:
        return self.active.version if self.active else None

    def inactive_slot(self) -> str:
        """The slot a new release is written into: the one the active release is not in."""
        if self.active is None:
            return SLOTS[0] if self.previous is None or self.previous.slot != SLOTS[0] \
                else SLOTS[1]
        return SLOTS[1] if self.active.slot == SLOTS[0] else SLOTS[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "active": self.active.to_json() if self.active else None,
            "previous": self.previous.to_json() if self.previous else None,
            "pending": self.pending,
            "staging": self.staging,
            "staging_version": self.staging_version,
            "last_failure": self.last_failure.to_json() if self.last_failure else None,
            "failed": list(self.failed),
            "alarm_rate": self.alarm_rate,
        }

    @classmethod
    def from_json(cls, d: Any) -> SlotState:
        """Raises ValueError naming what is wrong."""
        if not isinstance(d, dict) or d.get("format") != 1:
            raise ValueError("not a slot state (format 1)")
        pending, staging = d.get("pending"), d.get("staging")
        if pending is not None and (type(pending) is not int or pending < 0):
            raise ValueError(f"pending: {pending!r:.40}")
        if staging is not None and staging not in SLOTS:
            raise ValueError(f"staging: {staging!r:.40}")
        failed = d.get("failed", [])
        if not isinstance(failed, list) or not all(isinstance(v, str) for v in failed):
            raise ValueError("failed: not a list of versions")
        rate = d.get("alarm_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)):
            raise ValueError(f"alarm_rate: {rate!r:.40}")
        sv = d.get("staging_version")
        state = cls(Release.from_json(d.get("active")), Release.from_json(d.get("previous")),
                    pending, staging, sv if isinstance(sv, str) else None,
                    Failure.from_json(d.get("last_failure")), tuple(failed[-MAX_FAILED:]),
                    None if rate is None else float(rate))
        if state.active is None and state.pending is not None:
            raise ValueError("pending without an active release")
        if state.active and state.staging == state.active.slot:
            raise ValueError("staging into the active slot")
        return state


# -- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartDecision:
    """What a (re)start does: persist ``state`` first, then run ``state.active``. ``rolled_back``
    says a trial was given up (its reason is ``state.last_failure``); ``discard`` names a slot
    whose half-written content must not be trusted (it may be reused file by file, by hash)."""

    state: SlotState
    rolled_back: bool = False
    discard: str | None = None
    changed: bool = False


def on_start(state: SlotState, *, max_attempts: int, count: bool, now: float) -> StartDecision:
    """A process is about to run the node's software (power on, a crash, a restart after the
    switch). A staging in progress is abandoned; a release on trial that has been started
    ``max_attempts`` times already is rolled back; otherwise, with ``count`` (the one who
    starts it counts, the launcher or a bare ``agent run``), its attempt is counted."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    new, discard = state, None
    if state.staging is not None:
        discard = state.staging
        new = replace(new, staging=None, staging_version=None)
    rolled_back = False
    if new.pending is not None:
        if new.pending >= max_attempts:
            if new.active is None:
                raise TransitionError("on trial without an active release")
            new = rollback(new, "start", f"release {new.active.version} was started "
                           f"{new.pending} times without passing its health gate (a crash, "
                           "a hang or a power loss each time)", now)
            rolled_back = True
        elif count:
            new = replace(new, pending=new.pending + 1)
    return StartDecision(new, rolled_back, discard, new != state)


def status_line(state: SlotState) -> str:
    """The release part of the node's reported status: ``release V`` (``on trial`` while it is),
    or ``no release``, then ``; release W failed (PHASE): REASON`` for the last failure (the
    control plane's rollouts read this line: cloud/rollouts/observe.py)."""
    text = (f"release {state.active.version}" if state.active else "no release") + (
        " on trial" if state.pending is not None else "")
    if state.last_failure is not None:
        f = state.last_failure
        text += f"; release {f.version} failed ({f.phase}): {f.reason.splitlines()[0]}"
    return text


def should_apply(state: SlotState, assigned: str | None) -> bool:
    """True if ``assigned`` (the newest desired state's release) is to be staged now: not the
    one running, not one that failed here, and no trial or staging under way."""
    return (assigned is not None and assigned != state.running_version
            and assigned not in state.failed and state.pending is None)


def begin_staging(state: SlotState, version: str) -> SlotState:
    """Start writing ``version`` into the inactive slot. If a committed previous release lives
    there, it is given up (no rollback target beyond the running release from here on)."""
    if state.pending is not None:
        raise TransitionError("cannot stage while a release is on trial")
    slot = state.inactive_slot()
    previous = state.previous
    if previous is not None and previous.slot == slot:
        previous = None
    return replace(state, staging=slot, staging_version=version, previous=previous)


def abandon_staging(state: SlotState) -> SlotState:
    """A staging not to be switched to (a newer release was assigned meanwhile); the slot's
    content stays for reuse by hash."""
    return replace(state, staging=None, staging_version=None)


def switch(state: SlotState, release: Release, alarm_rate: float | None) -> SlotState:
    """The staged ``release`` becomes active, on trial (``pending`` 0: not started yet); the
    release that ran until now is what a rollback returns to."""
    if state.staging != release.slot or state.staging_version != release.version:
        raise TransitionError(f"slot {release.slot} does not hold staged {release.version}")
    return replace(state, active=release, previous=state.active, pending=0, staging=None,
                   staging_version=None, alarm_rate=alarm_rate)


def commit(state: SlotState) -> SlotState:
    """The release on trial passed its gate: it stays; the previous one is kept for reuse."""
    if state.pending is None:
        raise TransitionError("nothing on trial to commit")
    return replace(state, pending=None, alarm_rate=None)


def rollback(state: SlotState, phase: str, reason: str, now: float) -> SlotState:
    """The release on trial failed: back to the previous one (or to no release), remembered as
    failed with the reason."""
    if state.pending is None or state.active is None:
        raise TransitionError("nothing on trial to roll back")
    failure = Failure(state.active.version, phase, reason[:MAX_REASON], now)
    return replace(state, active=state.previous, previous=None, pending=None,
                   alarm_rate=None, last_failure=failure,
                   failed=_add(state.failed, state.active.version))


def damaged(state: SlotState, reason: str, now: float) -> SlotState:
    """The active slot does not hold its release whole (a failing disk, a person): run the
    previous release, or no release. Not remembered as failed: the assignment stages it again."""
    if state.active is None:
        raise TransitionError("no active release")
    failure = Failure(state.active.version, "start", reason[:MAX_REASON], now)
    return replace(state, active=state.previous, previous=None, pending=None, alarm_rate=None,
                   last_failure=failure)


def refuse(state: SlotState, version: str, phase: str, reason: str, now: float,
           *, permanent: bool) -> SlotState:
    """Staging ``version`` failed before the switch: nothing changed for what runs. A
    ``permanent`` failure (a file or pipeline that is wrong) is not tried again; a transient
    one (the network) is, later. The slot's content stays for reuse by hash."""
    failure = Failure(version, phase, reason[:MAX_REASON], now)
    failed = _add(state.failed, version) if permanent else state.failed
    return replace(state, staging=None, staging_version=None, last_failure=failure,
                   failed=failed)


def _add(failed: tuple[str, ...], version: str) -> tuple[str, ...]:
    return (*(v for v in failed if v != version), version)[-MAX_FAILED:]
