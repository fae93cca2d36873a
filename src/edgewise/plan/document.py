"""The architecture document: Markdown and HTML from one list of blocks.

Every number comes from the `Plan` (the model, or the simulation when it ran); the text only
arranges them. Blocks are headings, paragraphs, bullet lists, tables and images; `to_markdown`
and `to_html` render the same blocks, so the two versions never disagree.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from typing import Any

SECTIONS = (
    "Edge Topology Design",
    "Processing Distribution",
    "Data Synchronization",
    "Security Architecture",
    "Fleet Management",
    "Operational Procedures",
    "Expected Results",
)


@dataclass
class H:
    level: int
    text: str


@dataclass
class P:
    text: str


@dataclass
class UL:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Img:
    src: str
    alt: str


Block = H | P | UL | Table | Img


# -- formatting ----------------------------------------------------------------------------------

def rate(bps: float) -> str:
    """Bytes per second as kbit/s or Mbit/s."""
    bits = bps * 8
    if bits >= 1e6:
        return f"{bits / 1e6:,.2f} Mbit/s"
    return f"{bits / 1e3:,.2f} kbit/s"


def ms(s: float) -> str:
    if not math.isfinite(s):
        return "never"
    return f"{s * 1000:,.2f} ms" if s < 1 else f"{s * 1000:,.0f} ms"


def dur(s: float) -> str:
    if not math.isfinite(s):
        return "never"
    if s < 120:
        return f"{s:,.0f} s"
    if s < 3 * 3600:
        return f"{s / 60:,.0f} min"
    return f"{s / 3600:,.1f} h"


def size(b: float) -> str:
    if b >= 1024**4:
        return f"{b / 1024**4:,.1f} TiB"
    if b >= 1024**3:
        return f"{b / 1024**3:,.1f} GiB"
    return f"{b / 1024**2:,.0f} MiB"


def usd(x: float) -> str:
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def pct(x: float) -> str:
    return f"{x:.1%}" if x < 0.999 or x == 1 else f"{x:.3%}"


def num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:,.2f}"
    return f"{x:.3g}"


def ratio(meas: float, est: float) -> str:
    return f"{meas / est:.2f}" if est else "-"


# -- the document --------------------------------------------------------------------------------

def build(plan: Any) -> list[Block]:
    w = plan.workload
    b: list[Block] = [H(1, f"Architecture: {w.name}")]
    sim = "measured by running the Edgewise engine on synthetic data (`--simulate`)" \
        if plan.simulated else "estimated by the planner's model (run with `--simulate` to " \
        "measure them on the real engine)"
    n_sites = sum(s.count for s in w.sites)
    b.append(P(f"Use case: {w.body.use_case}. The fleet has {_n(w.total_nodes, 'edge node')} "
               f"at {_n(n_sites, 'site')} of {_n(len(w.sites), 'type')}; figures are {sim}."))
    unmet = plan.unmet
    if unmet:
        b.append(H(2, "Unmet constraints"))
        b.append(P(f"**{len(unmet)} requirement(s) or hard constraint(s) are NOT met by this "
                   "design.** Each needs a decision before hardware is bought:"))
        b.append(UL([f"**UNMET** {x}" for x in unmet]))
    else:
        b.append(P("**All hard constraints and requirements are met:** "
                   + "; ".join(c.name for c in plan.hard) + "."))
    b.append(P("Hard constraints, checked against this design:"))
    b.append(UL([f"{'met' if c.met else '**UNMET**'}: {c.name}: {c.detail}"
                 for c in plan.hard]))
    b.append(P("Requirements of the workload:"))
    b.append(UL([f"{'met' if c.met else '**UNMET**'}: {c.name}: {c.detail}"
                 for c in plan.requirements]))
    _topology(b, plan)
    _processing(b, plan)
    _sync(b, plan)
    _security(b, plan)
    _fleet(b, plan)
    _operations(b, plan)
    _results(b, plan)
    return b


def _topology(b: list[Block], plan: Any) -> None:
    w = plan.workload
    b.append(H(2, "1. Edge Topology Design"))
    b.append(P("Three tiers: devices (sensors and their gateways) on the site network; one or "
               "more edge nodes per site running the Edgewise agent on K3s; the control plane "
               "in the cloud. Data moves up through each node's durable outbox; intent "
               "(configuration, releases) moves down."))
    b.append(Img("topology.png", "Topology: devices, edge nodes, link and control plane"))
    readings = sum(sp.final.readings_per_s * sp.site.count for sp in plan.sites)
    nodes = sum(sp.site.count * sp.final.sizing.nodes for sp in plan.sites)
    cp = plan.control
    sensors = sum(s.count * sp.site.count for sp in plan.sites for s in sp.site.sources)
    b.append(UL([
        f"Device tier: {sensors:,} "
        f"sensors produce {num(readings)} readings per second across the fleet; they speak "
        f"{', '.join(sorted({s.protocol for sp in plan.sites for s in sp.site.sources}))} to "
        "their site's node and never to the cloud.",
        f"Edge tier: {nodes:,} node(s) run the agent, the pipeline engine, the local broker "
        "and the outbox; each keeps working with the link down and acts on alarms locally.",
        (f"Cloud tier: one control-plane process on {cp.store} takes "
         f"{rate(cp.ingest_bytes_per_s)} of edge output, runs the stages that need fleet-wide "
         "context, and holds identity, configuration and releases."
         if cp.replicas == 1 else
         f"Cloud tier: {cp.replicas} stateless control-plane replicas on {cp.store} take "
         f"{rate(cp.ingest_bytes_per_s)} of edge output, run the stages that need fleet-wide "
         "context, and hold identity, configuration and releases."),
    ]))
    rows = []
    for sp in plan.sites:
        s = sp.final.sizing
        rows.append([sp.name, f"{sp.site.count:,}", f"{s.nodes}", s.option.name,
                     f"{s.cores_required:.2f} of {s.option.cores}",
                     f"{size(s.ram)} of {size(s.option.ram)}",
                     f"{size(s.disk)} of {size(s.option.disk)}", usd(s.option.price)])
    b.append(H(3, "Node specifications"))
    b.append(P("Sizes include headroom: CPU for a peak utilisation of "
               f"{w.requirements.utilisation:.0%}, RAM x1.5, disk x1.25 over OS, K3s, two "
               "release slots, logs and the outbox."))
    b.append(Table(["site", "sites", "nodes/site", "node", "cores needed", "RAM", "disk",
                    "price"], rows))
    b.append(H(3, "Network architecture"))
    items = []
    for sp in plan.sites:
        ln = sp.site.link
        items.append(f"{sp.name}: {ln.kind}, {ln.uplink / 1e6:g} Mbit/s up / "
                     f"{ln.downlink / 1e6:g} Mbit/s down, RTT p50 {ms(ln.rtt.p50)} / p99 "
                     f"{ms(ln.rtt.p99)}, availability {pct(ln.availability)}, longest outage "
                     f"{dur(ln.longest_outage)}, {usd(ln.cost_per_gb)}/GB. Sensors reach the "
                     f"node over the site LAN (RTT p99 {ms(sp.site.lan.p99)}); the node opens "
                     "one outbound mutual-TLS session, no inbound port.")
    b.append(UL(items))
    inferred = [i for i in w.inferred if not i.field.startswith("architecture.")]
    arch = [i for i in w.inferred if i.field.startswith("architecture.")]
    b.append(P("Defaults the planner applied: " + "; ".join(
        f"{i.field.split('.', 1)[1]}: {i.value}" for i in arch) + "."))
    if inferred:
        b.append(UL([f"`{i.field}` = {i.value} ({i.why})" for i in inferred]))


def _processing(b: list[Block], plan: Any) -> None:
    b.append(H(2, "2. Processing Distribution"))
    b.append(P("Each stage is scored on seven criteria; a required verdict wins, otherwise the "
               "scores add up (positive: edge). Data only flows upwards, so an edge stage pulls "
               "its inputs to the edge."))
    for sp in plan.sites:
        by = {w_: [st.id for st in sp.stages if sp.where(st.id) == w_]
              for w_ in ("edge", "cloud", "split")}
        edge_cores = sum(sp.final.calibration.stage_cpu_us[i] for i in by["edge"] + by["split"])
        b.append(P(f"{sp.name}: {len(by['edge'])} stage(s) at the edge "
                   f"({', '.join(by['edge']) or 'none'}), {len(by['cloud'])} in the cloud "
                   f"({', '.join(by['cloud']) or 'none'}), {len(by['split'])} split "
                   f"({', '.join(by['split']) or 'none'}). The edge stages take "
                   f"{edge_cores / 1e6:.3f} cores and cut the uplink from "
                   f"{rate(sp.final.raw_wire_per_s)} (every reading, Edgewise codec) to "
                   f"{rate(sp.final.edge_wire_per_s)}."))
        for st in sp.stages:
            d = sp.decisions[st.id]
            b.append(H(3, f"{sp.name} / {st.id}: {d.where.upper()}"))
            b.append(Table(["criterion", "score", "why"],
                           [[s.criterion, s.verdict, s.why] for s in d.scores]))
            b.append(P(f"Result: {d.reason}."))
    b.append(H(3, "Estimate and measurement"))
    rows = []
    for sp in plan.sites:
        e = sp.estimate.calibration
        m = sp.measured.calibration if sp.measured else None
        for st in sp.stages:
            if sp.where(st.id) == "cloud":
                continue
            rows.append([sp.name, st.id, num(e.stage_out[st.id]),
                         num(m.stage_out[st.id]) if m else "-",
                         num(e.stage_cpu_us[st.id]), num(m.stage_cpu_us[st.id]) if m else "-",
                         ratio(m.stage_cpu_us[st.id], e.stage_cpu_us[st.id]) if m else "-"])
    b.append(Table(["site", "stage", "records/s out (est.)", "(measured)",
                    "CPU us/s (est.)", "(measured)", "ratio"], rows))
    first = plan.sites[0] if plan.sites else None
    if first is not None:
        text = f"Estimated CPU: {first.estimate.calibration.method}."
        if first.measured is not None:
            text += f" Measured: {first.measured.calibration.method}."
        b.append(P(text))


def _sync(b: list[Block], plan: Any) -> None:
    b.append(H(2, "3. Data Synchronization"))
    b.append(P("Pattern: store and forward. Every record enters the node's outbox (SQLite WAL, "
               "group commit with the operator state) before its source is acknowledged; the "
               "uplink sends one chunk per stream per batch interval, alarms first, and deletes "
               "a chunk only after the cloud's durable commit. Sequence numbers per node and "
               "stream make redelivery harmless: at-least-once on the wire, exactly-once in "
               "the store."))
    rows = []
    for sp in plan.sites:
        e = sp.estimate.calibration
        f = sp.final.calibration
        for s in sp.streams:
            rows.append([sp.name, s.name, s.priority, num(f.stream_records.get(s.name, 0)),
                         rate(e.stream_wire.get(s.name, 0)), rate(f.stream_wire.get(s.name, 0)),
                         "yes" if s.compact else "no"])
    b.append(Table(["site", "stream", "priority", "records/s", "uplink (est.)",
                    "uplink (final)", "compactable"], rows))
    b.append(P("Conflict resolution: the cloud owns intent (configuration, releases, labels), "
               "the edge owns what happened. Keys both sides may write, such as set-points "
               "changed on site during an outage, merge by hybrid-logical-clock "
               "last-writer-wins with a deterministic tie-break; overwritten values stay in an "
               "audit trail. The consistency model is eventual: a node that reconnects applies "
               "the newest desired state, never a stale intermediate one."))
    items = []
    for sp in plan.sites:
        f = sp.final
        text = (f"{sp.name}: outage to ride out {dur(f.outage_s)} (the longer of the link's "
                f"longest outage and the offline-autonomy requirement); outbox fill rate "
                f"{rate(f.calibration.stored_per_s)}; planned outbox {size(f.outbox_bytes)}; "
                f"after the outage the backlog drains in {dur(f.drain_s)}. With the engine "
                f"default of 256 MiB, {size(f.lost_default_bytes)} "
                f"({dur(f.lost_default_s)} of output) would be compacted or dropped, oldest "
                "and lowest priority first.")
        if sp.linksim is not None:
            ls = sp.linksim
            text += (f" Link simulation over {dur(ls.horizon_s)} with {len(ls.outages)} "
                     f"outage(s) ({pct(ls.downtime_share)} down): peak backlog "
                     f"{size(ls.max_backlog)}, lost {size(sum(ls.lost_bytes.values()))}.")
        items.append(text)
    b.append(P("Offline handling: pipelines and local alarms run on during an outage; "
               "restarts while offline resume from the last commit."))
    b.append(UL(items))


def _security(b: list[Block], plan: Any) -> None:
    w = plan.workload
    b.append(H(2, "4. Security Architecture"))
    tpm = all(sp.final.sizing.option.tpm for sp in plan.sites)
    personal = [f"{sp.name}/{s.id}" for sp in plan.sites for s in sp.site.sources
                if s.personal_data]
    private = [f"{sp.name}/{st.id}" for sp in plan.sites for st in sp.stages
               if "privacy" in st.needs]
    b.append(P("Zero trust: nothing is trusted for its network address."))
    b.append(UL([
        "Device identity: each node generates its key on first boot"
        + (" in the TPM and proves it with TPM attestation" if tpm else "")
        + "; an enrolment token binds it to its site; certificates live 24 h and renew "
        "automatically; revocation is pushed on the control lane.",
        "Network security: one outbound mutual-TLS 1.3 session per node carries control and "
        "data; the node exposes no inbound port; sensors talk to the node on the site LAN "
        "only, the local MQTT broker listens on the node itself.",
        "Data protection: " + (
            f"personal data ({', '.join(personal)}) never leaves the site; " if personal else "")
        + (f"stages that must stay on site ({', '.join(private)}) run at the edge and only "
           "their aggregates travel; " if private else "")
        + f"cloud retention is {w.requirements.retention / 86400:,.0f} days; release artifacts "
        "are verified with TUF before installation.",
    ]))


def _fleet(b: list[Block], plan: Any) -> None:
    cp = plan.control
    b.append(H(2, "5. Fleet Management"))
    b.append(P(f"Monitoring: every node sends a heartbeat every 30 s ({num(cp.heartbeats_per_s)} "
               f"per second for {cp.nodes:,} nodes) with outbox depth, dropped and compacted "
               "counts, alarm latency and CPU; a missing heartbeat or a growing backlog "
               "raises a fleet alarm."))
    b.append(Table(["control plane", f"{cp.nodes:,} nodes (this fleet)",
                    f"{cp.design_nodes:,} nodes (design scale)"], [
        ["replicas (N+1)", f"{cp.replicas}", f"{cp.replicas_at_scale}"],
        ["store", cp.store, "PostgreSQL"],
        ["chunks ingested/s", num(cp.chunks_per_s),
         num(cp.chunks_per_s * cp.design_nodes / cp.nodes)],
        ["database rows/s", num(cp.rows_per_s), num(cp.rows_per_s_at_scale)],
        ["ingest", rate(cp.ingest_bytes_per_s),
         rate(cp.ingest_bytes_per_s * cp.design_nodes / cp.nodes)],
        ["storage for the retention period", size(cp.storage_bytes),
         size(cp.storage_bytes * cp.design_nodes / cp.nodes)],
    ]))
    b.append(P("Updates: releases are signed, verified with TUF and installed into the "
               "inactive A/B slot; the node switches slots atomically and rolls back by itself "
               "if the health gate fails. The rollout plan (`rollout.yaml`) moves in waves:"))
    from edgewise.plan.artefacts import rollout_document

    ro = rollout_document(plan)["spec"]
    b.append(Table(["wave", "nodes", "share", "soak", "gate"], [
        [wv["name"], f"{wv['nodes']:,}", f"{wv['percent']:g}%", dur(wv["gate"]["soak"]),
         f"errors <= {wv['gate']['max_error_rate']:.1%}, no restarts, alarm p99 <= "
         f"{ms(wv['gate']['max_alarm_latency'])}"] for wv in ro["waves"]]))
    b.append(P(f"A rollout step expires after {dur(ro['expires_after'])}, so a node offline "
               "longer never applies a stale step. Configuration management: desired state "
               "is layered (fleet, site type, site, node) and versioned; `agents/<site>.yaml` "
               "is the site-type layer this plan writes."))


def _operations(b: list[Block], plan: Any) -> None:
    b.append(H(2, "6. Operational Procedures"))
    b.append(UL([
        "Deployment: install K3s and the agent, enrol the node with its site token, apply "
        "`agents/<site>.yaml` and `pipelines/<site>.yaml`, check with `edgewise validate`, then "
        "start the rollout in `rollout.yaml` (canary first).",
        "Troubleshooting: `edgewise run --json` prints per-stream counts and alarm latency; "
        "`edgewise dead-letters --data DIR` shows input that could not be used and why; the "
        "heartbeat's outbox depth tells a slow link from a stopped pipeline.",
        "Recovery: after an outage the node drains its backlog by itself, alarms first; a "
        "replaced node enrols with a new key and receives its desired state; a failed release "
        "rolls back to the previous slot; the outbox never deletes what the cloud has not "
        "committed.",
    ]))
    rows = []
    for sp in plan.sites:
        f = sp.final
        rows.append([sp.name, dur(f.outage_s), size(f.outbox_bytes), dur(f.drain_s)])
    b.append(Table(["site", "outage covered", "outbox", "drain after longest outage"], rows))


def _results(b: list[Block], plan: Any) -> None:
    w = plan.workload
    b.append(H(2, "7. Expected Results"))
    rows = []
    for sp in plan.sites:
        lat = sp.final.latency
        rows.append([sp.name, ms(lat.edge_p50), ms(lat.edge_p99), ms(lat.cloud_p50),
                     ms(lat.cloud_p99), pct(lat.edge_within), pct(lat.cloud_within)])
    b.append(P(f"Latency, from a reading accepted to its alarm acted on locally, against "
               f"the maximum of {ms(w.requirements.max_alarm_latency)}:"))
    b.append(Table(["site", "edge p50", "edge p99", "cloud p50", "cloud p99",
                    "edge within max", "cloud within max (outages included)"], rows))
    b.append(Img("latency.png", "Alarm latency distributions, edge vs cloud path"))
    rows = []
    fleet_before = fleet_after = cost_before = cost_after = 0.0
    for sp in plan.sites:
        f = sp.final
        n = sp.site.count
        gb_b, gb_a = f.gb_month(f.naive_per_s), f.gb_month(f.edge_wire_per_s)
        c = sp.site.link.cost_per_gb
        fleet_before += gb_b * n
        fleet_after += gb_a * n
        cost_before += gb_b * n * c
        cost_after += gb_a * n * c
        rows.append([sp.name, rate(f.naive_per_s), rate(f.raw_wire_per_s),
                     rate(f.edge_wire_per_s),
                     f"{f.naive_per_s / max(f.edge_wire_per_s, 1e-9):,.0f}x",
                     f"{gb_b:,.1f} -> {gb_a:,.2f}", f"{usd(gb_b * c)} -> {usd(gb_a * c)}"])
    b.append(P("Bandwidth per site: the naive design sends one JSON message per reading over "
               "MQTT and TLS; the edge design sends the streams above through the Edgewise "
               "codec (TLS, framing and TCP/IP headers included):"))
    b.append(Table(["site", "naive", "all readings, codec", "edge design", "reduction",
                    "GB/month", "link cost/month"], rows))
    b.append(P(f"Fleet: {fleet_before:,.0f} GB/month becomes {fleet_after:,.1f} GB/month; link "
               f"cost {usd(cost_before)} becomes {usd(cost_after)} per month."))
    b.append(Img("bandwidth.png", "Uplink bandwidth per site"))
    items = []
    for sp in plan.sites:
        f = sp.final
        lat = f.latency
        if sp.linksim is not None:
            ls = sp.linksim
            lost = sum(ls.lost_bytes.values())
            by = ls.by_capacity
            items.append(
                f"{sp.name}: over {dur(ls.horizon_s)} of simulated link with "
                f"{pct(ls.downtime_share)} downtime, the planned outbox loses "
                f"{size(lost)} ({pct(ls.lost_share)}); the default 256 MiB outbox would lose "
                f"{size(sum(by.get('default', {}).values()))}, no outbox "
                f"{size(sum(by.get('none', {}).values()))}. Alarms reach the plant in "
                f"{pct(lat.edge_within)} of cases within the maximum, against "
                f"{pct(lat.cloud_within)} through the cloud.")
        else:
            items.append(
                f"{sp.name}: the outbox holds {dur(f.outage_s)} of output, so a link outage "
                f"loses nothing; alarms within the maximum: {pct(lat.edge_within)} at the "
                f"edge against {pct(lat.cloud_within)} through the cloud.")
    b.append(P("Reliability:"))
    b.append(UL(items))
    gains = []
    for sp in plan.sites:
        f = sp.final
        lat = f.latency
        gains.append(
            f"{sp.name}: alarm p99 {ms(lat.edge_p99)} instead of {ms(lat.cloud_p99)} "
            f"({lat.cloud_p99 / max(lat.edge_p99, 1e-9):,.0f}x faster) and independent of the "
            f"link; uplink {f.naive_per_s / max(f.edge_wire_per_s, 1e-9):,.0f}x smaller than "
            f"the naive design; {dur(f.outage_s)} of autonomy with nothing lost.")
    b.append(P("Improvements, quantified:"))
    b.append(UL(gains))
    b.append(Img("backlog.png", "Outbox backlog during the longest outage"))
    if plan.simulated:
        rows = []
        for sp in plan.sites:
            e, m = sp.estimate, sp.measured
            if m is None:
                continue
            rows.append([sp.name, "uplink bytes/s", num(e.edge_wire_per_s),
                         num(m.edge_wire_per_s), ratio(m.edge_wire_per_s, e.edge_wire_per_s)])
            er = sum(e.calibration.stream_records.values())
            mr = sum(m.calibration.stream_records.values())
            rows.append([sp.name, "records/s to the cloud", num(er), num(mr), ratio(mr, er)])
            ec = sum(e.calibration.stage_cpu_us[s.id] for s in sp.stages
                     if sp.where(s.id) != "cloud")
            mc = sum(m.calibration.stage_cpu_us[s.id] for s in sp.stages
                     if sp.where(s.id) != "cloud")
            rows.append([sp.name, "stage CPU us/s", num(ec), num(mc), ratio(mc, ec)])
            rows.append([sp.name, "node cores", num(e.sizing.cores_needed),
                         num(m.sizing.cores_needed),
                         ratio(m.sizing.cores_needed, e.sizing.cores_needed)])
        b.append(P("Model against measurement (the figures above use the measurement):"))
        b.append(Table(["site", "figure", "estimate", "measured", "ratio"], rows))
    if plan.assumed:
        b.append(P("Assumptions the model could not derive: " + "; ".join(plan.assumed) + "."))


# -- rendering -----------------------------------------------------------------------------------

def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for blk in blocks:
        if isinstance(blk, H):
            out.append(f"{'#' * blk.level} {blk.text}\n")
        elif isinstance(blk, P):
            out.append(blk.text + "\n")
        elif isinstance(blk, UL):
            out.append("\n".join(f"- {i}" for i in blk.items) + "\n")
        elif isinstance(blk, Table):
            lines = ["| " + " | ".join(_cell(c) for c in blk.header) + " |",
                     "|" + "|".join("---" for _ in blk.header) + "|"]
            lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in blk.rows]
            out.append("\n".join(lines) + "\n")
        elif isinstance(blk, Img):
            out.append(f"![{blk.alt}]({blk.src})\n")
    return "\n".join(out)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def to_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for blk in blocks:
        if isinstance(blk, H):
            body.append(f"<h{blk.level}>{_inline(blk.text)}</h{blk.level}>")
        elif isinstance(blk, P):
            body.append(f"<p>{_inline(blk.text)}</p>")
        elif isinstance(blk, UL):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in blk.items) + "</ul>")
        elif isinstance(blk, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in blk.header)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>"
                           for r in blk.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(blk, Img):
            body.append(f'<figure><img src="{html.escape(blk.src)}" alt="{html.escape(blk.alt)}">'
                        f"<figcaption>{html.escape(blk.alt)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
             "padding:.25em .5em;font-size:.9em;text-align:left}img{max-width:100%}"
             "code{background:#f3f3f3;padding:0 .2em}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _n(count: int, noun: str) -> str:
    """``1 site``, ``3 sites``."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def word_count(markdown: str) -> int:
    """Words of the document: tokens with a letter or digit, image lines excluded."""
    text = "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))
    text = re.sub(r"^\|?-{3}.*$", "", text, flags=re.M)
    return len(re.findall(r"[A-Za-z0-9$][^\s|]*", text))
