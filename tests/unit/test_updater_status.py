"""The release block of the agent's status: written by the agent, read back by `agent status`
(JSON and table), and the release line of the reported state."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from edgewise.cli.agent import status_tables
from edgewise.edge.agent import Agent, AgentConfig
from edgewise.edge.status import read_status, write_status
from edgewise.edge.updater import machine
from edgewise.edge.updater.store import Slots


def test_release_block_round_trip_and_table(tmp_path: Path) -> None:
    data = tmp_path / "node"
    agent = Agent(AgentConfig(data_dir=data))
    assert "release" not in agent.status().to_json()  # nothing to say yet
    assert agent.updater.status_text() == ""
    failure = machine.Failure("1.2", "gate", "the health probe failed: sh exited with code 3",
                              1000.0)
    Slots(data).save(machine.SlotState(last_failure=failure, failed=("1.2",)))
    agent.updater.prepare()
    write_status(data, agent.status())
    written = json.loads((data / "status.json").read_text())["release"]
    assert written == {"running": None, "slot": None, "state": "none", "previous": None,
                       "phase": "idle", "failed": ["1.2"], "last_failure": failure.to_json()}
    st = read_status(data)
    assert st.release is not None and st.release.failed == ["1.2"]
    assert st.to_json()["release"] == written
    console = Console(width=200, record=True)
    console.print(status_tables(st)[0])
    text = console.export_text()
    assert "release               none (none)" in text
    assert "last release failure  1.2 (gate): the health probe failed: sh exited with code 3" \
        in text
    assert agent.updater.status_text() == (
        "no release; release 1.2 failed (gate): the health probe failed: sh exited with code 3")
