"""Fleet health states and the drift report (docs/operations.md, "Health states"): pure rules
over what the store holds about a node (`store.fleet.FleetRow`), no I/O.

`classify` gives each node one state and the reasons for it, checked in this order:

* **quarantined**: an operator quarantined it (``edgewise node quarantine ID --reason``);
* **offline**: revoked or decommissioned; never connected; its session ended; or no heartbeat
  or report for `Thresholds.offline_after_s` (a control plane that died cannot have written
  ``offline``);
* **degraded**: online, and its newest health says something is wrong: a pipeline failed,
  restarting or with an error; the oldest waiting outbox chunk of some priority older than
  `Thresholds.outbox_age_s`; little disk free; the certificate near its expiry; the clock off
  by more than `Thresholds.clock_offset_s`; the assigned release failed on the node;
* **online** otherwise.

`drift` lists why a node's reported state differs from its desired state, and whether the
config layers would change its desired config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edgewise.cloud.layers import Layer, diff, effective
from edgewise.cloud.store.fleet import FleetRow

STATES = ("online", "degraded", "offline", "quarantined")
BAD_PIPELINE_STATES = frozenset({"restarting", "failed", "stopped"})


@dataclass(frozen=True)
class Thresholds:
    offline_after_s: float = 90.0  # no heartbeat or report for this long: offline
    outbox_age_s: float = 900.0  # oldest waiting chunk of any priority
    disk_free_bytes: int = 256 * 1024 * 1024  # less free than this ...
    disk_free_ratio: float = 0.05  # ... or than this share of the disk
    # certificate valid for less than this: node certificates live 24 h and are renewed
    # when a fraction of that has passed (`pki.RENEW_FRACTION`), so 4 h left means renewal
    # has been failing for hours
    cert_expiry_s: float = 4 * 3600.0
    clock_offset_s: float = 5.0  # |control plane time - node time| (one-way latency included)


@dataclass(frozen=True)
class NodeState:
    state: str  # one of STATES
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _age(seconds: float) -> str:
    s = abs(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def failed_release(row: FleetRow) -> str | None:
    """The release assigned to the node that failed there and is not running, if any."""
    h = row.health or {}
    want = row.desired.release if row.desired is not None else None
    if want and h.get("release_failed") == want and h.get("release") != want:
        return want
    return None


def health_problems(row: FleetRow, now: datetime, th: Thresholds) -> list[str]:
    """What the node's health and certificate say is wrong (degraded reasons)."""
    out: list[str] = []
    h: dict[str, Any] = row.health or {}
    for name, (state, error) in sorted((h.get("pipelines") or {}).items()):
        if state in BAD_PIPELINE_STATES or error:
            out.append(f"pipeline {name} {state}" + (f": {error}" if error else ""))
    for prio, (records, age) in sorted((h.get("outbox") or {}).items(),
                                       key=lambda kv: -int(kv[0])):
        if records and age > th.outbox_age_s:
            out.append(f"outbox priority {prio}: {records:,} records waiting, oldest "
                       f"{_age(age)}")
    free, total = h.get("disk_free"), h.get("disk_total")
    if free is not None and (free < th.disk_free_bytes
                             or (total and free / total < th.disk_free_ratio)):
        share = f" ({100 * free / total:.1f}%)" if total else ""
        out.append(f"disk: {free / 2**20:,.0f} MiB free{share}")
    left = (row.node.cert_expiry - now).total_seconds()
    if left < th.cert_expiry_s:
        out.append("certificate expired" if left <= 0 else
                   f"certificate expires in {_age(left)}")
    offset = h.get("clock_offset_s")
    if offset is not None and abs(offset) > th.clock_offset_s:
        out.append(f"clock off by {offset:+.1f} s")
    failed = failed_release(row)
    if failed:
        out.append(f"release {failed} failed on the node; it runs "
                   f"{h.get('release') or 'no release'}")
    return out


def classify(row: FleetRow, now: datetime, th: Thresholds = Thresholds()) -> NodeState:
    """The node's state and why (see the module docstring)."""
    n = row.node
    if row.quarantine is not None:
        return NodeState("quarantined", (row.quarantine or "quarantined",))
    if n.decommissioned:
        return NodeState("offline", ("decommissioned",))
    if n.revoked:
        return NodeState("offline", ("revoked",))
    if n.last_seen is None:
        return NodeState("offline", ("never connected",))
    silent = (now - n.last_seen).total_seconds()
    if n.status != "online":
        return NodeState("offline", (f"session ended; last seen {_age(silent)} ago",))
    if silent > th.offline_after_s:
        return NodeState("offline", (f"no heartbeat for {_age(silent)}",))
    problems = health_problems(row, now, th)
    if problems:
        return NodeState("degraded", tuple(problems))
    return NodeState("online", ())


def drift(row: FleetRow, layers: Sequence[Layer] | None, now: datetime) -> list[str]:
    """Why the node's reported state differs from its desired state (empty: no drift).
    ``layers``: the fleet and group layers (the node's own is in ``row``); None: skip the
    check that the layers' effective config is what the node is desired to run."""
    out: list[str] = []
    d, r = row.desired, row.reported
    if layers is not None:
        own = [row.node_layer] if row.node_layer is not None else []
        eff = effective([*layers, *own], row.node.id, row.node.labels)
        if eff.layers:
            changes = diff(d.config if d is not None else {}, eff)
            if changes:
                keys = ", ".join(c.key for c in changes[:10])
                more = f" and {len(changes) - 10} more" if len(changes) > 10 else ""
                out.append(f"config layers not applied: {keys}{more} would change "
                           "(`edgewise config apply`)")
    if d is None:
        return out
    applied = r.applied_version if r is not None else None
    if r is None:
        out.append(f"never reported (desired v{d.version})")
    elif applied is None or applied < d.version:
        have = f"v{applied}" if applied else "none"
        if d.expires_at is not None and d.expires_at < now.timestamp():
            out.append(f"desired v{d.version} expired before it was applied (applied {have})")
        else:
            where = "" if row.node.status == "online" else " (the node is offline)"
            out.append(f"desired v{d.version} not applied (applied {have}){where}")
        if "refused" in r.status or "not applied" in r.status or "failed" in r.status:
            out.append(f"the node says: {r.status}")
    elif "failed" in r.status:
        out.append(f"the node says: {r.status}")
    h = row.health or {}
    if d.release and row.health is not None and h.get("release") != d.release:
        failed = " (it failed there)" if h.get("release_failed") == d.release else ""
        out.append(f"release {d.release} assigned, running "
                   f"{h.get('release') or 'none'}{failed}")
    if row.pending_setpoints:
        out.append("setpoints the node does not hold yet: " + ", ".join(row.pending_setpoints))
    return out
