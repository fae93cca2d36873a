"""The demo run behind `edgewise demo` (flags: `edgewise.cli.demo`): the whole system on this
machine, one link cut, every record checked.

In a temporary directory (or ``--keep DIR``) it starts, as real processes:

* ``edgewise cloud serve`` on a free port of 127.0.0.1;
* ``--agents`` edge agents (``edgewise agent run``), each running the factory line
  (``examples/factory-line.yaml``: 200 sensors at 50 Hz, 10,000 readings/s) for ``--duration``
  seconds of readings (the simulator's ``limit``), each enrolled with its own one-time token
  (``edgewise cloud token create``) and connected through its own `LinkProxy`, which runs in
  this process, counts the bytes on the wire (TLS included) and can cut the link.

It prints the operator console's address (``https://127.0.0.1:PORT/console``) and a viewer token
made with ``edgewise token create --role viewer`` (``--open``: opens it in the browser); the
console is there while the demo runs (``--hold SECONDS``: the control plane stays up that long
after the agents stop).

Then it cuts one agent's link (a blackhole) for ``--cut-seconds``, restores it, waits until
every outbox has drained and the control plane holds every record, stops the agents gracefully
and prints one row per node: readings, alarms, the local alarm latency p99, records produced
against records stored in the cloud, and bytes on the wire per reading against one JSON message
per reading over MQTT. The exit code is 0 only if every node's counts match.

Every child runs in its own session (process group) and gets SIGTERM if this process dies
(``PR_SET_PDEATHSIG``, Linux). Ctrl-C or SIGTERM stops them all: SIGTERM, then SIGKILL after a
grace period; a second Ctrl-C kills them at once.

The building blocks (`System`, `ControlPlane`, `AgentProcess`, `factory_pipeline`,
`json_mqtt_baseline`, ...) live in `edgewise.testbed.system`, shared with the end-to-end tests and
the sync benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgewise.edge.status_model import NodeStatus, StreamStatus
from edgewise.errors import ConfigError, EdgewiseError
from edgewise.testbed.system import (
    AgentProcess,
    DemoError,
    System,
    durable_readings,
    factory_pipeline,
    json_mqtt_baseline,
    link_state,
    run_cli,
    sink_p99,
)


@dataclass
class NodeView:
    """What the demo knows about one node while it runs and at the end."""

    agent: AgentProcess
    status: NodeStatus | None = None  # the last one read
    readings: int = 0
    alarms: int = 0
    p99_ms: float | None = None
    engine_state: str = "-"
    cut: tuple[float, float] | None = None  # monotonic cut and restore times
    reconnected_after_s: float | None = None
    drained_after_s: float | None = None
    final: dict[str, Any] = field(default_factory=dict)

    def update(self, status: NodeStatus) -> None:
        self.status = status
        eng = status.engine
        if eng is not None:
            self.engine_state = eng.state or "-"
            self.readings = max(self.readings, eng.readings_in or 0)
            self.alarms = max(self.alarms, eng.alarms or 0)
        else:
            self.engine_state = "-"
        p99 = sink_p99(status)
        if p99 is not None:
            self.p99_ms = p99

    def link_state(self) -> str:
        return link_state(self.status) if self.status is not None else "-"

    def streams(self) -> dict[str, StreamStatus]:
        return dict(self.status.streams) if self.status is not None else {}

    def pending(self) -> int:
        return sum(s.pending for s in self.streams().values())

    def acked(self) -> int:
        return sum(s.acknowledged for s in self.streams().values())

    def produced(self) -> int:
        return sum(s.produced for s in self.streams().values())


@dataclass(frozen=True)
class DemoOptions:
    agents: int = 3
    cut_seconds: float = 20.0
    duration: float = 60.0
    keep: Path | None = None
    pipeline: Path | None = None
    open_console: bool = False  # open the console in the browser
    hold: float = 0.0  # seconds the control plane stays up after the agents stop


class Demo:
    def __init__(self, opts: DemoOptions, console: Console) -> None:
        self.opts = opts
        self.console = console
        self.phase = "starting"
        self.t0 = time.monotonic()
        self.nodes: list[NodeView] = []
        self.cloud_stats: dict[tuple[str, str], Any] = {}
        self.system: System | None = None
        self._last_phase_line = ""

    # -- progress ---------------------------------------------------------------------------
    def set_phase(self, text: str) -> None:
        self.phase = text
        if not self.console.is_terminal and text != self._last_phase_line:
            self.console.print(f"[{time.monotonic() - self.t0:5.1f} s] {escape(text)}",
                               highlight=False, soft_wrap=True)
        self._last_phase_line = text

    def progress(self) -> Group:
        """The live view: one row per node (fits 80 columns)."""
        t = Table(box=None, title=None, padding=(0, 1))
        for col in ("node", "link", "pipeline", "readings", "alarms", "outbox", "in cloud",
                    "wire B"):
            t.add_column(col, justify="left" if col in ("node", "link", "pipeline") else "right",
                         no_wrap=True)
        for n in self.nodes:
            link = n.agent.link
            state = n.link_state()
            cut = link is not None and link.state != "up"
            stored = sum(s.records_stored for (node, _), s in self.cloud_stats.items()
                         if node == n.agent.node_id)
            wire = f"{link.stats.bytes_up + link.stats.bytes_down:,}" if link is not None \
                else "-"
            t.add_row(n.agent.name, ("[bold red]CUT[/] " if cut else "") + escape(state),
                      n.engine_state, f"{n.readings:,}", f"{n.alarms:,}", f"{n.pending():,}",
                      f"{stored:,}", wire)
        head = Text.from_markup(f"[bold]edgewise demo[/] {time.monotonic() - self.t0:5.1f} s: "
                                f"{escape(self.phase)}")
        return Group(head, t)

    async def poll(self, stats: bool = True) -> None:
        import httpx

        statuses = await asyncio.gather(
            *(asyncio.to_thread(n.agent.status) for n in self.nodes), return_exceptions=True)
        for n, st in zip(self.nodes, statuses, strict=True):
            if not isinstance(st, BaseException):
                n.update(st)
        if stats and self.system is not None and self.system.cloud is not None:
            with contextlib.suppress(EdgewiseError, httpx.HTTPError):
                self.cloud_stats = await self.system.cloud.stats()

    async def refresher(self, live: Live | None) -> None:
        while True:
            await self.poll()
            for n in self.nodes:
                if n.agent.child is not None and not n.agent.running and \
                        self.phase != "stopping the agents":
                    raise DemoError(f"agent {n.agent.name} exited with code "
                                    f"{n.agent.child.returncode}:\n{n.agent.child.log_tail()}")
            if live is not None:
                live.update(self.progress())
            await asyncio.sleep(0.5)

    # -- the run ----------------------------------------------------------------------------
    async def run(self, system: System) -> bool:
        opts = self.opts
        self.system = system
        work = system.workdir
        self.set_phase("starting the control plane")
        cloud = await system.start_cloud()
        await self.console_address(cloud)
        rate = 10_000
        readings = round(opts.duration * rate)
        text, seed = factory_pipeline(readings, opts.pipeline)
        pipeline = work / "factory-line.yaml"
        pipeline.write_text(text, encoding="utf-8")
        self.set_phase(f"making {opts.agents} one-time enrolment tokens")
        tokens = await asyncio.gather(*(cloud.token({"demo": "edgewise", "node": f"edge-{i}"})
                                        for i in range(1, opts.agents + 1)))
        self.set_phase(f"starting {opts.agents} agents (factory line, {rate:,} readings/s, "
                       f"{readings:,} readings each)")
        for i, token in enumerate(tokens, start=1):
            agent = await system.add_agent(f"edge-{i}", pipeline, token)
            self.nodes.append(NodeView(agent))
        baseline_task = asyncio.create_task(asyncio.to_thread(json_mqtt_baseline, readings,
                                                              seed))
        try:
            await self._run_phases(readings)
            per_reading_base = await baseline_task / readings
        finally:
            if not baseline_task.done():
                baseline_task.cancel()
                with contextlib.suppress(BaseException):
                    await baseline_task
        await self._finish(system, per_reading_base)
        if opts.hold > 0:
            self.set_phase(f"the control plane stays up {opts.hold:.0f} s for the console "
                           "(Ctrl-C ends it)")
            await asyncio.sleep(opts.hold)
        return all(self._node_ok(n) for n in self.nodes)

    async def console_address(self, cloud: Any) -> None:
        """Print the console's address and a viewer token; open it with ``--open``."""
        res = await run_cli("token", "create", "demo-viewer", "--role", "viewer", "--ttl",
                            "12h", "--data", str(cloud.data_dir), "--json")
        if res.returncode != 0:
            raise DemoError(f"edgewise token create failed: {res.stderr.strip()}")
        token = json.loads(res.stdout)["token"]
        url = f"{cloud.url}/console"
        self.console.print(f"console: {url}  viewer token: {token}", highlight=False,
                           soft_wrap=True)
        self.console.print(f"  (the browser does not know this control plane's CA: trust "
                           f"{cloud.ca} or accept its warning)", highlight=False,
                           soft_wrap=True)
        if self.opts.open_console:
            import webbrowser

            webbrowser.open(url)

    async def _run_phases(self, readings: int) -> None:
        opts = self.opts
        live = Live(self.progress(), console=self.console, refresh_per_second=4,
                    transient=False) if self.console.is_terminal else None
        with live if live is not None else contextlib.nullcontext():
            refresher = asyncio.create_task(self.refresher(live))
            try:
                await self._scenario(readings, opts, refresher)
            finally:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            if live is not None:
                live.update(self.progress())

    async def _watch(self, refresher: asyncio.Task[None], check: Callable[[], bool],
                     timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if refresher.done():
                refresher.result()  # re-raises the failure it saw
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
            await asyncio.sleep(0.2)

    async def _scenario(self, readings: int, opts: DemoOptions,
                        refresher: asyncio.Task[None]) -> None:
        nodes = self.nodes
        self.set_phase("enrolling (CSR with the token, client certificate back) and connecting")
        await self._watch(refresher, lambda: all(
            n.link_state() == "connected" and n.engine_state == "running" for n in nodes),
            60, "every agent to enrol, connect and start its pipeline")
        start = time.monotonic()
        victim = nodes[1] if len(nodes) > 1 else nodes[0]
        if opts.cut_seconds > 0:
            cut_at = max(3.0, (opts.duration - opts.cut_seconds) / 3)
            self.set_phase(f"running; the link of {victim.agent.name} is cut in {cut_at:.0f} s")
            await self._watch(refresher, lambda: time.monotonic() - start >= cut_at,
                              cut_at + 5, "the time of the cut")
            assert victim.agent.link is not None
            victim.agent.link.cut("blackhole")
            t_cut = time.monotonic()
            self.set_phase(f"link of {victim.agent.name} CUT (blackhole) for "
                           f"{opts.cut_seconds:.0f} s; its pipeline and local alarms go on")
            await self._watch(refresher, lambda: time.monotonic() - t_cut >= opts.cut_seconds,
                              opts.cut_seconds + 5, "the end of the cut")
            acked_at_restore = victim.acked()
            victim.agent.link.restore()
            t_restore = time.monotonic()
            victim.cut = (t_cut, t_restore)
            self.set_phase(f"link of {victim.agent.name} restored; reconnecting and draining "
                           "its backlog (alarms first)")
            await self._watch(refresher, lambda: victim.link_state() == "connected"
                              and victim.acked() > acked_at_restore, 90,
                              f"{victim.agent.name} to reconnect")
            victim.reconnected_after_s = time.monotonic() - t_restore
            await self._watch(refresher, lambda: self._drained(victim), 120,
                              f"{victim.agent.name} to drain its backlog")
            victim.drained_after_s = time.monotonic() - t_restore
        self.set_phase(f"running until each pipeline has read its {readings:,} readings")
        await self._watch(refresher, lambda: all(n.engine_state == "finished" for n in nodes),
                          opts.duration * 3 + 60, "the pipelines to finish")
        self.set_phase("pipelines finished; waiting until every outbox has drained")
        await self._watch(refresher, lambda: all(self._drained(n, final=True) for n in nodes),
                          120, "every outbox to drain into the cloud")

    def _drained(self, n: NodeView, final: bool = False) -> bool:
        streams = n.streams()
        if not streams or n.pending() != 0:
            return False
        if not final:
            return True
        node = n.agent.node_id
        for name, s in streams.items():
            cloud = self.cloud_stats.get((node or "", name))
            if cloud is None or cloud.records_stored != s.produced:
                return False
        return True

    async def _finish(self, system: System, per_reading_base: float) -> None:
        self.set_phase("stopping the agents (SIGTERM: a graceful stop)")
        await self.poll()
        codes = await asyncio.gather(*(n.agent.stop() for n in self.nodes))
        for n, code in zip(self.nodes, codes, strict=True):
            if code != 0:
                raise DemoError(f"agent {n.agent.name} exited with code {code}:\n"
                                f"{n.agent.child.log_tail() if n.agent.child else ''}")
        await self.poll()
        for n in self.nodes:
            n.final = {"base_per_reading": per_reading_base}
            durable = await asyncio.to_thread(durable_readings, n.agent.data_dir)
            if durable is not None:
                n.readings = durable
            alarms = n.streams().get("alarms")
            if alarms is not None:  # the factory line's alarm stream: one record per alarm
                n.alarms = alarms.produced
        self.set_phase("done")

    def _node_ok(self, n: NodeView) -> bool:
        node = n.agent.node_id or ""
        streams = n.streams()
        if not streams:
            return False
        for name, s in streams.items():
            c = self.cloud_stats.get((node, name))
            if c is None or c.records_stored != s.produced or c.lost_records != 0 \
                    or c.contiguous_mark != s.produced or s.pending or s.dropped:
                return False
        return True

    def table(self) -> Table:
        """One column per node, one row per figure (fits a narrow terminal)."""
        t = Table(title="edgewise demo: per node", box=box.SIMPLE_HEAD)
        t.add_column("", no_wrap=True)
        for n in self.nodes:
            t.add_column(n.agent.name, justify="right", no_wrap=True)
        rows: dict[str, list[str]] = {k: [] for k in (
            "node id", "readings", "alarms", "alarm p99, local", "link cut",
            "records produced", "stored in cloud", "exactly once", "wire bytes",
            "B/reading, wire", "B/reading, JSON", "wire vs JSON")}
        for n in self.nodes:
            node = n.agent.node_id or "-"
            stored = sum(s.records_stored for (nd, _), s in self.cloud_stats.items()
                         if nd == node)
            link = n.agent.link
            wire = link.stats.bytes_up + link.stats.bytes_down if link is not None else 0
            base = float(n.final.get("base_per_reading") or 0.0)
            per = wire / n.readings if n.readings else 0.0
            cut = "-" if n.cut is None else f"{n.cut[1] - n.cut[0]:.0f} s (blackhole)"
            values = [
                node, f"{n.readings:,}", f"{n.alarms:,}",
                f"{n.p99_ms:.2f} ms" if n.p99_ms is not None else "not reported", cut,
                f"{n.produced():,}", f"{stored:,}",
                "[green]OK[/]" if self._node_ok(n) else "[bold red]MISMATCH[/]",
                f"{wire:,} B", f"{per:.3f} B", f"{base:.1f} B",
                f"{per / base:.2%}" if base else "-",
            ]
            for key, value in zip(rows, values, strict=True):
                rows[key].append(value)
        for key, values in rows.items():
            t.add_row(key, *values)
        return t

    def notes(self) -> list[str]:
        out = []
        for n in self.nodes:
            if n.cut is None:
                continue
            t_cut, t_restore = n.cut
            line = (f"{n.agent.name}: link cut (blackhole) for {t_restore - t_cut:.1f} s; ")
            if n.reconnected_after_s is not None:
                line += f"session back {n.reconnected_after_s:.1f} s after the restore, "
            if n.drained_after_s is not None:
                line += f"backlog drained {n.drained_after_s:.1f} s after it"
            out.append(line)
        out.append("wire: bytes counted by each node's link proxy, both directions (TLS, "
                   "WebSocket framing, heartbeats, enrolment included); JSON: one JSON message "
                   "per reading over MQTT (the baseline of benchmarks/edge_pipeline.py)")
        return out


async def run_demo(opts: DemoOptions, console: Console, progress: Console) -> int:
    """Run the demo; the exit code (0: every node's counts match). The result goes to
    ``console``, progress and problems to ``progress``."""
    if opts.agents < 1:
        raise ConfigError("--agents must be at least 1")
    if opts.duration <= 0 or opts.cut_seconds < 0:
        raise ConfigError("--duration must be positive and --cut-seconds not negative")
    if opts.keep is not None:
        if opts.keep.exists() and any(opts.keep.iterdir()):
            raise ConfigError(f"--keep {opts.keep}: the directory is not empty")
        work = opts.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="edgewise-demo-"))
    demo = Demo(opts, progress)
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    interrupted: list[int] = []
    system = System(work)

    def on_signal(sig: int) -> None:
        interrupted.append(sig)
        if len(interrupted) == 1:
            main.cancel()
        else:
            system.kill_all()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with system:
            ok = await demo.run(system)
        console.print(demo.table())
        for line in demo.notes():
            console.print(escape(line), highlight=False)
        console.print(f"logs and data: {work}" if opts.keep else "temporary directory removed")
        return 0 if ok else 1
    except asyncio.CancelledError:
        if not interrupted:
            raise
        progress.print("interrupted: every process the demo started is stopped")
        return 130
    except DemoError as exc:
        progress.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        progress.print(f"logs: {work / 'logs'}" if opts.keep else
                       "run with --keep DIR to keep the logs")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if opts.keep is None:
            shutil.rmtree(work, ignore_errors=True)
