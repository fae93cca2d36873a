"""`edgewise agent launch`: the small, stable process a service manager runs.

It starts ``edgewise agent run`` as a child from the active slot's environment (the slot's
``agent/`` folder first on ``PYTHONPATH`` when the release carries an agent wheel, else the
installed agent) and watches it:

* before each start it applies `machine.on_start` (counting the attempt of a release on trial,
  rolling back one whose attempts are used up) and tells the child so
  (``EDGEWISE_LAUNCHED=1``: the child does not count again);
* a child that exits with `EXIT_RESTART` (it switched slots, or its gate rolled it back) is
  started again at once;
* a child on trial that exits any other way before its gate commits (an agent wheel that
  cannot even import, a crash) is rolled back, and the previous release started;
* a child on trial still not committed ``start_s + window_s + grace_s`` after its start (it
  hangs) is stopped (SIGTERM, then SIGKILL) and rolled back the same way;
* SIGTERM/SIGINT to the launcher go to the child; the launcher then exits with its code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgewise.edge.updater import machine
from edgewise.edge.updater.gate import GateConfig
from edgewise.edge.updater.store import Slots
from edgewise.edge.updater.updater import EXIT_RESTART, LAUNCHED_ENV
from edgewise.errors import ConfigError

log = logging.getLogger(__name__)

STOP_WAIT_S = 15.0


@dataclass(frozen=True)
class LaunchConfig:
    data_dir: Path
    run_args: tuple[str, ...] = ()  # given to `edgewise agent run` after --data
    gate: GateConfig = field(default_factory=GateConfig)
    grace_s: float = 30.0  # beyond the gate's start_s + window_s
    python: str = sys.executable


class Launcher:
    """See the module docstring. `run` blocks; `stop` from a signal handler."""

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.slots = Slots(config.data_dir)
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.starts = 0
        self.rollbacks = 0

    def stop(self) -> None:
        self.stopping = True
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Start and watch the agent until it stops for good; its exit code."""
        while True:
            decision = machine.on_start(self.slots.load(),
                                        max_attempts=self.config.gate.max_attempts, count=True,
                                        now=time.time())
            if decision.changed:
                self.slots.save(decision.state)
            if decision.rolled_back:
                self.rollbacks += 1
            state = decision.state
            code = self._run_child(state)
            if self.stopping:
                return code
            if code == EXIT_RESTART:
                continue
            now = self.slots.load()
            if now.pending is not None and now.active == state.active and now.active:
                self._rollback(now, "start", f"the agent of release {now.active.version} "
                               f"exited with code {code} before passing its health gate")
                continue
            return code

    def environment(self, state: machine.SlotState) -> dict[str, str]:
        env = dict(os.environ)
        env[LAUNCHED_ENV] = "1"
        if state.active is not None:
            agent = self.slots.agent(state.active.slot)
            if agent.is_dir():
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(agent), env.get("PYTHONPATH", "")) if p)
        return env

    def _run_child(self, state: machine.SlotState) -> int:
        cfg = self.config
        argv = [cfg.python, "-m", "edgewise.cli", "agent", "run", "--data", str(cfg.data_dir),
                *cfg.run_args]
        deadline = None
        if state.pending is not None and state.active is not None:
            try:
                gate = cfg.gate.from_release(self.slots.files(state.active.slot))
            except ConfigError:
                gate = cfg.gate  # the agent rolls it back for that at once
            deadline = time.monotonic() + gate.start_s + gate.window_s + cfg.grace_s
        self.starts += 1
        log.info("starting the agent%s", f" of release {state.active.version}"
                 if state.active else "")
        child = self.child = subprocess.Popen(argv, env=self.environment(state))
        if self.stopping:  # a signal came in before the child existed
            child.send_signal(signal.SIGTERM)
        try:
            while True:
                try:
                    return child.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
                if deadline is None or time.monotonic() < deadline or self.stopping:
                    continue
                deadline = None
                now = self.slots.load()
                if now.pending is None or now.active != state.active:
                    continue  # committed (or rolled back by the agent) in time
                log.error("the agent of release %s did not pass its health gate in time; "
                          "stopping it", now.active.version if now.active else "?")
                _stop(child)
                now = self.slots.load()
                if now.pending is not None and now.active == state.active and now.active:
                    self._rollback(now, "gate", f"the agent of release {now.active.version} "
                                   "did not pass its health gate in time")
                return EXIT_RESTART
        finally:
            if child.poll() is None:
                _stop(child)
            self.child = None

    def _rollback(self, state: machine.SlotState, phase: str, reason: str) -> None:
        new = machine.rollback(state, phase, reason, time.time())
        self.slots.save(new)
        self.rollbacks += 1
        log.error("%s: rolled back to %s", reason, new.running_version or "no release")


def _stop(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
