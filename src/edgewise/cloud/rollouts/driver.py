"""The rollout driver: one task per control-plane process that moves every rollout it holds
the lease of, one tick at a time (`Driver.tick`, every ``tick_s``).

A tick of one rollout: take or renew the lease (`store.rollouts.Rollouts.take_lease`; a
rollout another process drives is left alone), read the rollout, its nodes and what each node
reports (`observe.seen`), let `machine.decide` judge, store its decisions in one transaction
fenced by the lease (`Rollouts.apply`), then write the desired versions it asked for and store
that they are written.

**Exactly once across kill -9.** A node is marked ``assigning`` (with the desired version it
had, its release then and its counters) *before* its desired version is written, and
``assigned`` after. A tick that finds a node ``assigning`` (the process died between the two)
looks at the node's newest desired version: newer than the one recorded and naming the
rollout's release means the write landed, and it is only marked; otherwise it is written now.
So a restart neither writes a node twice nor skips one. Rollbacks (``rolling_back``) are
settled the same way. The writes go through `Store.update_desired_states` (audited as
``desired.set`` per node, by actor ``rollout:<id>``) and the pokes through the fan-out task,
as ``config set`` does (each node's new state inline in its poke when small, so a node applies
it without a fetch); the rollout's intents carry an expiry (``intent_ttl_s``), rollbacks
none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from edgewise.cloud.desired import DesiredChange
from edgewise.cloud.pokes import PokeFanout, fetch_jitter
from edgewise.cloud.rollouts import machine, observe
from edgewise.cloud.rollouts.spec import RolloutSpec, Sample
from edgewise.cloud.store import Store
from edgewise.cloud.store.rollouts import LeaseLost, NodeView, Rollouts
from edgewise.errors import StorageError

log = logging.getLogger(__name__)


def default_owner() -> str:
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def rollout_of(row: Mapping[str, Any]) -> machine.Rollout:
    return machine.Rollout(
        id=row["id"], spec=RolloutSpec.from_json(row["spec"]), state=row["state"],
        wave=row["wave"], waves=len(row["waves"]), wave_done_at=row["wave_done_at"],
        reason=row["reason"], paused_by=row["paused_by"],
        accepted_failures=row["accepted_failures"],
        gate_accepted_wave=row["gate_accepted_wave"], completed_at=row["completed_at"],
        total=row["total"])


def member_of(row: Mapping[str, Any]) -> machine.Member:
    return machine.Member(
        node_id=row["node_id"], wave=row["wave"], site=row["site"], state=row["state"],
        previous=row["previous"], version_before=row["version_before"],
        version=row["version"],
        baseline=Sample.from_json(row["baseline"]) if row["baseline"] is not None else None,
        assigned_at=row["assigned_at"], reason=row["reason"])


class Driver:
    def __init__(self, store: Store, pokes: PokeFanout, *, owner: str | None = None,
                 tick_s: float = 1.0, lease_s: float = 15.0,
                 now: Callable[[], datetime] | None = None, fetch_rate: float = 1000.0,
                 max_jitter: float = 5.0) -> None:
        self.store = store
        self.rollouts = Rollouts(store)
        self.pokes = pokes
        self.owner = owner or default_owner()
        self.tick_s = tick_s
        self.lease_s = lease_s
        self.now = now or (lambda: datetime.now(UTC))
        self.fetch_rate = fetch_rate
        self.max_jitter = max_jitter
        self.ticks = 0
        self.states: dict[str, str] = {}  # the rollouts looked at by the last tick: state

    async def run(self) -> None:
        """Tick until cancelled; a failed tick is logged and the next one tries again."""
        while True:
            try:
                await self.tick()
            except StorageError as exc:
                log.warning("rollout driver: %s", exc)
            except Exception:  # a bug must not stop every rollout for the process's life
                log.exception("rollout driver: a tick failed; trying again")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        driven = await self.rollouts.driven()
        self.states = dict(driven)
        for rollout_id, _ in driven:
            if not await self.rollouts.take_lease(rollout_id, self.owner, self.lease_s,
                                                  now=self.now()):
                continue
            try:
                await self.drive(rollout_id)
            except LeaseLost:
                log.info("rollout %s: another driver has it now", rollout_id)
        self.ticks += 1

    async def drive(self, rollout_id: str) -> None:
        row = await self.rollouts.get(rollout_id)
        if row is None or row["state"] not in machine.ACTIVE:
            return
        r = rollout_of(row)
        members = {m["node_id"]: member_of(m) for m in await self.rollouts.nodes(rollout_id)}
        watch = [m.node_id for m in members.values() if m.state not in machine.TERMINAL
                 or (m.state == "healthy" and m.wave == r.wave)]
        views = await self.rollouts.view(watch)
        seen = {n: observe.seen(v.status, v.reported, v.desired_version, v.desired_release,
                                v.quarantine) for n, v in views.items()}
        now = self.now()
        step = machine.decide(r, members, seen, now)
        updates: dict[str, dict[str, Any]] = {
            n: {"state": s, "reason": why} for n, (s, why) in step.members.items()}
        for n in step.assign:
            v = views[n]
            updates[n] = {"state": "assigning", "reason": "", "version_before": v.desired_version,
                          "previous": v.desired_release,
                          "had_release": v.desired_release is not None,
                          "baseline": seen[n].sample.to_json()}
        for n in step.rollback:
            updates[n] = {"state": "rolling_back", "reason": "",
                          "version_before": views[n].desired_version if n in views else 0}
        state = step.rollout.get("state", r.state)
        await self.rollouts.apply(rollout_id, self.owner, self.lease_s, members=updates,
                                  rollout=step.rollout, audits=step.audits, now=now)
        settling = {n: m for n, m in members.items()
                    if updates.get(n, {}).get("state", m.state) in ("assigning",
                                                                    "rolling_back")}
        if settling:
            await self._settle(r, state, settling, updates, views, now)

    async def _settle(self, r: machine.Rollout, state: str,
                      settling: Mapping[str, machine.Member],
                      updates: Mapping[str, Mapping[str, Any]], views: Mapping[str, NodeView],
                      now: datetime) -> None:
        """Write the desired versions of the nodes marked ``assigning`` / ``rolling_back``
        (or only mark them, when the write landed before a restart)."""
        target = r.spec.release
        done: dict[str, dict[str, Any]] = {}
        audits: list[tuple[str, str, dict[str, Any]]] = []
        assign: list[str] = []
        rollback: dict[str | None, list[str]] = {}
        for n, m in settling.items():
            u = updates.get(n, {})
            st = u.get("state", m.state)
            before = int(u.get("version_before", m.version_before))
            previous = u.get("previous", m.previous)
            v = views.get(n)
            if st == "assigning":
                if v is not None and v.desired_version > before and v.desired_release == target:
                    done[n] = {"state": "assigned", "version": v.desired_version,
                               "assigned_at": now}
                elif state in ("running", "paused", "completed"):
                    assign.append(n)
                else:
                    done[n] = {"state": "skipped", "reason": "the rollout ended first"}
            else:
                if v is not None and v.desired_version > before and (
                        v.desired_release == previous):
                    done[n] = {"state": "rolled_back",
                               "reason": f"assigned {previous or 'no release'} again"}
                else:
                    rollback.setdefault(previous, []).append(n)
        if assign:
            written = await self._write(r, assign, views, target,
                                        now + timedelta(seconds=r.spec.intent_ttl_s), now)
            for n, version in written.items():
                done[n] = {"state": "assigned", "version": version, "assigned_at": now}
                m = settling[n]
                audits.append(("rollout.node", f"node:{n}",
                               {"state": "assigned", "from": "assigning", "wave": m.wave,
                                "site": m.site, "version": version}))
        for previous, nodes in rollback.items():
            written = await self._write(r, nodes, views, previous or "", None, now)
            for n in written:
                m = settling[n]
                done[n] = {"state": "rolled_back",
                           "reason": f"assigned {previous or 'no release'} again"}
                audits.append(("rollout.node", f"node:{n}",
                               {"state": "rolled_back", "from": "rolling_back", "wave": m.wave,
                                "site": m.site, "release": previous}))
        await self.rollouts.apply(r.id, self.owner, self.lease_s, members=done, rollout={},
                                  audits=audits, now=self.now())

    async def _write(self, r: machine.Rollout, nodes: Sequence[str],
                     views: Mapping[str, NodeView], release: str,
                     expires: datetime | None, now: datetime) -> dict[str, int]:
        change = DesiredChange(release=release, expires_at=expires)
        targets = [(n, views[n].labels if n in views else {}) for n in nodes]
        states = await self.store.update_desired_states(
            targets, change.apply, expires_at=expires, actor=f"rollout:{r.id}", now=now,
            release=release)
        self.pokes.poke({n: s.version for n, s in states.items()},
                        fetch_jitter(len(nodes), self.fetch_rate, self.max_jitter), states)
        return {n: s.version for n, s in states.items()}
