"""The rollout state machine: one `decide` per driver tick, pure (no I/O, the time given).

Rollout states::

    running ──(failures > threshold, or a wave's gate fails)──▶ paused ──resume──▶ running
    running ──(the last wave passes its gate)──▶ completed   (late nodes still get the target
                                                               until the intents expire)
    running | paused | completed ──abort──▶ aborting ──(every changed node rolled back)──▶ aborted
    running | paused ──cancel──▶ cancelled  (nothing more is assigned, nothing rolled back)

A node of a rollout (`Member`) is ``pending`` (its wave has not come), ``deferred`` (offline
when its turn came: it is assigned when it is back, never a stale wave), ``assigning`` (chosen;
its desired version is being written), ``assigned`` (written; the node applies it), ``healthy``
(the node runs the release, committed: its own health gate passed), ``failed`` (the node says
the release failed, or it did not run it within the node timeout), ``rolling_back`` /
``rolled_back`` (abort: its previous release assigned again) or ``skipped`` (never changed:
the rollout ended first, or its intent expired).

A wave advances when none of its nodes is pending or in flight, then after the bake its fleet
gates (`spec.judge_all`) pass over its healthy nodes. Failures beyond the threshold pause the
rollout at once: nothing more is assigned, so no node is touched after the threshold beyond
those already in flight. The budget (`plan.admit`) counts, per site, the rollout's nodes that
are in flight or offline. With a relative gate, a node is assigned only once it has reported
`BASELINE_READINGS` readings (its counters then are the gate's "before"; a node assigned
just after it started would leave nothing to compare with).

**Quarantined nodes are skipped** (`Seen.quarantine`): a node quarantined when the rollout is
created is in no wave (`api.create_rollout`); one quarantined later becomes ``skipped`` when its
turn comes (pending or deferred), and one quarantined while in flight (assigned) becomes
``skipped`` too, so it never counts as a failure nor holds its site's budget; its desired
version was written, so abort rolls it back like any node it changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from edgewise.cloud.rollouts.observe import Seen
from edgewise.cloud.rollouts.plan import admit
from edgewise.cloud.rollouts.spec import MIN_READINGS, RolloutSpec, Sample, judge_all

ACTIVE = ("running", "paused", "aborting", "completed")  # the driver looks at these
IN_FLIGHT = ("assigning", "assigned")
CHANGED = ("assigning", "assigned", "healthy", "failed", "rolling_back")  # abort undoes these
TERMINAL = ("healthy", "failed", "rolled_back", "skipped")
TRANSIENT_PHASES = ("download", "switch")  # the node tries again (observe.py); timeout decides
BASELINE_READINGS = MIN_READINGS  # a node's readings before it is assigned (relative gates)


@dataclass(frozen=True)
class Member:
    node_id: str
    wave: int
    site: str | None
    state: str = "pending"
    previous: str | None = None  # the release assigned before (None: none)
    version_before: int = 0  # the node's newest desired version before we wrote one
    version: int | None = None  # the desired version the rollout wrote
    baseline: Sample | None = None  # counters when it was assigned
    assigned_at: datetime | None = None
    reason: str = ""


@dataclass(frozen=True)
class Rollout:
    id: str
    spec: RolloutSpec
    state: str
    wave: int
    waves: int
    wave_done_at: datetime | None = None
    reason: str = ""
    paused_by: str | None = None
    accepted_failures: int = 0
    gate_accepted_wave: int = -1
    completed_at: datetime | None = None
    total: int = 0


@dataclass
class Step:
    """What one tick decided: member transitions, nodes to assign (they become
    ``assigning``), rollout fields, audit entries ``(action, target, detail)``."""

    members: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (state, why)
    assign: list[str] = field(default_factory=list)
    rollback: list[str] = field(default_factory=list)
    rollout: dict[str, Any] = field(default_factory=dict)
    audits: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def move(self, m: Member, state: str, why: str) -> None:
        self.members[m.node_id] = (state, why)
        self.audits.append(("rollout.node", f"node:{m.node_id}",
                            {"state": state, "from": m.state, "wave": m.wave, "site": m.site,
                             "reason": why}))


def _state(m: Member, step: Step) -> str:
    return step.members.get(m.node_id, (m.state, ""))[0]


def classify(r: Rollout, m: Member, s: Seen | None, now: datetime) -> tuple[str, str] | None:
    """An assigned node's new state, or None while it is still on its way."""
    target = r.spec.release
    if s is not None:
        if (s.failed == target and s.running != target
                and s.failure_phase not in TRANSIENT_PHASES):
            return "failed", f"the node's update failed ({s.failure})"
        if (s.running == target and not s.on_trial
                and s.applied_version >= (m.version or 0)):
            return "healthy", "runs the release (its health gate passed)"
    if m.assigned_at is not None and now - m.assigned_at > timedelta(
            seconds=r.spec.node_timeout_s):
        return "failed", (f"not running {target} {r.spec.node_timeout_s:g} s after it was "
                          "assigned")
    return None


def quarantined(s: Seen, when: str = "") -> str:
    return f"quarantined{' ' + when if when else ''}: {s.quarantine}"


def decide(r: Rollout, members: Mapping[str, Member], seen: Mapping[str, Seen],
           now: datetime) -> Step:
    step = Step()
    if r.state == "aborting":
        return _abort(r, members, step)
    for m in members.values():
        if m.state == "assigned":
            s = seen.get(m.node_id)
            moved = (("skipped", quarantined(s, "while in flight (its desired version was "
                                                "written)")) if s is not None and s.quarantine
                     else classify(r, m, s, now))
            if moved is not None:
                step.move(m, *moved)
    if r.state == "paused":
        return step
    failures = sum(1 for m in members.values() if _state(m, step) == "failed")
    allowed = r.spec.max_failures.allowed(r.total)
    if r.state == "running" and failures - r.accepted_failures > allowed:
        why = (f"{failures - r.accepted_failures} node(s) failed, more than the "
               f"{r.spec.max_failures} allowed ({allowed})")
        step.rollout.update(state="paused", paused_by="failures", reason=why)
        step.audits.append(("rollout.pause", f"rollout:{r.id}", {"by": "failures",
                                                                 "reason": why}))
        return step
    late_open = r.state == "running" or (
        r.state == "completed" and r.completed_at is not None
        and now < r.completed_at + timedelta(seconds=r.spec.intent_ttl_s))
    _assign(r, members, seen, step, late_open)
    if r.state == "running":
        _advance(r, members, seen, step, now)
    return step


def _assign(r: Rollout, members: Mapping[str, Member], seen: Mapping[str, Seen], step: Step,
            late_open: bool) -> None:
    candidates: list[tuple[str, str | None]] = []
    for m in members.values():
        s = seen.get(m.node_id)
        online = s is not None and s.online
        if s is not None and s.quarantine and (m.state == "deferred" or (
                m.state == "pending" and r.state == "running" and m.wave == r.wave)):
            step.move(m, "skipped", quarantined(s))
        elif m.state == "deferred":
            if not late_open:
                step.move(m, "skipped", "offline until its intent expired")
            elif online:
                candidates.append((m.node_id, m.site))
        elif m.state == "pending" and r.state == "running" and m.wave == r.wave:
            if online:
                candidates.append((m.node_id, m.site))
            else:
                step.move(m, "deferred", "offline when its wave came; assigned when back")
    if any(g.relative for g in r.spec.gates):  # the counters before are the gate's baseline
        short = [c for c in candidates if seen[c[0]].sample.readings < BASELINE_READINGS]
        if short:
            candidates = [c for c in candidates if c not in short]
            why = (f"{len(short)} node(s) wait to report {BASELINE_READINGS} readings, the "
                   "baseline of the relative gates")
            if r.state == "running" and why != r.reason:
                step.rollout["reason"] = why
        elif r.reason.endswith("the baseline of the relative gates"):
            step.rollout["reason"] = ""
    if not candidates:
        return
    busy: Counter[str] = Counter()
    for m in members.values():
        s = seen.get(m.node_id)
        if m.site is not None and (_state(m, step) in IN_FLIGHT
                                   or (s is not None and not s.online
                                       and _state(m, step) not in ("skipped", "rolled_back"))):
            busy[m.site] += 1
    step.assign = admit(candidates, busy, r.spec.max_unavailable_per_site)
    for node in step.assign:
        step.members[node] = ("assigning", "")


def _advance(r: Rollout, members: Mapping[str, Member], seen: Mapping[str, Seen], step: Step,
             now: datetime) -> None:
    wave = [m for m in members.values() if m.wave == r.wave]
    if any(_state(m, step) in ("pending", *IN_FLIGHT) for m in wave):
        if r.wave_done_at is not None:
            step.rollout["wave_done_at"] = None
        return
    done_at = r.wave_done_at
    if done_at is None:
        done_at = now
        step.rollout["wave_done_at"] = now
        step.audits.append(("rollout.wave.done", f"rollout:{r.id}", {"wave": r.wave}))
    if now < done_at + timedelta(seconds=r.spec.bake_s):
        return
    pairs = [(m.baseline or Sample(), seen[m.node_id].sample) for m in wave
             if _state(m, step) == "healthy" and m.node_id in seen]
    if r.gate_accepted_wave == r.wave or not r.spec.gates:
        verdict, results = "pass", []
    elif not pairs:
        verdict, results = "unknown", []
    else:
        verdict, results = judge_all(r.spec.gates, pairs)
    detail = {"wave": r.wave, "gates": [g.to_json() for g in results]}
    if verdict == "fail":
        why = f"wave {r.wave} failed its gate: " + "; ".join(
            f"{g.gate} ({g.detail})" for g in results if g.verdict == "fail")
        step.rollout.update(state="paused", paused_by="gate", reason=why)
        step.audits.append(("rollout.pause", f"rollout:{r.id}", {"by": "gate", **detail}))
        return
    if verdict == "unknown":
        why = (f"wave {r.wave}: waiting for data: " + "; ".join(
            g.detail for g in results if g.verdict == "unknown")) if results else (
            f"wave {r.wave}: no node of the wave runs the release yet")
        if why != r.reason:
            step.rollout["reason"] = why
        return
    step.audits.append(("rollout.wave.pass", f"rollout:{r.id}", detail))
    if r.wave + 1 < r.waves:
        step.rollout.update(wave=r.wave + 1, wave_done_at=None, reason="")
        step.audits.append(("rollout.wave.start", f"rollout:{r.id}", {"wave": r.wave + 1}))
    else:
        step.rollout.update(state="completed", completed_at=now, reason="")
        step.audits.append(("rollout.complete", f"rollout:{r.id}", {"waves": r.waves}))


def _abort(r: Rollout, members: Mapping[str, Member], step: Step) -> Step:
    busy = False
    for m in members.values():
        if m.state in ("pending", "deferred"):
            step.move(m, "skipped", "the rollout was aborted before its turn")
        elif m.state in ("assigned", "healthy", "failed") or (
                m.state == "skipped" and m.version is not None):  # quarantined in flight
            step.rollback.append(m.node_id)
            step.members[m.node_id] = ("rolling_back", "")
            busy = True
        elif m.state in ("assigning", "rolling_back"):
            busy = True  # the driver settles these first
    if not busy:
        step.rollout.update(state="aborted", reason="every node it changed was rolled back")
        step.audits.append(("rollout.aborted", f"rollout:{r.id}", {}))
    return step
