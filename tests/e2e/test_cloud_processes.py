"""`edgewise cloud serve --processes 2` as a real process tree on PostgreSQL (issue 11,
scale-out): both serving processes answer on the one port; one killed with SIGKILL is started
again by the supervisor while the other keeps serving; SIGTERM stops them all, with nothing
left running; a port the processes cannot take stops the supervisor at once with the error,
instead of a restart loop. What the processes tell each other: tests/integration/
test_replicas.py; a fleet over both: tests/e2e/test_fleet_sim.py."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from edgewise.security.tls import client_context
from edgewise.testbed.fleet.stats import process_tree
from edgewise.testbed.system import ControlPlane, free_port

pytestmark = pytest.mark.asyncio


async def answering(cp: ControlPlane, want: int = 2, tries: int = 300) -> dict[int, int]:
    """process index -> its pid's answer count, from /healthz on new connections."""
    seen: dict[int, int] = {}
    ctx = client_context(cp.ca)
    for _ in range(tries):
        try:
            async with httpx.AsyncClient(verify=ctx, timeout=5.0) as http:
                body = (await http.get(f"{cp.url}/healthz")).json()
        except httpx.TransportError:
            await asyncio.sleep(0.05)
            continue
        seen[body["process"]] = seen.get(body["process"], 0) + 1
        if len(seen) >= want:
            break
    return seen


async def test_two_processes_serve_one_port_and_a_dead_one_comes_back(
        tmp_path: Path, postgres: str) -> None:
    cp = ControlPlane(tmp_path / "cloud", free_port(), tmp_path,
                      ("--db", postgres, "--processes", "2"))
    try:
        await cp.start()
        supervisor = cp.child.pid
        assert supervisor is not None
        assert sorted(await answering(cp)) == [0, 1]
        serving = [p for p in process_tree(supervisor) if p != supervisor]
        assert len(serving) == 2
        os.kill(serving[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = [p for p in process_tree(supervisor) if p != supervisor]
            if len(now) == 2 and serving[1] not in now:
                break
            assert time.monotonic() < deadline, cp.child.log_tail()
            await asyncio.sleep(0.1)
        assert sorted(await answering(cp)) == [0, 1]
        log = cp.child.log.read_text()
        assert f"(pid {serving[1]}) exited with code -9; starting it again in 1 s" in log
        cp.child.proc.send_signal(signal.SIGTERM)  # the supervisor alone, as systemd would
        assert await cp.child.wait(30) == 0, cp.child.log_tail()
        for pid in now:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
        assert "Traceback" not in cp.child.log.read_text()
    finally:
        cp.close()
        await cp.stop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_port_the_processes_cannot_take_stops_the_supervisor(
        tmp_path: Path, postgres: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody may share it
    holder.listen()
    port = holder.getsockname()[1]
    cp = ControlPlane(tmp_path / "cloud", port, tmp_path, ("--db", postgres, "--processes", "2"))
    try:
        cp.child.start()
        code = await cp.child.wait(60)
        log = cp.child.log.read_text()
        assert code == 2, log
        assert f"cannot listen on 127.0.0.1:{port}" in log
        assert "exited with code 2 at start; stopping the others" in log
        assert "starting it again" not in log
    finally:
        holder.close()
        cp.close()
        await cp.stop()
