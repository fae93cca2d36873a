"""A control plane and edge agents as real processes on this machine, each agent behind its own
link proxy: the building blocks of `edgewise demo`, the end-to-end system tests and the sync
benchmarks.

`System` starts ``edgewise cloud serve`` on a free port, enrols agents (``edgewise agent run``)
with one-time tokens through their own `LinkProxy`, and stops everything: every child runs in its
own session and gets SIGTERM if this process dies (``PR_SET_PDEATHSIG``, Linux); stopping sends
SIGTERM, then SIGKILL after a grace period. The helpers compute the factory-line pipeline for a
run and the JSON-over-MQTT baseline of its bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.errors import ConfigError, EdgewiseError
from edgewise.testbed.linkproxy import LinkProxy

if TYPE_CHECKING:
    from edgewise.edge.status_model import NodeStatus

CLI: tuple[str, ...] = (sys.executable, "-m", "edgewise.cli")
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "factory-line.yaml"
PR_SET_PDEATHSIG = 1


class DemoError(EdgewiseError):
    """A process of the demo failed to start or stopped unexpectedly."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send SIGTERM to the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def setup() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return setup


# -- processes --------------------------------------------------------------------------------


class ChildProcess:
    """One child process in its own session; output to a log file; stopped as a group."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})}, cwd=self.cwd,
                start_new_session=True, preexec_fn=_die_with_parent(),
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.returncode

    async def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.proc is None:
            return None
        if self.running:
            self.signal(signal.SIGTERM)
            if await self.wait(grace) is None:
                self.kill()
                await self.wait(5.0)
        self.signal(signal.SIGKILL)  # anything the child left in its group
        return self.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


async def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``edgewise ARGS`` to completion (in a worker thread); output captured."""
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class ControlPlane:
    """``edgewise cloud serve --data DIR --port PORT`` as a child process."""

    def __init__(self, data_dir: Path, port: int, logs: Path,
                 extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.child = ChildProcess(
            "cloud", [*CLI, "cloud", "serve", "--data", str(data_dir), "--port", str(port),
                      *extra_args], logs / "cloud.log")
        self._operator: Any = None

    @property
    def ca(self) -> Path:
        return self.data_dir / "pki" / "ca.pem"

    @property
    def cli_config(self) -> Path:
        return self.data_dir / "cli.json"

    async def start(self, timeout: float = 60.0) -> None:
        """Start and wait until ``/healthz`` answers over TLS. Raises `DemoError` with the
        log's tail if it exits or does not answer in time."""
        import httpx

        from edgewise.security.tls import client_context

        self.child.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.running:
                raise DemoError(f"edgewise cloud serve exited with code {self.child.returncode}:"
                                f"\n{self.child.log_tail()}")
            if self.ca.exists() and self.cli_config.exists():
                try:
                    async with httpx.AsyncClient(verify=client_context(self.ca),
                                                 timeout=2.0) as http:
                        if (await http.get(f"{self.url}/healthz")).status_code == 200:
                            return
                except httpx.TransportError:
                    pass
            await asyncio.sleep(0.1)
        raise DemoError(f"edgewise cloud serve did not answer within {timeout:.0f} s:\n"
                        f"{self.child.log_tail()}")

    async def stop(self) -> int | None:
        return await self.child.stop()

    def operator(self) -> Any:
        """The operator API client (`edgewise.cloud.client.OperatorClient`), admin token."""
        from edgewise.cloud.client import OperatorClient

        if self._operator is None:
            self._operator = OperatorClient.from_file(self.cli_config, timeout=10.0)
        return self._operator

    def close(self) -> None:
        if self._operator is not None:
            self._operator.close()
            self._operator = None

    async def token(self, labels: dict[str, str], uses: int = 1, ttl: str = "1h") -> str:
        """A one-time enrolment token, made with the real ``edgewise cloud token create``."""
        text = ",".join(f"{k}={v}" for k, v in labels.items())
        res = await run_cli("cloud", "token", "create", "--data", str(self.data_dir),
                            "--labels", text, "--uses", str(uses), "--ttl", ttl, "--json")
        if res.returncode != 0:
            raise DemoError(f"edgewise cloud token create failed: {res.stderr.strip()}")
        return str(json.loads(res.stdout)["token"])

    async def stats(self) -> dict[tuple[str, str], Any]:
        """Per (node, stream) the control plane's `StreamStat` (records stored, marks)."""
        resp = await asyncio.to_thread(self.operator().data_stats)
        return {(s.node, s.stream): s for s in resp.streams}


class AgentProcess:
    """``edgewise agent run`` as a child process, connected through ``link``."""

    def __init__(self, name: str, data_dir: Path, logs: Path, pipeline: Path,
                 cloud: ControlPlane, link: LinkProxy | None,
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.data_dir = data_dir
        self.pipeline = pipeline
        self.cloud = cloud
        self.link = link
        self.extra_args = list(extra_args)
        self.log = logs / f"{name}.log"
        self.child: ChildProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        port = self.link.port if self.link is not None else self.cloud.port
        return f"https://127.0.0.1:{port}"

    def start(self, token: str | None = None) -> None:
        """Start (again); the first start needs the enrolment token."""
        argv = [*CLI, "agent", "run", "--data", str(self.data_dir), "--cloud", self.url,
                "--ca", str(self.cloud.ca), "--pipeline", str(self.pipeline), *self.extra_args]
        env = {"EDGEWISE_ENROL_TOKEN": token} if token else None
        self.child = ChildProcess(self.name, argv, self.log, env=env, cwd=self.data_dir.parent)
        self.child.start()
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    @property
    def node_id(self) -> str | None:
        try:
            return (self.data_dir / "identity" / "node_id").read_text().strip() or None
        except OSError:
            return None

    def status(self) -> NodeStatus:
        """What ``edgewise agent status`` shows (read in this process; ``.to_json()`` is what
        ``--json`` prints)."""
        from edgewise.edge.status import read_status

        return read_status(self.data_dir)

    async def stop(self) -> int | None:
        return await self.child.stop() if self.child is not None else None

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()


class System:
    """A control plane, agents and their link proxies, all stopped on exit (also on errors
    and cancellation): ``async with System(workdir) as system: ...``. ``cloud``: a control
    plane started elsewhere (shared by several system tests), used but neither stopped nor
    killed here."""

    def __init__(self, workdir: Path, cloud: ControlPlane | None = None) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.cloud: ControlPlane | None = cloud
        self._own_cloud = cloud is None
        self.agents: list[AgentProcess] = []
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> System:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.gather(*(a.stop() for a in self.agents))
            if self.cloud is not None and self._own_cloud:
                self.cloud.close()
                await self.cloud.stop()
        finally:
            self.kill_all()
            await self._stack.aclose()

    def kill_all(self) -> None:
        """SIGKILL every process group started here (safe from a signal handler)."""
        for a in self.agents:
            a.kill()
        if self.cloud is not None and self._own_cloud:
            self.cloud.child.kill()

    async def start_cloud(self, port: int | None = None,
                          extra_args: Sequence[str] = ()) -> ControlPlane:
        self._own_cloud = True
        self.cloud = ControlPlane(self.workdir / "cloud", port or free_port(), self.logs,
                                  extra_args)
        await self.cloud.start()
        return self.cloud

    async def restart_cloud(self) -> int | None:
        """SIGTERM the control plane, then start it again on the same directory and port."""
        assert self.cloud is not None
        code = await self.cloud.stop()
        self.cloud.child = ChildProcess("cloud", self.cloud.child.argv, self.cloud.child.log)
        await self.cloud.start()
        return code

    async def add_agent(self, name: str, pipeline: Path, token: str, *, proxy: bool = True,
                        extra_args: Sequence[str] = ()) -> AgentProcess:
        """Start an agent (enrolling with ``token``) behind its own link proxy."""
        assert self.cloud is not None, "start the control plane first"
        link = None
        if proxy:
            link = await self._stack.enter_async_context(LinkProxy("127.0.0.1",
                                                                   self.cloud.port))
        agent = AgentProcess(name, self.workdir / name, self.logs, pipeline, self.cloud, link,
                             extra_args)
        self.agents.append(agent)
        agent.start(token)
        return agent


def link_state(status: NodeStatus) -> str:
    return status.link_state


# -- the pipeline and the baseline ---------------------------------------------------------


def find_example() -> Path:
    if EXAMPLE.is_file():
        return EXAMPLE
    raise ConfigError(f"{EXAMPLE} not found (an installed copy without the examples?); "
                      "pass --pipeline FILE with a factory-line pipeline")


def factory_pipeline(readings: int | None, source: Path | None = None, *,
                     stages: Sequence[dict[str, Any]] = (),
                     sinks: Sequence[dict[str, Any]] = ()) -> tuple[str, int]:
    """The pipeline YAML of ``source`` (default: the factory-line example) with its simulator
    limited to ``readings`` (None: unlimited) and ``stages``/``sinks`` added; and the
    simulator's seed."""
    import yaml

    path = source or find_example()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        sims = [s for s in doc["spec"]["sources"] if s.get("type") == "simulator"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a pipeline with a simulator source: {exc}") from None
    if len(sims) != 1:
        raise ConfigError(f"{path}: the demo needs exactly one simulator source")
    if readings is not None:
        sims[0]["limit"] = int(readings)
    doc["spec"]["stages"] = [*doc["spec"].get("stages", []), *stages]
    doc["spec"]["sinks"] = [*doc["spec"].get("sinks", []), *sinks]
    return yaml.safe_dump(doc, sort_keys=False), int(sims[0].get("seed", 42))


def mqtt_packet_bytes(topic: str, payload: bytes) -> int:
    """An MQTT 3.1.1 QoS 0 PUBLISH: fixed header, topic length and topic, payload (as
    benchmarks/edge_pipeline.py counts it)."""
    body = 2 + len(topic.encode()) + len(payload)
    length_bytes = 1 if body < 128 else 2 if body < 16384 else 3
    return 1 + length_bytes + body


def json_mqtt_baseline(readings: int, seed: int = 42, chunk: int = 100_000) -> int:
    """Bytes of one JSON MQTT message per reading for the first ``readings`` factory-line
    readings of ``seed``: the NDJSON line of `sim.signals.write_ndjson` as the payload and
    ``factory/<sensor>`` as the topic, exactly as benchmarks/edge_pipeline.py computes it."""
    import numpy as np

    from edgewise.sim.signals import factory_line

    sig = factory_line(seed)
    start_ts = 1_764_547_200.0  # write_ndjson's default; every ts has the same width
    total = 0
    for first in range(0, readings, chunk):
        k = min(chunk, readings - first)
        s, t, v = sig.readings(first, k)
        ts = np.round(start_ts + t / sig.rate_hz, 2)
        for n, a, b in zip(sig.names[s].tolist(), ts.tolist(), v.tolist(), strict=True):
            payload = f'{{"sensor":"{n}","ts":{a:.2f},"value":{b:.2f}}}'.encode()
            total += mqtt_packet_bytes(f"factory/{n}", payload)
    return total


def durable_readings(data_dir: Path) -> int | None:
    """Readings the node's engine has durably consumed: the simulator positions in the
    engine checkpoint of its outbox (read-only; exact across restarts). None if unknown."""
    import sqlite3

    from edgewise.edge.status import outbox_path
    from edgewise.pipeline import checkpoint as ckpt

    path = outbox_path(data_dir)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM checkpoint WHERE key = 'engine'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    positions = ckpt.unpack(row[0]).get("positions") or {}
    counts = []
    for entry in positions.values():  # {"digest": ..., "position": {"produced": N, ...}}
        pos = entry.get("position") if isinstance(entry, dict) else None
        if isinstance(pos, dict) and isinstance(pos.get("produced"), int):
            counts.append(pos["produced"])
    return sum(counts) if counts else None


def sink_p99(status: NodeStatus) -> float | None:
    """The largest accept-to-action p99 (ms) of the engine's local sinks, if reported."""
    sinks = (status.engine.sinks if status.engine is not None else None) or {}
    values = [s.p99_ms for s in sinks.values() if s.p99_ms is not None]
    return max(values) if values else None


# -- the demo -------------------------------------------------------------------------------
