"""`edgewise agent launch` (edgewise.edge.updater.launcher) with real child processes: an agent
wheel that hangs is stopped and rolled back when its gate time is over; one that exits at once
is rolled back at once; a trial whose attempts are used up is rolled back before any start.

No control plane here: after the rollback the installed agent starts with no release and
exits with code 2 (this data directory was never enrolled), which ends the launcher's run.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgewise.edge.updater import machine
from edgewise.edge.updater.gate import GateConfig
from edgewise.edge.updater.launcher import LaunchConfig, Launcher
from edgewise.edge.updater.source import DirectorySource, publish
from edgewise.edge.updater.stage import stage, switch
from edgewise.edge.updater.store import Slots
from release_kit import make_wheel, write_release

GATE = GateConfig(window_s=0.5, start_s=0.5, max_attempts=3)


def _on_trial(tmp_path: Path, init_py: str) -> Slots:
    """A data directory whose active release (on trial, never started) carries an agent
    wheel with ``init_py`` as its ``edgewise/__init__.py``."""
    wheel = make_wheel(tmp_path / "w", "edgewise", "9.9.9", {"edgewise/__init__.py": init_py})
    folder = write_release(tmp_path / "r", {f"agent/{wheel.name}": wheel.read_bytes(),
                                            "config/x.txt": "x"})
    publish(folder, "9", tmp_path / "repo")
    slots = Slots(tmp_path / "data")
    source = DirectorySource(tmp_path / "repo")
    state, result = stage(slots, slots.load(), source.manifest("9"), source)
    switch(slots, state, result.release, None)
    assert (slots.agent("a") / "edgewise" / "__init__.py").read_text() == init_py
    return slots


def test_an_agent_that_hangs_is_stopped_and_rolled_back(tmp_path: Path) -> None:
    slots = _on_trial(tmp_path, "import time\ntime.sleep(600)\n")
    launcher = Launcher(LaunchConfig(tmp_path / "data", gate=GATE, grace_s=1.0))
    t0 = time.monotonic()
    code = launcher.run()
    took = time.monotonic() - t0
    assert code == 2  # the installed agent, not enrolled: "pass --cloud"
    assert (launcher.starts, launcher.rollbacks) == (2, 1)
    assert 2.0 <= took < 30, took
    state = slots.load()
    assert state.active is None and state.pending is None and state.failed == ("9",)
    assert state.last_failure is not None
    assert (state.last_failure.phase, state.last_failure.reason) == (
        "gate", "the agent of release 9 did not pass its health gate in time")


def test_an_agent_that_exits_at_once_is_rolled_back(tmp_path: Path) -> None:
    slots = _on_trial(tmp_path, "import sys\nsys.exit(7)\n")
    launcher = Launcher(LaunchConfig(tmp_path / "data", gate=GATE, grace_s=1.0))
    assert launcher.run() == 2
    assert (launcher.starts, launcher.rollbacks) == (2, 1)
    failure = slots.load().last_failure
    assert failure is not None
    assert (failure.phase, failure.reason) == (
        "start", "the agent of release 9 exited with code 7 before passing its health gate")


def test_attempts_used_up_roll_back_before_any_start(tmp_path: Path) -> None:
    slots = _on_trial(tmp_path, "import sys\nsys.exit(7)\n")
    state = slots.load()
    slots.save(machine.SlotState(active=state.active, pending=3))
    launcher = Launcher(LaunchConfig(tmp_path / "data", gate=GATE, grace_s=1.0))
    assert launcher.run() == 2
    assert (launcher.starts, launcher.rollbacks) == (1, 1)  # only the installed agent ran
    failure = slots.load().last_failure
    assert failure is not None and failure.phase == "start"
    assert failure.reason.startswith("release 9 was started 3 times")


def test_agent_run_restarts_itself_without_the_launcher() -> None:
    """After a switch `agent run` exits 75 under the launcher, else execs a fresh `edgewise`
    with the same arguments (here: --help, which prints and exits 0)."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['edgewise', '--help']; "
            "from edgewise.cli.agent import _restart; _restart()")
    env = {k: v for k, v in os.environ.items() if k != "EDGEWISE_LAUNCHED"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.startswith("Usage: python -m edgewise.cli"), \
        done.stderr
    done = subprocess.run([sys.executable, "-c", code], env={**env, "EDGEWISE_LAUNCHED": "1"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (75, "")
