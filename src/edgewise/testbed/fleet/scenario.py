"""The fleet-scale scenario: a real control plane, the simulator, and the phases of issue 11.

`run_scenario` starts ``edgewise cloud serve`` (`testbed.system.ControlPlane`, SQLite or
``--db``), makes one enrolment token for the whole fleet through the operator API (labels
``fleet=<run>``), starts ``edgewise sim fleet`` as a child process writing its events file,
and follows that file (`Events`) through the phases:

1. **enrol**: until every node has its first session (``up``);
2. **steady**: after ``settle_s`` seconds (the nodes catch up on what the enrolment's load
   held back), ``steady_s`` seconds; the server's CPU time and resident memory come from
   ``/proc/<pid>`` of the server's processes (with ``servers`` > 1 the supervisor and its
   serving processes, summed; CPU per node per second over the window; memory as
   the growth since the server was idle, per node; on PostgreSQL also the CPU of the local
   ``postgres`` processes per node per second); ack latency percentiles are those of the
   simulator's ``acks`` events of the window (each covers the 5 s before it);
3. **push**: one ``PUT /v1/config`` with the fleet's selector (`OperatorClient.set_config`),
   then until every node has fetched a newer desired version (push p99 from the PUT's start);
4. **storm**: SIGKILL to the server, start it again on the same data and port, and until every
   node has a session again (recovery from the kill, 95% and 100%; when not all are back
   within ``phase_timeout`` the figures say how many were, ``storm_recovery_s`` is None, and
   the run goes on);
5. **steady** again for ``after_s`` seconds; then SIGTERM to the simulator, which drains, checks
   every sequence number it sent against the operator API and prints its summary.

The result is one dict (`ScenarioResult.figures`) with the simulator's summary inside.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.errors import EdgewiseError
from edgewise.testbed.fleet.profile import Spy
from edgewise.testbed.fleet.stats import (
    named_cpu_seconds,
    percentile,
    tree_cpu_seconds,
    tree_rss_kb,
)
from edgewise.testbed.system import CLI, ChildProcess, ControlPlane, free_port


class ScenarioError(EdgewiseError):
    """A phase did not finish in time (the message says which, and how far it got)."""


@dataclass(frozen=True)
class ScenarioConfig:
    nodes: int
    workdir: Path
    processes: int = 1  # simulator processes
    db: str | None = None  # postgresql://... ; None: SQLite in the data folder
    telemetry_every: float = 10.0
    steady_s: float = 30.0
    after_s: float = 10.0
    ramp: float = 0.0
    phase_timeout: float = 300.0  # s for each of enrol, push, storm
    sim_args: tuple[str, ...] = ()
    profile: Path | None = None  # py-spy raw files of the server: steady.txt, storm.txt
    profile_gil: bool = True  # sample only GIL holders (False: every busy thread, native too)
    servers: int = 1  # `cloud serve --processes N` (more than 1 needs ``db``)
    server_args: tuple[str, ...] = ()  # more `cloud serve` flags (e.g. ``--limit`` ones)
    settle_s: float = 0.0  # s between the last node's first session and the steady window


class Events:
    """The simulator's events file, read as it grows: per node its sessions and fetches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._tail = b""
        self.enrolled: dict[int, float] = {}
        self.up: dict[int, list[float]] = {}  # node index -> times of its welcomes
        self.online: set[int] = set()
        self.desired: dict[int, list[tuple[float, int]]] = {}  # (time, version)
        self.acks: list[tuple[float, list[float]]] = []  # (time, ack latencies in ms)
        self.ids: dict[int, str] = {}  # node index -> node id

    def read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            e = json.loads(line)
            i, t, kind = e["i"], e["t"], e["e"]
            if kind == "enrolled":
                self.enrolled[i] = t
                self.ids[i] = e["node"]
            elif kind == "up":
                self.up.setdefault(i, []).append(t)
                self.online.add(i)
            elif kind == "down":
                self.online.discard(i)
            elif kind == "acks":
                self.acks.append((t, e["ms"]))
            elif kind == "desired":
                self.desired.setdefault(i, []).append((t, e["version"]))
            else:
                self.other(e)

    def other(self, event: dict[str, Any]) -> None:
        """An event of another kind (a subclass may want it: `rollout_scenario`)."""

    def up_since(self, t0: float) -> dict[int, float]:
        """Per node, its first welcome at or after ``t0``."""
        out = {}
        for i, times in self.up.items():
            later = [t for t in times if t >= t0]
            if later:
                out[i] = min(later)
        return out

    def acks_between(self, t0: float, t1: float) -> list[float]:
        """Ack latencies (ms) reported in events written between ``t0`` and ``t1``."""
        return [ms for t, batch in self.acks if t0 <= t < t1 for ms in batch]

    def fetched_since(self, t0: float) -> dict[int, float]:
        out = {}
        for i, items in self.desired.items():
            later = [t for t, _ in items if t >= t0]
            if later:
                out[i] = min(later)
        return out


@dataclass
class ScenarioResult:
    figures: dict[str, Any] = field(default_factory=dict)
    phases: list[tuple[str, str]] = field(default_factory=list)  # (phase, what happened)


async def _until(what: str, check: Any, timeout: float, events: Events,
                 sim: ChildProcess) -> None:
    deadline = time.monotonic() + timeout
    while True:
        events.read()
        done, progress = check()
        if done:
            return
        if not sim.running:
            raise ScenarioError(f"{what}: the simulator exited ({sim.returncode}): "
                                f"{sim.log_tail()}")
        if time.monotonic() > deadline:
            raise ScenarioError(f"{what}: not done within {timeout:.0f} s ({progress})")
        await asyncio.sleep(0.2)


def _p(values: list[float], q: float) -> float | None:
    v = percentile(values, q)
    return None if v is None else round(v, 3)


async def run_scenario(cfg: ScenarioConfig) -> ScenarioResult:
    """Run the phases (module docstring); raises `ScenarioError` when one does not finish."""
    from edgewise.cloud import openapi as oa
    from edgewise.cloud.client import OperatorClient

    res = ScenarioResult()
    fig = res.figures
    n = cfg.nodes
    logs = cfg.workdir / "logs"
    extra: tuple[str, ...] = ("--db", cfg.db) if cfg.db else ()
    if cfg.servers > 1:
        extra += ("--processes", str(cfg.servers))
    extra += cfg.server_args
    cloud = ControlPlane(cfg.workdir / "cloud", free_port(), logs, extra)
    events_path = cfg.workdir / "events.jsonl"
    events = Events(events_path)
    sim: ChildProcess | None = None
    try:
        await cloud.start()
        await asyncio.sleep(1.0)
        idle_kb = tree_rss_kb(cloud.child.pid or 0)
        run = uuid.uuid4().hex[:8]
        with OperatorClient.from_file(cloud.cli_config) as admin:  # any store, via the API
            token = (await asyncio.to_thread(admin.create_enrolment_token, {"fleet": run},
                                              86400.0, n)).token
        sim = ChildProcess("sim", [
            *CLI, "sim", "fleet", "--nodes", str(n), "--cloud", cloud.url, "--token", token,
            "--ca", str(cloud.ca), "--processes", str(cfg.processes), "--duration", "86400",
            "--telemetry-every", str(cfg.telemetry_every), "--ramp", str(cfg.ramp),
            "--events", str(events_path), "--state", str(cfg.workdir / "nodes"),
            "--config", str(cloud.cli_config), "--json", *cfg.sim_args,
        ], logs / "sim.log")
        started = time.time()
        sim.start()

        # 1. enrol and connect
        await _until("enrol", lambda: (len(events.up) >= n, f"{len(events.up)}/{n} up"),
                     cfg.phase_timeout, events, sim)
        all_up = max(min(t) for t in events.up.values())
        fig["nodes_connected"] = len(events.online)
        fig["all_connected_s"] = round(all_up - started, 2)
        last_enrol = max(events.enrolled.values())
        fig["enrol_rate_per_s"] = round(n / max(last_enrol - started, 1e-3), 2)
        res.phases.append(("enrol", f"{n} nodes up {all_up - started:.1f} s after the start"))

        # 2. steady state: server CPU and memory
        await asyncio.sleep(cfg.settle_s)
        pid = cloud.child.pid or 0
        spy = Spy(pid, cfg.profile / "steady.txt", gil=cfg.profile_gil) if cfg.profile else None
        if spy is not None and not spy.start(cfg.steady_s):
            fig["profile"] = "py-spy not installed"
            spy = None
        c0, w0, steady_from = tree_cpu_seconds(pid), time.monotonic(), time.time()
        d0 = named_cpu_seconds("postgres") if cfg.db else 0.0
        x0 = await _db_counts(cfg.db)
        await asyncio.sleep(cfg.steady_s)
        x1 = await _db_counts(cfg.db)
        c1, w1 = tree_cpu_seconds(pid), time.monotonic()
        d1 = named_cpu_seconds("postgres") if cfg.db else 0.0
        if spy is not None:
            spy.stop()
        kb = tree_rss_kb(pid)
        events.read()
        fig["nodes_connected"] = len(events.online)
        steady_acks = events.acks_between(steady_from + 5.0, time.time() + 5.0)
        fig["ack_p50_ms"], fig["ack_p99_ms"] = _p(steady_acks, 50), _p(steady_acks, 99)
        fig["server_cpu_pct"] = round((c1 - c0) / (w1 - w0) * 100.0, 1)
        fig["server_cpu_us_per_node_s"] = round((c1 - c0) / (w1 - w0) / n * 1e6, 1)
        if cfg.db:  # the local PostgreSQL's processes (all of them: nothing else uses it here)
            fig["db_cpu_us_per_node_s"] = round((d1 - d0) / (w1 - w0) / n * 1e6, 1)
        if x0 and x1:  # the database's own counters over the window, per node per second
            for k in x0:
                fig[f"db_{k}_per_node_s"] = round((x1[k] - x0[k]) / (w1 - w0) / n, 4)
        fig["server_rss_mb"] = round(kb / 1024.0, 1)
        fig["server_kb_per_node"] = round(max(0, kb - idle_kb) / n, 1)
        if cfg.servers > 1:
            fig["sessions_per_process"] = await _per_process(cloud, cfg.servers)
        res.phases.append(("steady", f"{len(events.online)} online over {cfg.steady_s:g} s"))

        # 3. push to all
        put_start = time.time()
        # a selector write to a big fleet may take long: a long client timeout
        with OperatorClient.from_file(cloud.cli_config, timeout=600.0) as client:
            answer = await asyncio.to_thread(client.set_config, oa.ConfigSetRequest(
                selector=f"fleet={run}", config={"push": put_start}))
        fig["push_put_s"] = round(time.time() - put_start, 3)
        fig["push_nodes"] = len(answer.nodes)

        def pushed() -> tuple[bool, str]:
            got = events.fetched_since(put_start)
            return len(got) >= n, f"{len(got)}/{n} fetched"

        await _until("push", pushed, cfg.phase_timeout, events, sim)
        lat = [t - put_start for t in events.fetched_since(put_start).values()]
        fig["push_p50_s"], fig["push_p99_s"] = _p(lat, 50), _p(lat, 99)
        res.phases.append(("push", f"all {n} fetched; p99 {fig['push_p99_s']} s"))

        # 4. kill -9 and restart: the reconnect storm
        killed = time.time()
        cloud.child.signal(signal.SIGKILL)
        await cloud.child.wait(10)
        cloud.child = ChildProcess("cloud", cloud.child.argv, cloud.child.log)
        await cloud.start()
        ready = time.time()
        spy = Spy(cloud.child.pid or 0, cfg.profile / "storm.txt",
                  gil=cfg.profile_gil) if cfg.profile else None
        if spy is not None and not spy.start():
            spy = None

        def back() -> tuple[bool, str]:
            got = events.up_since(killed)
            return len(got) >= n, f"{len(got)}/{n} back"

        try:
            await _until("storm", back, cfg.phase_timeout, events, sim)
        except ScenarioError as exc:  # recorded; the run goes on to the exact check
            if not sim.running:
                raise
            res.phases.append(("storm", str(exc)))
        finally:
            if spy is not None:
                spy.stop()
        back_at = sorted(events.up_since(killed).values())
        fig["restart_s"] = round(ready - killed, 2)
        fig["storm_back"] = len(back_at)
        k95 = max(0, int(0.95 * n) - 1)
        fig["storm_recovery_95_s"] = (round(back_at[k95] - killed, 2) if len(back_at) > k95
                                      else None)
        fig["storm_recovery_s"] = round(back_at[-1] - killed, 2) if len(back_at) >= n else None
        if len(back_at) >= n:
            res.phases.append(("storm", f"all {n} back {fig['storm_recovery_s']} s after "
                                        f"kill -9 (server answering after {fig['restart_s']} s)"))
        # why the listener closed connections early during the storm (one process's counters)
        fig["storm_closed"] = await _closed_early(cloud)

        # 5. steady again, then stop the simulator: it drains and checks every record
        after_from = time.time()
        await asyncio.sleep(cfg.after_s)
        events.read()
        after_acks = events.acks_between(after_from + 5.0, time.time() + 5.0)
        fig["ack_p99_after_ms"] = _p(after_acks, 99)
        fig["nodes_connected_after"] = len(events.online)
        sim.signal(signal.SIGTERM)
        code = await sim.wait(cfg.phase_timeout)
        if code != 0:
            raise ScenarioError(f"the simulator ended with {code}: {sim.log_tail()}")
        summary = _last_json(sim.log)
        fig["ack_p99_whole_run_ms"] = summary.get("ack_p99_ms")
        fig.update({k: summary.get(k) for k in (
            "records_lost", "records_duplicated",
            "records_unexpected", "records_acked", "records_unacked", "reconnects",
            "enrol_p50_s", "enrol_p99_s", "connect_p99_s", "sim_kb_per_node")})
        fig["sim"] = summary
        res.phases.append(("end", f"lost {summary.get('records_lost')}, duplicated "
                                  f"{summary.get('records_duplicated')}"))
        return res
    finally:
        if sim is not None and sim.running:
            await sim.stop(grace=30)
        cloud.close()
        await cloud.stop()


async def _db_counts(db: str | None) -> dict[str, int]:
    """PostgreSQL's counters of the database (`pg_stat_database`: commits, rows inserted,
    updated, deleted); {} without PostgreSQL or when they cannot be read."""
    if not db:
        return {}
    import asyncpg

    from edgewise.cloud.store.notify import listen_dsn

    try:
        conn = await asyncpg.connect(listen_dsn(db), timeout=10)
    except (OSError, asyncpg.PostgresError):
        return {}
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()")
    finally:
        await conn.close()
    return {"commits": row[0], "rows_inserted": row[1], "rows_updated": row[2],
            "rows_deleted": row[3]} if row else {}


async def _per_process(cloud: ControlPlane, servers: int, tries: int = 200) -> dict[str, int]:
    """Live sessions of each serving process: ``/healthz`` on a new connection each time
    (SO_REUSEPORT spreads connections over the processes), until each has answered."""
    import httpx

    from edgewise.security.tls import client_context

    seen: dict[str, int] = {}
    ctx = client_context(cloud.ca)
    for _ in range(tries):
        async with httpx.AsyncClient(verify=ctx, timeout=5.0) as http:
            body = (await http.get(f"{cloud.url}/healthz")).json()
        seen[str(body["process"])] = int(body["sessions"])
        if len(seen) >= servers:
            break
    return dict(sorted(seen.items()))


async def _closed_early(cloud: ControlPlane) -> dict[str, float]:
    """The listener's counters of one serving process since its start (``/metrics``):
    connections closed early by reason, handshakes that waited in its queue, sessions
    opened; {} when they cannot be read."""
    import httpx

    from edgewise.security.tls import client_context

    try:
        async with httpx.AsyncClient(verify=client_context(cloud.ca), timeout=10.0) as http:
            text = (await http.get(f"{cloud.url}/metrics")).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("edgewise_connections_closed_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("edgewise_handshakes_queued_total ",
                              "edgewise_sessions_opened_total ")):
            name, value = line.split(" ", 1)
            out[name.removeprefix("edgewise_").removesuffix("_total")] = float(value)
    return out


def _last_json(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise ScenarioError(f"no summary line in {log}")
