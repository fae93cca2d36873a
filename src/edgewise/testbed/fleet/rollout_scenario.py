"""Rollouts over the fleet simulator (issue 12): a real control plane, virtual nodes that act on
releases, and one rollout per release with its own injected failure rate.

`run_rollouts` starts ``edgewise cloud serve`` (`testbed.system.ControlPlane`, SQLite or
``--db``), makes the TUF keys (``cloud keys init``) and publishes one small release per
rollout (``release publish``), makes one enrolment token per site (labels ``fleet=<run>``,
``site=s<j>``; node ``i`` enrols with token ``i mod sites``) and starts ``edgewise sim fleet``
with ``--release-failure-rate VERSION=RATE`` for each release. Once every node has a session
it quarantines the last ``quarantine`` nodes by index (`OperatorClient.quarantine`), then runs the
rollouts one after the other through the operator API (``POST /v1/rollouts``, polled with
``GET /v1/rollouts/ID``) until each is completed or paused; a paused one is given
``settle_s`` for its nodes in flight to finish, then cancelled, so the next can start. With
``baseline``, one more release then goes to every node at once (``config set --selector S
--release V``), timed until every node has committed it: what a rollout replaces.

What each rollout measured (`RolloutFigures`), from the control plane's audit log (actor
``rollout:<id>``) and the simulator's events file:

* ``seconds``: from its creation to the ``rollout.complete`` (or ``rollout.pause``) entry;
* ``touched_after_pause``: nodes first assigned after the ``rollout.pause`` entry (target 0);
* ``assigned_after_crossing``: nodes assigned after the node whose failure crossed the
  threshold reported it (its ``rolled_back``/``refused`` event): the wave in flight may still
  take a node in that second (a site's budget freed), no later wave may
  (``beyond_wave_in_flight``);
* ``max_in_flight_per_site``: the most nodes of one site assigned and not yet healthy,
  failed or skipped at once, replayed from the ``rollout.node`` entries;
* ``updated`` / ``updated_twice``: nodes that began staging the release (events), and those
  that began it more than once.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from edgewise.errors import EdgewiseError
from edgewise.testbed.fleet.scenario import Events, ScenarioError, _last_json
from edgewise.testbed.fleet.stats import cpu_seconds, rss_kb
from edgewise.testbed.system import CLI, ChildProcess, ControlPlane, free_port, run_cli

DONE = ("completed", "paused", "aborted", "cancelled")


@dataclass(frozen=True)
class RolloutScenarioConfig:
    nodes: int
    workdir: Path
    rates: tuple[tuple[str, str], ...] = (("2.0", "0"), ("2.1", "0.01"), ("2.2", "0.05"))
    processes: int = 1
    db: str | None = None
    site_size: int = 0  # nodes per site (one token each); 0: one token, no site label
    canary: str = "1%"
    waves: str = "10%,50%,100%"
    max_failures: str = "2%"
    max_unavailable_per_site: int | None = None
    node_timeout_s: float = 600.0
    apply_seconds: str = "1-5"
    telemetry_every: float = 3600.0  # the rollouts need no telemetry
    heartbeat_every: float | None = None  # None: the agent's
    report_every: float | None = None
    quarantine: int = 0  # nodes quarantined before the rollouts
    ramp: float = 0.0
    phase_timeout: float = 600.0  # s for the enrolment and for each rollout
    settle_s: float = 15.0  # after a pause: time for the wave in flight to finish
    baseline: str | None = None  # then this release (no failures) to all at once: the baseline
    sim_args: tuple[str, ...] = ()


@dataclass
class RolloutFigures:
    release: str
    failure_rate: str
    rollout: str = ""
    state: str = ""
    paused_by: str | None = None
    reason: str = ""
    wave: str | None = None
    total: int = 0
    failures_allowed: int = 0
    seconds: float | None = None
    states: dict[str, int] = field(default_factory=dict)
    updated: int = 0
    updated_twice: int = 0
    failed_reported: int = 0
    failed_nodes: list[int] = field(default_factory=list)  # indices whose update failed
    quarantined_updated: int = 0  # quarantined nodes that began staging it (target 0)
    touched_after_pause: int | None = None
    assigned_after_crossing: int | None = None
    beyond_wave_in_flight: int | None = None  # of those, nodes of another wave (target 0)
    wave_in_flight: int | None = None  # nodes of the wave the rollout paused in
    max_in_flight_per_site: int = 0
    server_cpu_pct: float | None = None


class ReleaseEvents(Events):
    """`Events` with the nodes' release steps: ``(time, node index, version, outcome)``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.steps: list[tuple[float, int, str, str]] = []

    def other(self, event: dict[str, Any]) -> None:
        if event["e"] == "release":
            self.steps.append((event["t"], event["i"], str(event["v"]), event["o"]))


def in_flight_per_site(entries: list[Any]) -> int:
    """The most nodes of one site assigned and not yet done, from ``rollout.node`` entries."""
    flying: dict[str, set[str]] = {}
    most = 0
    for e in sorted((e for e in entries if e.action == "rollout.node"), key=lambda e: e.id):
        s = flying.setdefault(str(e.detail.get("site")), set())
        if e.detail.get("state") == "assigned":
            s.add(e.target)
        elif e.detail.get("state") in ("healthy", "failed", "rolled_back", "skipped"):
            s.discard(e.target)
        if e.detail.get("site") is not None:
            most = max(most, len(s))
    return most


def _audit(client: Any, actor: str) -> list[Any]:
    out: list[Any] = []
    before: int | None = None
    while True:
        page = client.audit(actor=actor, limit=1000, before_id=before)
        out += page.entries
        before = page.next_before_id
        if before is None or not page.entries:
            return sorted(out, key=lambda e: e.id)


def measure(fig: RolloutFigures, created: datetime, entries: list[Any],
            events: ReleaseEvents, held: frozenset[int] = frozenset(),
            wave: int | None = None) -> None:
    """Fill ``fig`` from the rollout's audit entries (its driver's: actor ``rollout:<id>``)
    and the nodes' release events; ``created``: when the rollout was created."""
    first = {e.action: e for e in reversed(entries)}  # the first entry of each action
    end = first.get("rollout.complete") or first.get("rollout.pause")
    if end is not None:
        fig.seconds = round((end.ts - created).total_seconds(), 2)
    mine = [s for s in events.steps if s[2] == fig.release]
    staged = Counter(i for _, i, _, o in mine if o == "staging")
    fig.updated, fig.updated_twice = len(staged), sum(1 for n in staged.values() if n > 1)
    fig.quarantined_updated = sum(1 for i in staged if i in held)
    fails = sorted(t for t, _, _, o in mine if o in ("rolled_back", "refused"))
    fig.failed_reported = len(fails)
    fig.failed_nodes = sorted({i for _, i, _, o in mine if o in ("rolled_back", "refused")})
    fig.max_in_flight_per_site = in_flight_per_site(entries)
    pause = first.get("rollout.pause")
    if pause is None:
        return
    assigned = [e for e in entries if e.action == "rollout.node"
                and e.detail.get("state") == "assigned"]
    fig.touched_after_pause = len({e.target for e in assigned if e.id > pause.id})
    if len(fails) > fig.failures_allowed:
        crossing = fails[fig.failures_allowed]
        late = [e for e in assigned if e.ts.timestamp() > crossing]
        fig.assigned_after_crossing = len({e.target for e in late})
        fig.beyond_wave_in_flight = len({e.target for e in late
                                         if e.detail.get("wave") != wave})


async def _until(what: str, check: Any, timeout: float, sim: ChildProcess,
                 every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        done = await check()
        if done:
            return done
        if not sim.running:
            raise ScenarioError(f"{what}: the simulator exited ({sim.returncode}): "
                                f"{sim.log_tail()}")
        if time.monotonic() > deadline:
            raise ScenarioError(f"{what}: not done within {timeout:.0f} s")
        await asyncio.sleep(every)


async def _cli(*args: str) -> None:
    res = await run_cli(*args, timeout=300)
    if res.returncode != 0:
        raise EdgewiseError(f"edgewise {' '.join(args[:3])}: {res.stderr.strip()[-400:]}")


async def _all_at_once(client: Any, cfg: RolloutScenarioConfig, version: str, selector: str,
                       events: ReleaseEvents, sim: ChildProcess) -> dict[str, Any]:
    """The baseline a rollout replaces: ``config set --selector S --release V`` (one bulk
    write, every node poked at once); seconds until every node runs it, committed."""
    from edgewise.cloud import openapi as oa

    t0 = time.time()
    answer = await asyncio.to_thread(client.set_config, oa.ConfigSetRequest(
        selector=selector, release=version))
    put_s = time.time() - t0

    async def everyone() -> bool:
        events.read()
        done = {i for _, i, v, o in events.steps if v == version and o == "committed"}
        return len(done) >= len(answer.nodes)

    await _until(f"all at once: {version}", everyone, cfg.phase_timeout, sim)
    last = max(t for t, _, v, o in events.steps if v == version and o == "committed")
    return {"release": version, "nodes": len(answer.nodes), "put_s": round(put_s, 2),
            "seconds": round(last - t0, 2)}


async def run_rollouts(cfg: RolloutScenarioConfig) -> dict[str, Any]:
    """The whole run (module docstring): fleet figures and one `RolloutFigures` per release."""
    from edgewise.cloud.client import OperatorClient
    from edgewise.cloud.rollouts import models as m
    from edgewise.cloud.rollouts.spec import Amount

    n = cfg.nodes
    logs = cfg.workdir / "logs"
    cloud = ControlPlane(cfg.workdir / "cloud", free_port(), logs,
                         ("--db", cfg.db) if cfg.db else ())
    events = ReleaseEvents(cfg.workdir / "events.jsonl")
    out: dict[str, Any] = {"nodes": n, "processes": cfg.processes,
                           "store": "postgresql" if cfg.db else "sqlite", "rollouts": []}
    sim: ChildProcess | None = None
    client: Any = None
    try:
        await cloud.start()
        data = str(cloud.data_dir)
        await _cli("cloud", "keys", "init", str(cfg.workdir / "root-keys"), "--data", data)
        for version in [v for v, _ in cfg.rates] + ([cfg.baseline] if cfg.baseline else []):
            folder = cfg.workdir / "releases" / version
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "README.txt").write_text(f"simulated release {version}\n")
            await _cli("release", "publish", str(folder), "--version", version, "--data", data)
        run = uuid.uuid4().hex[:8]
        client = OperatorClient.from_file(cloud.cli_config, timeout=600.0)
        sites = math.ceil(n / cfg.site_size) if cfg.site_size else 1
        uses = math.ceil(n / sites)
        tokens = [(await asyncio.to_thread(
            client.create_enrolment_token,
            {"fleet": run, **({"site": f"s{j}"} if cfg.site_size else {})}, 86400.0, uses)
        ).token for j in range(sites)]
        argv = [*CLI, "sim", "fleet", "--nodes", str(n), "--cloud", cloud.url,
                "--ca", str(cloud.ca), "--processes", str(cfg.processes), "--duration", "86400",
                "--telemetry-every", str(cfg.telemetry_every), "--ramp", str(cfg.ramp),
                "--events", str(events.path), "--state", str(cfg.workdir / "nodes"),
                "--apply-seconds", cfg.apply_seconds, "--no-verify", "--json",
                *[a for v, r in cfg.rates for a in ("--release-failure-rate", f"{v}={r}")],
                *(("--heartbeat-every", str(cfg.heartbeat_every)) if cfg.heartbeat_every
                  else ()),
                *(("--report-every", str(cfg.report_every)) if cfg.report_every else ()),
                *cfg.sim_args]
        for t in tokens:
            argv += ["--token", t]
        sim = ChildProcess("sim", argv, logs / "sim.log")
        started = time.time()
        sim.start()

        async def all_up() -> bool:
            events.read()
            return len(events.up) >= n

        await _until("enrol", all_up, cfg.phase_timeout, sim, every=1.0)
        out["all_connected_s"] = round(max(min(t) for t in events.up.values()) - started, 1)
        pid = cloud.child.pid or 0
        out["server_rss_mb_connected"] = round(rss_kb(pid) / 1024, 1)
        held = [events.ids[i] for i in range(n - cfg.quarantine, n)]  # the last indices
        for node_id in held:
            await asyncio.to_thread(client.quarantine, node_id, "simulated: attestation failed")
        out["quarantined"] = {i: events.ids[i] for i in range(n - cfg.quarantine, n)}
        for version, rate in cfg.rates:
            fig = RolloutFigures(version, rate)
            out["rollouts"].append(fig)
            c0, w0 = cpu_seconds(pid), time.monotonic()
            body = m.RolloutCreate(
                release=version, selector=f"fleet={run}", canary=cfg.canary, waves=cfg.waves,
                max_failures=cfg.max_failures,
                max_unavailable_per_site=cfg.max_unavailable_per_site,
                node_timeout_s=cfg.node_timeout_s)
            created = await asyncio.to_thread(client.call, "POST", "/v1/rollouts",
                                              m.RolloutDetail, body=body, read_timeout=600.0)
            fig.rollout, fig.total = created.id, created.total
            fig.failures_allowed = Amount.parse(cfg.max_failures, "").allowed(created.total)

            async def finished(rid: str = created.id) -> Any:
                d = await asyncio.to_thread(client.call, "GET", f"/v1/rollouts/{rid}",
                                            m.RolloutDetail, params={"nodes": "none"})
                return d if d.state in DONE else None

            detail = await _until(f"rollout of {version}", finished, cfg.phase_timeout, sim)
            fig.server_cpu_pct = round((cpu_seconds(pid) - c0) /
                                       (time.monotonic() - w0) * 100, 1)
            if detail.state == "paused":
                await asyncio.sleep(cfg.settle_s)  # the wave in flight finishes
                detail = await asyncio.to_thread(client.call, "GET",
                                                 f"/v1/rollouts/{created.id}",
                                                 m.RolloutDetail, params={"nodes": "none"})
                fig.wave_in_flight = detail.waves[detail.wave].nodes
            fig.state, fig.paused_by, fig.reason = detail.state, detail.paused_by, detail.reason
            fig.wave, fig.states = detail.wave_name, dict(detail.states)
            await asyncio.sleep(2.0)  # the last events reach the file
            events.read()
            measure(fig, created.created,
                    await asyncio.to_thread(_audit, client, f"rollout:{created.id}"), events,
                    frozenset(range(n - cfg.quarantine, n)), detail.wave)
            if detail.state == "paused":  # so the next rollout may take its nodes
                await asyncio.to_thread(client.call, "POST", f"/v1/rollouts/{created.id}/cancel",
                                        m.Rollout, body=m.RolloutCommand(reason="benchmark"))
        if cfg.baseline is not None:
            out["baseline"] = await _all_at_once(client, cfg, cfg.baseline, f"fleet={run}",
                                                 events, sim)
        out["server_rss_mb_end"] = round(rss_kb(pid) / 1024, 1)
        sim.signal(signal.SIGTERM)
        if await sim.wait(cfg.phase_timeout) != 0:
            raise ScenarioError(f"the simulator ended badly: {sim.log_tail()}")
        summary = _last_json(sim.log)
        out["sim"] = {k: summary.get(k) for k in (
            "enrolled", "connected_at_stop", "enrol_rate_per_s", "connect_p99_s",
            "reconnects", "releases", "problems", "failures", "sim_kb_per_node")}
        out["rollouts"] = [asdict(f) for f in out["rollouts"]]
        return out
    finally:
        if client is not None:
            client.close()
        if sim is not None and sim.running:
            await sim.stop(grace=30)
        cloud.close()
        await cloud.stop()
