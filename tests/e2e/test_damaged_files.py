"""Every file the agent keeps, damaged three ways, under the real ``edgewise agent run`` and
``edgewise agent status`` (docs/agent.md, *Damaged files*).

A node enrols with a real ``edgewise cloud serve``, sends data, is given a setpoint (so the
twin's files exist) and stops: that data directory is the template. Each case copies it, makes
one file empty, garbage or cut in half, then:

* ``agent status`` exits 0 (it is a view) with exactly one line on stderr naming the file;
* ``agent run --data`` either stops with exit 2 and exactly one line on stderr naming the file
  (the operator must restore it), or repairs what is safe to repair on its own, says so in
  exactly one line, connects and stops cleanly with exit 0 on SIGTERM;
* no output anywhere holds a Python traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgewise.testbed.system import ControlPlane, System, factory_pipeline, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CLI = [sys.executable, "-m", "edgewise.cli"]
GARBAGE = b"\xc1\xff\xfe\x00 not what was written \x9c\x80\xc1" * 8
STOP, REPAIR, QUIET = "stops with exit 2", "repairs it", "rewrites it silently"

# file -> what `agent run --data DIR` does when it is damaged
FILES = {
    "identity/node.key": STOP,
    "identity/node.pem": STOP,
    "identity/ca.pem": STOP,
    "identity/node_id": REPAIR,  # read again from node.pem
    "identity/cloud.json": STOP,
    "twin/desired.msgpack": REPAIR,  # the cloud's intent: pulled again
    "twin/reported.msgpack": STOP,  # setpoints written on site: the operator's data
    "uplink/ledger.msgpack": REPAIR,
    "uplink/refused.json": REPAIR,
    "status.json": QUIET,  # a view, rewritten every second
}
DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda data: b"",
    "garbage": lambda data: GARBAGE,
    "truncated": lambda data: data[: len(data.rstrip()) // 2],
}


@dataclass
class Template:
    cloud: ControlPlane
    data: Path
    node_id: str
    desired_version: int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


async def _wait(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    import asyncio

    tmp = tmp_path_factory.mktemp("damaged")
    loop = asyncio.new_event_loop()
    system = System(tmp)
    try:
        loop.run_until_complete(system.__aenter__())
        tpl = loop.run_until_complete(_make_template(system, tmp))
        yield tpl
    finally:
        loop.run_until_complete(system.__aexit__(None, None, None))
        loop.close()


async def _make_template(system: System, tmp: Path) -> Template:
    cloud = await system.start_cloud()
    pipe = tmp / "line.yaml"
    pipe.write_text(factory_pipeline(3000)[0])
    agent = await system.add_agent("node", pipe, await cloud.token({"site": "t"}), proxy=False)
    data = agent.data_dir
    status = data / "status.json"

    def linked() -> bool:
        return _read_json(status).get("link", {}).get("state") == "connected"

    await _wait("the node to enrol and connect", lambda: agent.node_id is not None and linked())
    node_id = agent.node_id
    assert node_id is not None
    await _wait("data sent", lambda: (data / "uplink" / "ledger.msgpack").exists())
    res = await run_cli("config", "set", "--data", str(cloud.data_dir), "--node", node_id,
                        "--setpoint", "mode=auto", "--json")
    assert res.returncode == 0, res.stderr
    version = json.loads(res.stdout)["nodes"][0]["version"]
    await _wait("the setpoint applied", lambda: (data / "twin" / "reported.msgpack").exists()
                and _read_json(status).get("twin", {}).get("applied_version") == version)
    assert await agent.stop() == 0
    # no chunk was refused by the control plane: write the file a refusal leaves behind
    (data / "uplink" / "refused.json").write_text(
        json.dumps({"999999": {"stream": "alarms", "records": 10, "reason": "test"}}))
    for rel in FILES:
        assert (data / rel).stat().st_size > 0, rel
    return Template(cloud, data, node_id, version)


def _naming(text: str, rel: str) -> list[str]:
    return [line for line in text.splitlines() if rel in line]


def _copy(template: Template, tmp_path: Path, rel: str, damage: str) -> Path:
    data = tmp_path / "node"
    shutil.copytree(template.data, data, symlinks=True)
    target = data / rel
    target.write_bytes(DAMAGES[damage](target.read_bytes()))
    return data


def _status(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "agent", "status", "--data", str(data), "--json"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _run_agent(data: Path, template: Template, outcome: str) -> tuple[int | None, str, str]:
    """``agent run --data DIR``: wait for its exit, or for it to connect and then SIGTERM."""
    err_path, out_path = data.parent / "agent.err", data.parent / "agent.out"
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen([*CLI, "agent", "run", "--data", str(data)], stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + (20 if outcome == STOP else 40)
        status = data / "status.json"
        while time.monotonic() < deadline and proc.poll() is None:
            st = _read_json(status)
            if (outcome != STOP and st.get("pid") == proc.pid
                    and st.get("link", {}).get("state") == "connected"
                    and st.get("twin", {}).get("applied_version") == template.desired_version):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.1)
        code = proc.poll() if outcome == STOP else proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


LONG = os.environ.get("EDGEWISE_LONG_TESTS") == "1"


def cases() -> list[Any]:
    """Every file with every damage under EDGEWISE_LONG_TESTS=1; by default every file with one
    damage (the three kinds in turn), to keep the default suite short."""
    kinds = list(DAMAGES)
    return [pytest.param(rel, damage, marks=() if LONG or damage == kinds[i % len(kinds)]
                         else pytest.mark.skip(reason="the whole matrix runs with "
                                               "EDGEWISE_LONG_TESTS=1"))
            for i, rel in enumerate(FILES) for damage in kinds]


@pytest.mark.parametrize(("rel", "damage"), cases())
def test_agent_status_names_a_damaged_file_in_one_line(
    template: Template, tmp_path: Path, rel: str, damage: str,
) -> None:
    data = _copy(template, tmp_path, rel, damage)
    status = _status(data)
    output = status.stdout + status.stderr
    assert "Traceback" not in output, output
    assert status.returncode == 0, output
    lines = _naming(status.stderr, rel)
    assert len(lines) == 1 and lines[0].startswith("warning: "), status.stderr
    shown = json.loads(status.stdout)
    assert shown["node_id"] == template.node_id
    assert rel in shown["problem"]


@pytest.mark.parametrize(("rel", "damage"), cases())
def test_agent_run_stops_in_one_line_or_repairs_a_damaged_file(
    template: Template, tmp_path: Path, rel: str, damage: str,
) -> None:
    outcome = FILES[rel]
    data = _copy(template, tmp_path, rel, damage)
    code, out, err = _run_agent(data, template, outcome)
    assert "Traceback" not in out + err, err
    lines = _naming(err, rel)
    if outcome == STOP:
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert (data / rel).read_bytes() == DAMAGES[damage]((template.data / rel).read_bytes())
    else:
        assert code == 0, err
        assert len(lines) == (0 if outcome == QUIET else 1), err
    if rel == "identity/node_id":
        assert (data / rel).read_text().strip() == template.node_id
    if outcome == REPAIR:  # what can be read again is, the next start is quiet
        code, _, err = _run_agent(data, template, outcome)
        assert code == 0 and _naming(err, rel) == [], err
