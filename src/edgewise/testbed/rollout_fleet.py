"""A fleet simulated in the control plane's store, for rollout tests and benchmarks: no network,
no processes. Each `tick` reads every node's newest desired state, moves each node's release
the way the node's updater does it, and writes the nodes' statuses and reports as the sessions
do (`Store.write_node_batch`), with the status line and counters the real node reports
(`edge/updater/updater.py` ``status_text``; the engine's ``readings_in``/``alarms``).

A node assigned a release it does not run goes ``on trial`` for one tick (its engine restarts:
counters from 0), then commits it, or, when it is one of the ``failing`` nodes, rolls back
(``release V failed (gate): ...``). Nodes in ``bad_alarms`` raise ``alarm_factor`` times their
alarms while they run a release. ``offline`` nodes report nothing and are offline.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edgewise.cloud.store import NodeReport, Store
from edgewise.cloud.store.rollouts import Rollouts
from edgewise.sync.hlc import HLC
from edgewise.sync.merge import LwwMap
from edgewise.sync.twin_state import ReportedState


@dataclass
class SimNode:
    running: str | None = None
    trial: str | None = None
    failed: str | None = None
    failed_all: set[str] = field(default_factory=set)
    readings: int = 0
    alarms: int = 0
    applied: int = 0
    updates: int = 0  # releases switched in (a second update of one release shows here)


async def add_nodes(store: Store, ids_sites: Iterable[tuple[str, str]],
                    now: datetime | None = None) -> None:
    """Node rows as enrolment leaves them (written directly; certificates prove nothing here)."""
    t = now or datetime.now(UTC)
    rows = [{"id": n, "labels": {"site": site, "fleet": "sim"}, "key_fingerprint": f"{i:064x}",
             "cert_serial": f"{i + 1:x}", "cert_expiry": t, "status": "online",
             "created": t, "last_seen": t} for i, (n, site) in enumerate(ids_sites)]
    await store.add_simulated_nodes(rows)


class StoreFleet:
    def __init__(self, store: Store, nodes: Iterable[str], *, failing: Iterable[str] = (),
                 bad_alarms: Iterable[str] = (), alarm_factor: float = 3.0,
                 offline: Iterable[str] = (), readings_per_tick: int = 1000,
                 alarms_per_tick: int = 10) -> None:
        self.store = store
        self.nodes = {n: SimNode() for n in nodes}
        self.failing = set(failing)
        self.bad_alarms = set(bad_alarms)
        self.alarm_factor = alarm_factor
        self.offline = set(offline)
        self.readings_per_tick = readings_per_tick
        self.alarms_per_tick = alarms_per_tick
        self._wall = 1

    async def tick(self, now: datetime | None = None) -> None:
        t = now or datetime.now(UTC)
        views = await Rollouts(self.store).view(list(self.nodes))
        statuses: dict[str, tuple[str, datetime]] = {}
        reports: dict[str, NodeReport] = {}
        self._wall += 1
        at = HLC(self._wall, 0, "sim")
        for node_id, n in self.nodes.items():
            if node_id in self.offline:
                statuses[node_id] = ("offline", t)
                continue
            v = views.get(node_id)
            want = v.desired_release if v is not None else None
            if v is not None:
                n.applied = v.desired_version
            if n.trial is not None:
                if node_id in self.failing:
                    n.failed, n.running = n.trial, n.running
                    n.failed_all.add(n.trial)
                else:
                    n.running = n.trial
                n.trial = None
            elif want != n.running and want not in n.failed_all:
                if want is None:
                    n.running = None
                else:
                    n.trial = want
                    n.updates += 1
                n.readings = n.alarms = 0  # the agent restarts: a new engine
            n.readings += self.readings_per_tick
            factor = (self.alarm_factor if node_id in self.bad_alarms
                      and (n.running or n.trial) else 1.0)
            n.alarms += round(self.alarms_per_tick * factor)
            statuses[node_id] = ("online", t)
            reports[node_id] = NodeReport(ReportedState(
                n.applied or None, self.status_line(n),
                {"readings_in": n.readings, "alarms": n.alarms, "dead_lettered": 0,
                 "alarms.dropped": 0}, LwwMap()), at, LwwMap())
        await self.store.write_node_batch(statuses, reports, now=t)

    @staticmethod
    def status_line(n: SimNode) -> str:
        text = "running; " + (f"release {n.trial} on trial" if n.trial else
                              f"release {n.running}" if n.running else "no release")
        if n.failed:
            text += f"; release {n.failed} failed (gate): alarms beyond their bound"
        return text
