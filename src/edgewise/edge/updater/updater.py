"""The updater as the agent runs it: recover at start, gate a release on trial, stage the
assigned one, switch, restart.

The agent calls `Updater.prepare` before anything else runs (a release whose attempts are used
up is rolled back here, a staging cut short is abandoned, the active slot's files are checked
against their hashes and its plugins put on ``sys.path``), asks `Updater.pipeline` which
pipeline the release names, and runs `Updater.run` beside its engine supervisor. That task:

* gates a release on trial (`edgewise.edge.updater.gate`): commit, or roll back and ask the
  agent to restart (the old release then starts in a fresh process: no code of the failed one
  stays loaded);
* stages the release the newest desired state assigns (`should_apply`) into the inactive slot
  in a worker thread, records the alarm rate of what runs now (the gate's baseline), switches
  and asks the agent to restart on the new slot. Network failures are retried with backoff;
  a release whose files or pipelines are wrong is refused for good, with the reason.

Which pipeline runs: while the desired state assigns a release and the active release has a
pipeline, that pipeline (relative paths from the slot's ``files/``); otherwise the desired
state's ``pipelines`` rule (edgewise.edge.twin). `AgentHooks` is what the agent lends.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgewise.common.backoff import Backoff
from edgewise.edge.updater import machine
from edgewise.edge.updater.gate import GateConfig, Sample, judge, run_probe
from edgewise.edge.updater.stage import (
    StageFailed,
    Validation,
    parse_slot_pipeline,
    refuse,
    stage,
    switch,
)
from edgewise.edge.updater.store import Slots
from edgewise.errors import ConfigError, PeerError, StorageError, TransportError
from edgewise.pipeline.spec import PipelineSpec
from edgewise.sync.release import Manifest, ReleaseSource

log = logging.getLogger(__name__)

LAUNCHED_ENV = "EDGEWISE_LAUNCHED"  # set by `edgewise agent launch` for the agent it starts
EXIT_RESTART = 75  # `agent run` exits with this to be started again (on another slot)


class StageCancelled(Exception):
    """The agent stopped while a release was being staged (raised in the worker thread)."""


def assigned_release(desired: Any) -> str | None:
    """The release version a desired state assigns (its ``release`` field), or None."""
    value = getattr(desired, "release", None)
    if isinstance(value, dict):
        value = value.get("version")
    return value if isinstance(value, str) and value else None


class AgentHooks(Protocol):
    def desired(self) -> Any: ...  # the twin's applied DesiredState, or None
    def sample(self) -> tuple[str, int, str | None, int, int]: ...  # state, starts, error,
    # readings_in, alarms
    def alarm_rate(self) -> float | None: ...  # alarms per second of the running pipeline
    def set_pipeline(self, spec: PipelineSpec | None, governed: bool) -> None: ...
    def restart(self, reason: str) -> None: ...
    def changed(self) -> None: ...  # the release status changed: report it


@dataclass(frozen=True)
class UpdaterConfig:
    gate: GateConfig = field(default_factory=GateConfig)
    launched: bool = False  # `agent launch` counts the attempts, not the agent
    retry: Backoff = field(default_factory=lambda: Backoff(1.0, 300.0))
    allowed: tuple[Path, ...] = ()  # DATA/pipelines and --allow-path, for release pipelines


class Updater:
    """See the module docstring."""

    def __init__(self, data_dir: Path, config: UpdaterConfig,
                 source: Callable[[], ReleaseSource] | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.slots = Slots(data_dir)
        self.config = config
        self.source_factory = source
        self.now = now
        self.state = machine.SlotState()
        self.manifest: Manifest | None = None
        self.phase = "idle"  # what the updater is doing, for the status
        self.fetched = self.reused = 0  # of the last staging
        self._notice: asyncio.Event | None = None
        self._cancel = threading.Event()  # set when run() is cancelled mid-staging
        self._governed = False

    # -- start ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Recover (module docstring). Raises `StorageError` when the state cannot be read."""
        state = self.slots.load()
        decision = machine.on_start(state, max_attempts=self.config.gate.max_attempts,
                                    count=not self.config.launched, now=self.now())
        state = decision.state
        if decision.rolled_back and state.last_failure is not None:
            log.error("release %s rolled back at start: %s", state.last_failure.version,
                      state.last_failure.reason)
        if decision.changed:
            self.slots.save(state)
        while state.active is not None:
            problem = self.slots.check(state.active.slot, state.active.digest)
            if problem is None:
                break
            log.error("release %s cannot run: %s", state.active.version, problem)
            state = machine.damaged(state, problem, self.now())
            self.slots.save(state)
        self.state = state
        self.manifest = None
        if state.active is not None:
            self.manifest = self.slots.read_manifest(state.active.slot)
            site = self.slots.site(state.active.slot)
            if site.is_dir() and str(site) not in sys.path:
                sys.path.insert(0, str(site))  # its plugins, and their entry points
                importlib.invalidate_caches()
            log.info("running release %s (slot %s%s)", state.active.version, state.active.slot,
                     f", on trial: start {state.pending}" if state.pending is not None else "")

    def pipeline(self, desired: Any) -> tuple[bool, PipelineSpec | None]:
        """(governed, spec): whether the active release's pipeline replaces the desired
        state's, and that pipeline. Raises `ConfigError` if it no longer parses."""
        active, manifest = self.state.active, self.manifest
        self._governed = self.governs(desired)
        if not self._governed or active is None or manifest is None:
            return False, None
        return True, parse_slot_pipeline(self.slots, active.slot, manifest,
                                         self.config.allowed)

    def governs(self, desired: Any) -> bool:
        """True if the active release's pipeline replaces the desired state's."""
        m = self.manifest
        return (self.state.active is not None and m is not None and bool(m.pipelines())
                and assigned_release(desired) is not None)

    def setpoint_defaults(self) -> dict[str, Any]:
        """The active release's setpoint defaults (its manifest's ``setpoints``)."""
        return dict(self.manifest.setpoints) if self.manifest is not None else {}

    def notice(self) -> None:
        """The desired state changed: look at its release assignment again."""
        if self._notice is not None:
            self._notice.set()

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``release`` block of status.json (and of the reported state's counters)."""
        st = self.state
        out: dict[str, Any] = {
            "running": st.active.version if st.active else None,
            "slot": st.active.slot if st.active else None,
            "state": ("none" if st.active is None else
                      "on trial" if st.pending is not None else "committed"),
            "previous": st.previous.version if st.previous else None,
            "phase": self.phase,
            "failed": list(st.failed),
        }
        if st.pending is not None:
            out["attempts"] = st.pending
        if st.staging_version:
            out["staging"] = st.staging_version
        if st.last_failure is not None:
            out["last_failure"] = st.last_failure.to_json()
        return out

    def reportable(self) -> bool:
        """True once there is something to say: a release, a failure, work under way."""
        return self.state != machine.SlotState() or self.phase != "idle"

    def status_text(self) -> str:
        """One line for the reported state's status ("" while there is nothing to say)."""
        return machine.status_line(self.state) if self.reportable() else ""

    # -- run --------------------------------------------------------------------------------
    async def run(self, hooks: AgentHooks) -> None:
        self._notice = asyncio.Event()
        if self.state.pending is not None and not await self._gate(hooks):
            return  # rolled back: the agent restarts
        failures = 0
        self._notice.set()
        while True:
            await self._notice.wait()
            self._notice.clear()
            desired = hooks.desired()
            if self.governs(desired) != self._governed:
                try:
                    g, spec = self.pipeline(desired)
                except ConfigError as exc:
                    log.error("the pipeline of release %s does not parse: %s",
                              self.state.running_version, exc)
                else:
                    hooks.set_pipeline(spec, g)
            assigned = assigned_release(desired)
            if not machine.should_apply(self.state, assigned) or assigned is None:
                continue
            if self.source_factory is None:
                self.phase = f"release {assigned} assigned, but this agent has no release source"
                log.error("%s", self.phase)
                continue
            outcome = await self._apply(assigned, hooks)
            if outcome == "switched":
                return
            if outcome == "superseded":
                self._notice.set()
                continue
            if outcome == "retry":
                failures += 1
                delay = self.config.retry.delay(failures)
                log.warning("release %s: trying again in %.1f s", assigned, delay)
                await asyncio.sleep(delay)
                self._notice.set()
            else:
                failures = 0

    async def _apply(self, version: str, hooks: AgentHooks) -> str:
        """Stage, switch, restart: 'switched', 'refused' (for good), 'retry' or 'superseded'
        (another release, or none, was assigned while it was staged)."""
        log.info("applying release %s", version)
        self.phase = f"staging {version}"
        hooks.changed()
        factory = self.source_factory
        if factory is None:  # run() checks it
            return "refused"
        try:
            source = factory()
            await asyncio.to_thread(source.refresh)
            manifest = await asyncio.to_thread(source.manifest, version)
            try:
                state, result = await asyncio.to_thread(
                    stage, self.slots, self.state, manifest, source,
                    Validation(self.config.allowed), self._progress)
            except asyncio.CancelledError:
                self._cancel.set()  # the thread stops at its next step; the next start resumes
                raise
        except StageFailed as exc:
            self.state = refuse(self.slots, self.slots.load(), version, exc, self.now())
            self.phase = "idle"
            log.error("release %s refused: %s", version, exc)
            hooks.changed()
            return "refused" if exc.permanent else "retry"
        except (TransportError, PeerError, StorageError, ConfigError) as exc:
            # the network, the source or the disk: nothing switched; try again later
            self.state = self.slots.load()
            self.phase = f"release {version}: {exc}"
            log.error("release %s not staged: %s", version, exc)
            hooks.changed()
            return "retry"
        self.fetched, self.reused = result.fetched, result.reused
        now_assigned = assigned_release(hooks.desired())
        if now_assigned != version:  # never switch to an assignment that is not the newest
            self.state = machine.abandon_staging(state)
            self.slots.save(self.state)
            self.phase = "idle"
            log.info("release %s staged, but %s is assigned now: not switching", version,
                     now_assigned or "no release")
            return "superseded"
        self.state = switch(self.slots, state, result.release, hooks.alarm_rate())
        self.phase = f"switched to {version}"
        log.info("release %s staged in slot %s (%d files fetched, %d reused); restarting on it",
                 version, result.release.slot, result.fetched, result.reused)
        hooks.changed()
        hooks.restart(f"switched to release {version}")
        return "switched"

    def _progress(self, phase: str) -> None:
        if self._cancel.is_set():  # the agent is stopping: end the staging between steps
            raise StageCancelled
        if phase == "file":
            return
        self.phase = f"staging {self.state.staging_version or ''}: {phase}".strip()

    async def _gate(self, hooks: AgentHooks) -> bool:
        """Judge the release on trial: commit (True) or roll back and restart (False)."""
        active = self.state.active
        if active is None:
            return True
        self.phase = f"health gate of {active.version}"
        try:
            cfg = self.config.gate.from_release(self.slots.files(active.slot))
        except ConfigError as exc:
            return self._rollback(hooks, "gate", f"its gate settings: {exc}")
        has_pipeline = self.governs(hooks.desired())
        samples: list[Sample] = []
        t0 = time.monotonic()
        probe_error: str | None = None
        probed = False
        while True:
            state, starts, error, readings, alarms = hooks.sample()
            samples.append(Sample(time.monotonic() - t0, state, starts, error, readings,
                                  alarms))
            verdict = judge(cfg, samples, baseline=self.state.alarm_rate,
                            has_pipeline=has_pipeline, probe_error=probe_error)
            if verdict.outcome == "pass" and (cfg.probe or cfg.probe_url) and not probed:
                probed = True
                env = dict(os.environ, EDGEWISE_RELEASE=active.version,
                           EDGEWISE_RELEASE_DIR=str(self.slots.files(active.slot)))
                probe_error = await asyncio.to_thread(
                    run_probe, cfg, self.slots.files(active.slot), env)
                continue
            if verdict.outcome == "fail":
                return self._rollback(hooks, "gate", verdict.reason)
            if verdict.outcome == "pass":
                self.state = machine.commit(self.state)
                self.slots.save(self.state)
                self.phase = "idle"
                log.info("release %s passed its health gate: committed", active.version)
                hooks.changed()
                return True
            await asyncio.sleep(cfg.sample_s)

    def _rollback(self, hooks: AgentHooks, phase: str, reason: str) -> bool:
        version = self.state.running_version
        self.state = machine.rollback(self.state, phase, reason, self.now())
        self.slots.save(self.state)
        back = self.state.running_version or "the installed agent (no release)"
        self.phase = f"rolled back to {back}"
        log.error("release %s failed its health gate: %s; rolling back to %s", version, reason,
                  back)
        hooks.changed()
        hooks.restart(f"rolled back release {version}: {reason}")
        return False


class SupervisorHooks:
    """`AgentHooks` over the agent's engine supervisor (duck-typed: ``status()``,
    ``apply(spec)``, ``starts``, ``state``, ``error``, ``counters()``); ``fallback`` gives the
    pipeline of the desired state's rule (when a release stops governing)."""

    def __init__(self, supervisor: Any, desired: Callable[[], Any],
                 restart: Callable[[str], None], changed: Callable[[], None],
                 fallback: Callable[[], PipelineSpec | None]) -> None:
        self.supervisor = supervisor
        self._desired = desired
        self._fallback = fallback
        self._restart = restart
        self._changed = changed
        self._tasks: set[asyncio.Task[Any]] = set()

    def desired(self) -> Any:
        return self._desired()

    def sample(self) -> tuple[str, int, str | None, int, int]:
        sv = self.supervisor
        c = sv.counters()
        # an engine that failed and runs again has no error any more: its last failure says
        # why it was restarted (a gate sampling between the two would see only the restart)
        error = sv.error or getattr(sv, "last_error", None)
        return sv.state, sv.starts, error, c.get("readings_in", 0), c.get("alarms", 0)

    def alarm_rate(self) -> float | None:
        """The running pipeline's alarms per second, an upper estimate: (alarms + 3) / elapsed,
        the 95% Poisson upper bound when none were seen (a pipeline restarted a second ago that
        raised no alarm yet is not taken for one that never raises any)."""
        st = self.supervisor.status()
        if st.alarms is None or not st.elapsed_s:
            return None
        return (st.alarms + 3) / st.elapsed_s

    def set_pipeline(self, spec: PipelineSpec | None, governed: bool) -> None:
        log.info("%s", f"running the release's pipeline {spec.name if spec else '-'}" if governed
                 else "the desired state's pipeline rule applies again (no release assigned)")
        if not governed:
            spec = self._fallback()
        task = asyncio.get_running_loop().create_task(self.supervisor.apply(spec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def restart(self, reason: str) -> None:
        self._restart(reason)

    def changed(self) -> None:
        self._changed()
