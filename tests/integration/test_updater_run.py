"""`Updater.run` in process, with a small stand-in for the agent (`Node`, the `AgentHooks` the
agent lends) and a folder source: the newest assignment wins over one being staged, a trial is
committed or rolled back by its gate, a failing staging is retried or refused."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgewise.edge.updater import machine
from edgewise.edge.updater.gate import GateConfig
from edgewise.edge.updater.source import DirectorySource, publish
from edgewise.edge.updater.store import Slots
from edgewise.edge.updater.updater import Updater, UpdaterConfig
from edgewise.pipeline.spec import PipelineSpec
from release_kit import pipeline_yaml, write_release


@dataclass
class Desired:
    release: str | None


class Node:
    """What the agent lends the updater: its desired state, engine figures, restart."""

    def __init__(self, release: str | None) -> None:
        self.state = Desired(release)
        self.engine = ("running", 1, None, 0, 0)
        self.restarted: list[str] = []
        self.changes = 0
        self.pipelines: list[tuple[str | None, bool]] = []
        self.restarted_event = asyncio.Event()

    def desired(self) -> Any:
        return self.state

    def sample(self) -> tuple[str, int, str | None, int, int]:
        state, starts, error, readings, alarms = self.engine
        self.engine = (state, starts, error, readings + 10, alarms)  # records flow
        return state, starts, error, readings, alarms

    def alarm_rate(self) -> float | None:
        return 0.0

    def set_pipeline(self, spec: PipelineSpec | None, governed: bool) -> None:
        self.pipelines.append((spec.name if spec else None, governed))

    def restart(self, reason: str) -> None:
        self.restarted.append(reason)
        self.restarted_event.set()

    def changed(self) -> None:
        self.changes += 1


def _publish(tmp_path: Path, version: str) -> None:
    folder = write_release(tmp_path / f"r{version}", {
        "pipelines/line.yaml": pipeline_yaml("line-" + version), "config/v.txt": version})
    publish(folder, version, tmp_path / "repo")


CFG = UpdaterConfig(gate=GateConfig(window_s=0.3, start_s=1.0, sample_s=0.05))


async def test_the_newest_assignment_wins_over_one_being_staged(tmp_path: Path) -> None:
    for v in ("2", "3"):
        _publish(tmp_path, v)
    node = Node("2")

    class Source(DirectorySource):
        def fetch_blob(self, sha256: str, dest: Path) -> None:
            node.state = Desired("3")  # the twin applied a newer desired state meanwhile
            super().fetch_blob(sha256, dest)

    updater = Updater(tmp_path / "data", CFG, source=lambda: Source(tmp_path / "repo"))
    updater.prepare()
    await asyncio.wait_for(updater.run(node), 30)
    assert node.restarted == ["switched to release 3"]
    state = Slots(tmp_path / "data").load()
    assert state.active is not None and (state.active.version, state.pending) == ("3", 0)
    assert state.staging is None and state.failed == ()


async def test_a_trial_commits_when_healthy_and_rolls_back_when_not(tmp_path: Path) -> None:
    for v in ("2", "3"):
        _publish(tmp_path, v)
    data = tmp_path / "data"
    node = Node("2")
    updater = Updater(data, CFG, source=lambda: DirectorySource(tmp_path / "repo"))
    updater.prepare()
    await asyncio.wait_for(updater.run(node), 30)  # stages 2, switches, asks for a restart

    # the restart: on trial, healthy for the window -> committed, then waits for news
    node = Node("2")
    updater = Updater(data, CFG, source=lambda: DirectorySource(tmp_path / "repo"))
    updater.prepare()
    assert updater.state.pending == 1
    assert updater.pipeline(node.desired())[0] is True
    task = asyncio.create_task(updater.run(node))
    for _ in range(100):
        if Slots(data).load().pending is None:
            break
        await asyncio.sleep(0.05)
    assert Slots(data).load() == machine.SlotState(
        active=machine.Release("a", "2", updater.state.active.digest))  # type: ignore[union-attr]
    # assigned 3: staged, switched; its restart fails the gate (an engine error)
    node.state = Desired("3")
    updater.notice()
    await asyncio.wait_for(task, 30)
    node = Node("3")
    node.engine = ("restarting", 2, "PluginError: boom", 0, 0)
    updater = Updater(data, CFG, source=lambda: DirectorySource(tmp_path / "repo"))
    updater.prepare()
    await asyncio.wait_for(updater.run(node), 30)
    assert node.restarted == ["rolled back release 3: the pipeline failed 0.0 s after the "
                              "start: PluginError: boom"]
    state = Slots(data).load()
    assert state.running_version == "2" and state.failed == ("3",)
    assert state.last_failure is not None and state.last_failure.phase == "gate"


async def test_a_missing_release_is_retried_and_a_bad_one_refused(tmp_path: Path) -> None:
    folder = write_release(tmp_path / "bad", {"pipelines/line.yaml": "kind: nonsense\n"})
    publish(folder, "9", tmp_path / "repo")
    node = Node("9")
    updater = Updater(tmp_path / "data", CFG, source=lambda: DirectorySource(tmp_path / "repo"))
    updater.prepare()
    task = asyncio.create_task(updater.run(node))
    for _ in range(100):
        if updater.state.failed:
            break
        await asyncio.sleep(0.05)
    assert updater.state.failed == ("9",)
    assert updater.state.last_failure is not None
    assert updater.state.last_failure.phase == "validate"
    assert "release 9 failed (validate)" in updater.status_text()
    # not yet published: tried again, never recorded as failed
    node.state = Desired("10")
    updater.notice()
    await asyncio.sleep(0.3)
    assert updater.state.failed == ("9",) and "release 10" in updater.phase
    assert not task.done() and node.restarted == []
    task.cancel()


async def test_a_stop_during_staging_ends_it_at_the_next_step(tmp_path: Path) -> None:
    folder = write_release(tmp_path / "r", {f"models/m{i}.bin": f"model {i}" for i in range(3)})
    publish(folder, "5", tmp_path / "repo")

    class Slow(DirectorySource):
        def fetch_blob(self, sha256: str, dest: Path) -> None:
            time.sleep(0.3)
            super().fetch_blob(sha256, dest)

    source = Slow(tmp_path / "repo")
    updater = Updater(tmp_path / "data", CFG, source=lambda: source)
    updater.prepare()
    task = asyncio.create_task(updater.run(Node("5")))
    await asyncio.sleep(0.15)  # inside the first download
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(0.6)  # the thread finishes that file, then stops
    assert source.fetches == 1
    state = Slots(tmp_path / "data").load()
    assert (state.active, state.staging, state.staging_version) == (None, "a", "5")
