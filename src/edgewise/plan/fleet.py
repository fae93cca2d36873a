"""The fleet: the control plane that serves every site (`control_plane`), and the checks of
the design against the hard constraints and the workload's requirements (the computed
requirement checks are `edgewise.plan.checks`)."""

from __future__ import annotations

import math

from edgewise.plan.capabilities import installed
from edgewise.plan.checks import computed_checks
from edgewise.plan.results import Check, ControlPlane, SitePlan, is_alarm
from edgewise.plan.site_figures import RELEASE_SLOT
from edgewise.plan.workload import Workload

# control plane
HEARTBEAT_S = 30.0
SESSIONS_PER_REPLICA = 5_000
CHUNKS_PER_REPLICA = 5_000  # chunk ingests per second per replica (batched DB writes)
BYTES_PER_REPLICA = 50e6
PG_ROWS_PER_S = 50_000  # batched multi-row inserts one PostgreSQL primary sustains
SQLITE_MAX_NODES = 50
SQLITE_MAX_ROWS = 500
REPLICA_CORES = 2
REPLICA_RAM = 4 * 1024**3
HARD_SCALE = 10_000


def control_plane(workload: Workload, sites: list[SitePlan]) -> ControlPlane:
    nodes = workload.fleet_size
    design = max(nodes, HARD_SCALE)
    per_node_chunks = 0.0
    per_node_bytes = 0.0
    payload = 0.0
    total_nodes = 0
    for sp in sites:
        fig = sp.final
        cal = fig.calibration
        n = sp.site.count * max(sp.site.nodes, fig.sizing.nodes)
        total_nodes += n
        chunks = 0.0
        for s in sp.streams:
            recs = cal.stream_records.get(s.name, 0.0)
            interval = sp.site.link.batch_interval
            lam = recs * interval
            chunks += (1 - math.exp(-lam)) / interval if lam < 50 else 1 / interval
        per_node_chunks += chunks * sp.site.count
        per_node_bytes += fig.edge_wire_per_s * sp.site.count
        payload += sum(cal.stream_payload.values()) * sp.site.count
    sites_total = sum(sp.site.count for sp in sites) or 1
    chunk_rate = per_node_chunks * nodes / sites_total
    byte_rate = per_node_bytes * nodes / sites_total
    hb = nodes / HEARTBEAT_S

    def replicas_for(n: int, chunks: float, bytes_: float) -> int:
        need = max(n / SESSIONS_PER_REPLICA, chunks / CHUNKS_PER_REPLICA,
                   bytes_ / BYTES_PER_REPLICA)
        return max(2, math.ceil(need) + 1)

    rows = chunk_rate + hb
    store = "SQLite (embedded)" if nodes <= SQLITE_MAX_NODES and rows <= SQLITE_MAX_ROWS \
        else "PostgreSQL"
    scale = design / nodes
    rows_scale = rows * scale
    ok = rows_scale <= PG_ROWS_PER_S
    if ok:
        note = (f"at {design:,} nodes: {rows_scale:,.0f} rows/s of {PG_ROWS_PER_S:,} a "
                f"PostgreSQL primary takes in batches")
    else:
        factor = math.ceil(rows_scale / PG_ROWS_PER_S)
        note = (f"at {design:,} nodes: {rows_scale:,.0f} rows/s exceed {PG_ROWS_PER_S:,}; "
                f"send chunks {factor}x less often or partition the store by node")
    storage = payload * nodes / sites_total * workload.requirements.retention * 1.2
    # an embedded SQLite store is one process; replicas share PostgreSQL (principle 9 of
    # docs/architecture.md)
    replicas = 1 if store.startswith("SQLite") else replicas_for(nodes, chunk_rate, byte_rate)
    return ControlPlane(
        nodes, design, hb, chunk_rate, byte_rate, replicas,
        store, rows, storage, ok, note, rows_scale,
        replicas_for(design, chunk_rate * scale, byte_rate * scale),
    )


def hard_constraints(workload: Workload, sites: list[SitePlan],
                     control: ControlPlane) -> list[Check]:
    checks: list[Check] = []
    # 1. autonomy during partitions
    problems = []
    for sp in sites:
        for st in sp.stages:
            if (st.during_outage or st.local is not None or is_alarm(st)) and \
                    sp.where(st.id) == "cloud":
                problems.append(f"{sp.name}: {st.id} runs in the cloud")
        fig = sp.final
        if not fig.sizing.fits:
            problems.append(f"{sp.name}: no node option holds the outbox and the stages")
        if sp.linksim is not None and sp.linksim.lost_bytes.get("alarm", 0) > 0:
            problems.append(f"{sp.name}: alarms lost in the link simulation")
    checks.append(Check(
        "nodes autonomous during partitions", not problems,
        "; ".join(problems) if problems else
        "every alarm, local action and outage-critical stage runs at the edge; the outbox "
        "rides out the longest outage on the chosen node"))
    # 2. atomic updates with rollback: the updater exists (detected in the code) and two
    # release slots fit on every node
    caps = installed()
    bad = [sp.name for sp in sites if sp.final.sizing.disk > sp.final.sizing.option.disk]
    slots = (f"no room for two release slots ({RELEASE_SLOT // 1024**3} GiB each) on "
             f"{', '.join(bad)}" if bad else
             f"two release slots ({RELEASE_SLOT // 1024**3} GiB each) fit on every node's disk")
    if caps.has("ab_rollback"):
        slots += ("; the node's updater (edge/updater) switches slots and rolls back when its "
                  "health gate fails")
    else:
        slots += "; " + caps.state("ab_rollback")
    checks.append(Check("atomic updates with rollback", not bad and caps.has("ab_rollback"),
                        slots))
    # 3. encryption
    detail = ("all edge-cloud traffic uses one mutual-TLS 1.3 session per node; the bandwidth "
              "figures include the TLS record overhead")
    if not workload.requirements.encryption:
        detail += " (the workload asked for none; Edgewise encrypts regardless)"
    checks.append(Check("all edge-cloud traffic encrypted", True, detail))
    # 4. scale
    checks.append(Check("management scales to 10,000+ nodes", control.ok_at_scale,
                        f"{control.replicas_at_scale} control-plane replicas; "
                        + control.scale_note))
    return checks


def requirement_checks(workload: Workload, sites: list[SitePlan]) -> list[Check]:
    """The workload's requirements: the computed checks of `edgewise.plan.checks` (latency,
    link capacity, privacy, CPU, memory, disk) and offline autonomy, unmet ones first."""
    out = computed_checks(workload, sites)
    for sp in sites:
        fig = sp.final
        out.append(Check(
            f"{sp.name}: offline autonomy", fig.sizing.fits and math.isfinite(fig.drain_s),
            f"outbox of {fig.outbox_bytes / 1024**2:,.0f} MiB holds "
            f"{fig.outage_s / 3600:,.1f} h of output; drains in "
            f"{_dur(fig.drain_s)} after the longest outage"))
    return sorted(out, key=lambda c: c.met)


def _dur(s: float) -> str:
    if not math.isfinite(s):
        return "never (the uplink is too small)"
    if s < 120:
        return f"{s:,.0f} s"
    if s < 7200:
        return f"{s / 60:,.0f} min"
    return f"{s / 3600:,.1f} h"
