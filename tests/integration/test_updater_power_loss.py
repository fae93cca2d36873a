"""Power loss while a release is applied: ``kill -9`` of the applying process at random points
of prepare, download, verify, install, validate, completion, switch, gate, commit and
rollback; after each kill a restart (the agent's own `Updater.prepare`) comes back on the old or
the new release, complete (every file's hash, its wheels installed), never a mix.

Each trial is a small forked process running the updater's real steps (`stage`, `switch`,
`on_start`, `commit`/`rollback`) against a `DirectorySource`, killed with SIGKILL by a timer
armed when it reaches the trial's phase, a random delay into it; the trials continue one from
the other's leftovers, as a node would. 100 trials here; EDGEWISE_LONG_TESTS=1 runs 1,000.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from edgewise.edge.updater import machine
from edgewise.edge.updater.source import DirectorySource, publish
from edgewise.edge.updater.stage import StageFailed, stage, switch
from edgewise.edge.updater.store import Slots
from edgewise.edge.updater.updater import Updater, UpdaterConfig
from release_kit import make_wheel, pipeline_yaml, write_release

LONG = os.environ.get("EDGEWISE_LONG_TESTS") == "1"
TRIALS = 1000 if LONG else 100
PHASES = ("start", "prepare", "download", "verify", "install", "validate", "complete",
          "switch", "gate", "end")
MAX_ATTEMPTS = 3


def _release_files(tmp: Path, version: str, plugin: bool, rng: random.Random,
                   mode: str = "") -> dict:
    files: dict[str, str | bytes] = {
        "pipelines/line.yaml": pipeline_yaml(f"line-{version}", high=90.0 + rng.random()),
        "models/shared.bin": b"S" * (64 << 10),  # the same in every release: reused
        "models/own.bin": rng.randbytes(64 << 10),  # new in each: downloaded
        "config/version.txt": version,
        "config/mode.txt": mode,  # the same for 4 releases in a row: hard-linked, then replaced
    }
    if plugin:  # a new wheel in each release with one: downloaded and installed
        whl = make_wheel(tmp / "wheels" / version, "unitconv", "1.0",
                         {"unitconv/__init__.py": f"VERSION = {version!r}\n"})
        files[f"plugins/{whl.name}"] = whl.read_bytes()
    return files


def _trial(data: Path, repo: Path, target: str, marks: Path, kill_phase: str,
           kill_after_s: float) -> None:
    """The applying process: recover, then gate a release on trial or stage the target."""
    fd = os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def mark(phase: str) -> None:
        if phase == "file":  # between files of the download: not a phase of its own
            return
        os.write(fd, phase.encode() + b"\n")
        if phase == kill_phase:
            threading.Timer(kill_after_s, os.kill, (os.getpid(), signal.SIGKILL)).start()

    slots = Slots(data)
    mark("start")
    decision = machine.on_start(slots.load(), max_attempts=MAX_ATTEMPTS, count=True,
                                now=time.time())
    state = decision.state
    if decision.changed:
        slots.save(state)
    if state.pending is None and machine.should_apply(state, target):
        source = DirectorySource(repo)
        try:
            state, result = stage(slots, state, source.manifest(target), source, progress=mark)
        except StageFailed:
            os._exit(3)
        mark("switch")
        state = switch(slots, state, result.release, alarm_rate=0.0)
        state = machine.on_start(state, max_attempts=MAX_ATTEMPTS, count=True,
                                 now=time.time()).state  # the restart on the new slot
        slots.save(state)
    if state.pending is not None and state.active is not None:
        mark("gate")
        time.sleep(0.005)
        if state.active.version.startswith("bad"):
            state = machine.rollback(state, "gate", "bad release", time.time())
        else:
            state = machine.commit(state)
        slots.save(state)
    mark("end")
    time.sleep(0.05)  # a kill armed at "end" lands here
    os._exit(0)


def _phase_reached(marks: Path) -> str:
    lines = marks.read_text().split()
    return lines[-1] if lines else "none"


@pytest.mark.timeout(600)
def test_kill_9_at_random_points_old_or_new_never_a_mix(tmp_path: Path) -> None:
    rng = random.Random(20261206)
    repo, data = tmp_path / "repo", tmp_path / "data"
    digests: dict[str, str] = {}
    slots = Slots(data)
    ctx = multiprocessing.get_context("fork")
    killed: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for i in range(TRIALS):
        before = slots.load()
        old = before.running_version
        allowed = {old}
        if before.pending is not None:  # a trial left on trial: the gate may roll it back
            allowed.add(before.previous.version if before.previous else None)
        # a new release each trial (as a node would get); every fifth fails its gate, so kills
        # land in rollbacks too; every third good one, and each killed during its install (so
        # that the kill lands there, not after a quick install), has a plugin wheel to install
        target = f"bad{i}" if i % 5 == 4 else f"good{i}"
        # every sixth trial runs to its end, so releases also follow one another whole
        kill_phase = "none" if i % 6 == 5 else PHASES[i % len(PHASES)]
        plugin = (target.startswith("good") and i % 3 == 0) or kill_phase == "install"
        folder = write_release(tmp_path / f"r{i}", _release_files(
            tmp_path, target, plugin, rng, f"mode {i // 4}"))
        digests[target] = publish(folder, target, repo).digest()
        marks = tmp_path / "marks"
        p = ctx.Process(target=_trial, args=(data, repo, target, marks, kill_phase,
                                             rng.choice((0.0, rng.uniform(0.0, 0.002),
                                                         rng.uniform(0.0, 0.012)))))
        p.start()
        p.join(60)
        assert p.exitcode is not None, f"trial {i} hung"
        assert p.exitcode in (0, -signal.SIGKILL), f"trial {i}: exit {p.exitcode}"
        if p.exitcode == -signal.SIGKILL:
            killed[_phase_reached(marks)] += 1

        # what a restart finds: the state file parses; the active slot holds old or new whole
        after = slots.load()
        running = after.running_version
        allowed.add(target)
        assert running in allowed, f"trial {i}: running {running}, not one of {allowed}"
        if after.active is not None:
            assert after.active.digest == digests[running]
            assert slots.check(after.active.slot, after.active.digest) is None, f"trial {i}"
            assert (slots.files(after.active.slot) / "config/version.txt").read_text() == running
        if after.previous is not None:  # a rollback target (or kept): whole as well
            assert slots.check(after.previous.slot, after.previous.digest) is None, f"trial {i}"
        # the agent's restart path: nothing to repair, it runs what the state file names
        upd = Updater(data, UpdaterConfig())
        upd.prepare()
        assert upd.state.running_version in allowed
        outcomes[str(upd.state.running_version == target)] += 1

    total_killed = sum(killed.values())
    print(f"\n{TRIALS} trials, {total_killed} killed; by phase reached: {dict(killed)}; "
          f"outcomes (new release running): {dict(outcomes)}")
    assert sum(outcomes.values()) == TRIALS
    # kills landed in every phase (timers armed at each phase in turn, a random delay in)
    for phase in ("prepare", "download", "verify", "install", "validate", "complete", "switch",
                  "gate", "end"):
        assert killed[phase] >= 1, (phase, dict(killed))
    assert total_killed >= TRIALS // 2
