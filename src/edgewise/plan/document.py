"""The architecture document: its seven sections as one list of blocks (`build`).

Every number comes from the `Plan` (the model, or the simulation when it ran); the text only
arranges them. Blocks are headings, paragraphs, bullet lists, tables and images
(`edgewise.plan.blocks`, which renders them as Markdown and HTML, so the two versions never
disagree); numbers are written by `edgewise.plan.formatting`. What Edgewise does is stated from the
capability registry (`edgewise.plan.capabilities`): built features as the design, the rest as
recommendations; Security, Fleet Management and Operational Procedures are written from the
workload's facts by `edgewise.plan.narrative`.

`build_within` keeps the document inside `WORDS` (counted by `blocks.word_count`): over the
range it shortens the placement tables to one line per stage; what it cannot fix is returned
as a warning, never passed over in silence.
"""

from __future__ import annotations

from typing import Any

from edgewise.plan import narrative
from edgewise.plan.blocks import UL, Block, H, Img, P, Table, to_markdown, word_count
from edgewise.plan.capabilities import BY_KEY, RECOMMEND, Capabilities, installed
from edgewise.plan.checks import alarm_latency, baseline_fits
from edgewise.plan.formatting import dur, ms, num, pct, plural, rate, ratio, size, usd
from edgewise.plan.results import is_alarm

WORDS = (1500, 2500)  # the document's word range (blocks.word_count)

SECTIONS = (
    "Edge Topology Design",
    "Processing Distribution",
    "Data Synchronization",
    "Security Architecture",
    "Fleet Management",
    "Operational Procedures",
    "Expected Results",
)


# -- the document --------------------------------------------------------------------------------

def build_within(plan: Any, caps: Capabilities | None = None
                 ) -> tuple[list[Block], int, list[str]]:
    """The document inside the word range if it can be: blocks, words and warnings. The
    shorter form has one line per stage instead of its placement table, lists met checks by
    name (their numbers are in the sections and `plan.json`), leaves the architecture
    defaults out, and names no modules in the capability tables (nor repeats the TPM's
    sentence under them)."""
    doc = build(plan, caps)
    words = word_count(to_markdown(doc))
    warnings: list[str] = []
    lo, hi = WORDS
    if words > hi:
        doc = build(plan, caps, compact=True)
        shorter = word_count(to_markdown(doc))
        warnings.append(f"the document had {words:,} words, over {hi:,}: written in its "
                        f"shorter form ({shorter:,} words)")
        words = shorter
        if words > hi:
            warnings.append(f"still {words:,} words, over {hi:,}: the workload has more sites "
                            "and stages than the range allows for")
    elif words < lo:
        warnings.append(f"the document has {words:,} words, under {lo:,}: the workload gives "
                        "few facts to write from (one site type, few sources or stages)")
    return doc, words, warnings


def build(plan: Any, caps: Capabilities | None = None, compact: bool = False) -> list[Block]:
    caps = caps or installed()
    w = plan.workload
    b: list[Block] = [H(1, f"Architecture: {w.name}")]
    sim = "measured by running the Edgewise engine on synthetic data (`--simulate`)" \
        if plan.simulated else "estimated by the planner's model (run with `--simulate` to " \
        "measure them on the real engine)"
    n_sites = sum(s.count for s in w.sites)
    b.append(P(f"Use case: {w.body.use_case}. The {w.name} fleet has "
               f"{plural(w.total_nodes, 'edge node')} at {plural(n_sites, 'site')} of "
               f"{plural(len(w.sites), 'type')}; figures are {sim}."))
    unmet = plan.unmet
    findings = list(getattr(plan, "findings", []) or [])
    if unmet:
        b.append(H(2, "Unmet constraints"))
        b.append(P(f"**{len(unmet)} requirement(s) or hard constraint(s) are NOT met by this "
                   f"design.** Each needs a decision before hardware is bought for {w.name}:"))
        b.append(UL([f"**UNMET** {x}" for x in unmet]))
    else:
        b.append(P(f"**All {len(plan.hard) + len(plan.requirements)} hard constraints and "
                   f"requirements of {w.name} are met**, each computed from the plan below"
                   + (", but the simulation found what the estimate did not expect (below)."
                      if findings else ".")))
    if findings:
        b.append(H(2, "Simulation findings"))
        b.append(UL([f"**FINDING** {fd.message}" for fd in findings]))
    b.append(H(3, "Checks (unmet first)"))
    if compact:
        b.append(P("Met, each computed from this plan (the numbers are in the sections below "
                   "and in `plan.json`): " + "; ".join(
                       c.name for c in plan.hard + plan.requirements if c.met) + "."))
    else:
        b.append(Table(["kind", "check", "result", "the numbers"], [
            [kind, c.name, "met" if c.met else "**UNMET**", c.detail if c.met else "above"]
            for kind, checks in (("hard constraint", plan.hard),
                                 ("requirement", plan.requirements))
            for c in sorted(checks, key=lambda c: c.met)]))
    _topology(b, plan, caps, compact)
    _processing(b, plan, compact)
    _sync(b, plan, caps, compact)
    narrative.security_section(b, plan, caps, compact)
    narrative.fleet_section(b, plan, caps, compact)
    narrative.operations_section(b, plan, caps, compact)
    _results(b, plan)
    return b


def _topology(b: list[Block], plan: Any, caps: Capabilities, compact: bool = False) -> None:
    w = plan.workload
    b.append(H(2, "1. Edge Topology Design"))
    tiers = list(dict.fromkeys(t for sp in plan.sites
                               for t in (getattr(sp.site, "tiers", None) or [])))
    b.append(P(f"{w.name} runs in tiers: " + (", ".join(tiers) + " declared by the workload, "
                                             if tiers else "")
               + "devices of " + ", ".join(sorted({s.kind for sp in plan.sites
                                                 for s in sp.site.sources}))
               + " on the site networks of " + ", ".join(sp.name for sp in plan.sites)
               + ", Edgewise nodes at each of them, and the control plane in the cloud."))
    b.append(Img("topology.png", "Topology: devices, edge nodes, link and control plane"))
    readings = sum(sp.final.readings_per_s * sp.site.count for sp in plan.sites)
    nodes = sum(sp.site.count * sp.final.sizing.nodes for sp in plan.sites)
    cp = plan.control
    sensors = sum(s.count * sp.site.count for sp in plan.sites for s in sp.site.sources)
    b.append(UL([
        f"Device tier: {sensors:,} sensors of "
        f"{', '.join(sorted({s.id for sp in plan.sites for s in sp.site.sources}))} produce "
        f"{num(readings)} readings per second across the fleet; they speak "
        f"{', '.join(sorted({s.protocol for sp in plan.sites for s in sp.site.sources}))} to "
        "their site's node and never to the cloud.",
        f"Edge tier: {nodes:,} node(s) at {', '.join(sp.name for sp in plan.sites)} run the "
        "agent, the pipeline engine and the outbox; each keeps working with the link down and "
        "acts on "
        + (', '.join(sorted({st.id for sp in plan.sites for st in sp.stages
                             if is_alarm(st) and sp.where(st.id) != 'cloud'})) or "its stages")
        + " locally.",
        (f"Cloud tier of {w.name}: {cp.replicas} control-plane process(es) on {cp.store} take "
         f"{rate(cp.ingest_bytes_per_s)} of edge output and hold identity, desired state, "
         "releases and the stored records. " + _cloud_stages(plan, caps)),
    ]))
    rows = []
    for sp in plan.sites:
        s = sp.final.sizing
        rows.append([sp.name, f"{sp.site.count:,}", f"{s.nodes}", s.option.name,
                     f"{s.cores_required:.2f} of {s.option.cores}",
                     f"{size(s.ram)} of {size(s.option.ram)}",
                     f"{size(s.disk)} of {size(s.option.disk)}", usd(s.option.price)])
    b.append(H(3, "Node specifications"))
    b.append(P(f"Sizes for {', '.join(sp.name for sp in plan.sites)} include headroom: CPU "
               "for a peak utilisation of "
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
                     f"{dur(ln.longest_outage)}, {usd(ln.cost_per_gb)}/GB; its sensors reach "
                     f"the node over the site LAN (RTT p99 {ms(sp.site.lan.p99)}) and the node "
                     "opens one outbound mutual-TLS session, no inbound port."
                     + _second_link(sp, caps))
    b.append(UL(items))
    inferred = [i for i in w.inferred if not i.field.startswith("architecture.")]
    # the security default is stated by the Security section from the capability registry
    arch = [i for i in w.inferred if i.field.startswith("architecture.")
            and i.field != "architecture.security"]
    b.append(H(3, "Defaults the planner applied"))
    b.append(Table(["field", "value", "why"],
                   [[i.field, i.value, i.why] for i in ([] if compact else arch) + inferred]))


def _cloud_stages(plan: Any, caps: Capabilities) -> str:
    cloud = sorted({st.id for sp in plan.sites for st in sp.stages
                    if sp.where(st.id) in ("cloud", "split")})
    if not cloud:
        return f"No stage of {plan.workload.name} is placed in the cloud."
    if caps.has("cloud_execution"):
        return f"The control plane runs {', '.join(cloud)}."
    return (f"{RECOMMEND} {', '.join(cloud)} are placed in the cloud, but "
            + BY_KEY["cloud_execution"].recommend + ".")


def _second_link(sp: Any, caps: Capabilities) -> str:
    sl = getattr(sp.site, "second_link", None)
    if sl is None:
        return ""
    text = (f"second link ({sl.role}) {sl.kind}, {sl.uplink / 1e6:g} Mbit/s up, "
            f"{usd(sl.cost_per_gb)}/GB")
    if sl.window is not None:
        text += f", open daily from {sl.window.start} UTC for {dur(sl.window.length)}"
    use = ("the link model sends data over it while the first link is down"
           if sl.role == "failover" else "the link model adds its rate in that window")
    if caps.has("second_link"):
        return f" The {text}: {use}."
    return f" {RECOMMEND} the {text}: {use}; " + BY_KEY["second_link"].recommend + "."


def _processing(b: list[Block], plan: Any, compact: bool = False) -> None:
    b.append(H(2, "2. Processing Distribution"))
    stages = sorted({st.id for sp in plan.sites for st in sp.stages})
    b.append(P(f"The stages of {plan.workload.name} ({', '.join(stages)}) are placed by seven "
               "scored criteria; a required verdict wins, and an edge stage pulls its inputs to "
               "the edge."))
    for sp in plan.sites:
        by = {w_: [st.id for st in sp.stages if sp.where(st.id) == w_]
              for w_ in ("edge", "cloud", "split")}
        edge_cores = sum(sp.final.calibration.stage_cpu_us[i] for i in by["edge"] + by["split"])
        b.append(P(f"{sp.name}: {len(by['edge'])} stage(s) at the edge "
                   f"({', '.join(by['edge']) or 'none'}), {len(by['cloud'])} in the cloud "
                   f"({', '.join(by['cloud']) or 'none'}), {len(by['split'])} split "
                   f"({', '.join(by['split']) or 'none'}); the edge stages take "
                   f"{edge_cores / 1e6:.3f} cores and cut the uplink from "
                   f"{rate(sp.final.raw_wire_per_s)} (every reading, Edgewise codec) to "
                   f"{rate(sp.final.edge_wire_per_s)}."))
        if compact:
            b.append(Table(["stage", "where", "why"],
                           [[st.id, sp.decisions[st.id].where, sp.decisions[st.id].reason]
                            for st in sp.stages]))
            continue
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
        text = f"Estimated CPU for {plan.workload.name}: {first.estimate.calibration.method}."
        if first.measured is not None:
            text += f" Measured: {first.measured.calibration.method}."
        b.append(P(text))


def _sync(b: list[Block], plan: Any, caps: Capabilities, compact: bool = False) -> None:
    b.append(H(2, "3. Data Synchronization"))
    lead = []
    for sp in plan.sites:
        kinds = {k: [s.name for s in sp.streams if s.kind == k] for k in ("alarm", "data", "raw")}
        parts = [f"{len(v)} {k} stream(s) ({', '.join(v)})" for k, v in kinds.items() if v]
        lead.append(f"{sp.name} sends {' and '.join(parts) or 'nothing'} over "
                    f"{sp.site.link.kind}, one chunk per stream every "
                    f"{sp.site.link.batch_interval:g} s, alarms first.")
    b.append(narrative.capability_table(caps, ["durable_outbox", "exactly_once", "lww_merge",
                                               "forwarders", "cloud_execution"], compact))
    b.append(P("Store and forward: " + " ".join(lead)))
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
    items = []
    for sp in plan.sites:
        f = sp.final
        text = (f"{sp.name}: outage to ride out {dur(f.outage_s)} (the longer of the link's "
                f"longest outage and the offline-autonomy requirement); outbox fill rate "
                f"{rate(f.calibration.stored_per_s)}; planned outbox {size(f.outbox_bytes)}; "
                f"after the outage the backlog drains in {dur(f.drain_s)}.")
        if f.lost_default_bytes > 0:
            text += (f" The engine's default outbox of 256 MiB would overflow: "
                     f"{size(f.lost_default_bytes)} ({dur(f.lost_default_s)} of output) "
                     "compacted or dropped, lowest priority first.")
        if sp.linksim is not None:
            ls = sp.linksim
            text += (f" Link simulation over {dur(ls.horizon_s)} with {len(ls.outages)} "
                     f"outage(s) ({pct(ls.downtime_share)} down): peak backlog "
                     f"{size(ls.max_backlog)}, lost {size(sum(ls.lost_bytes.values()))}.")
        items.append(text)
    b.append(UL(items))


def _results(b: list[Block], plan: Any) -> None:
    w = plan.workload
    b.append(H(2, "7. Expected Results"))
    rows = []
    for sp in plan.sites:
        lat = sp.final.latency
        rows.append([sp.name, ms(lat.edge_p50), ms(lat.edge_p99), ms(lat.cloud_p50),
                     ms(lat.cloud_p99), pct(lat.edge_within), pct(lat.cloud_within)])
    b.append(H(3, f"Alarm latency from a reading accepted to the local action (maximum "
                  f"{ms(w.requirements.max_alarm_latency)})"))
    b.append(Table(["site", "edge p50", "edge p99", "cloud p50", "cloud p99",
                    "edge within max", "cloud within max (outages included)"], rows))
    b.append(Img("latency.png", "Alarm latency distributions, edge vs cloud path"))
    event = [f"{sp.name} / {a.stage}: {a.parts()}, budget {ms(a.budget)}"
             + ("" if a.total <= a.budget else " (**UNMET**)")
             for sp in plan.sites for a in alarm_latency(w, sp)]
    if event:
        b.append(H(3, "Alarm latency from the event, sampling and debounce included"))
        b.append(UL(event))
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
    b.append(H(3, "Bandwidth per site: naive (one JSON message per reading over MQTT and TLS) "
                  "against the edge design (its streams through the Edgewise codec, TLS, "
                  "framing and TCP/IP headers included)"))
    b.append(Table(["site", "naive", "all readings, codec", "edge design", "reduction",
                    "GB/month", "link cost/month"], rows))
    b.append(P(f"The {w.name} fleet: {fleet_before:,.0f} GB/month becomes "
               f"{fleet_after:,.1f} GB/month; link cost {usd(cost_before)} becomes "
               f"{usd(cost_after)} per month."))
    b.append(UL(narrative.baseline_sentences(plan) + narrative.bill_sentences(plan)))
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
                f"{size(sum(by.get('none', {}).values()))}. Alarms reach the site in "
                f"{pct(lat.edge_within)} of cases within the maximum, against "
                f"{pct(lat.cloud_within)} through the cloud.")
        elif f.sizing.fits and f.drain_s < float("inf"):
            items.append(
                f"{sp.name}: the outbox holds {dur(f.outage_s)} of output, so an outage up to "
                f"that long loses nothing; readings accepted to alarm within the maximum: "
                f"{pct(lat.edge_within)} at the edge against {pct(lat.cloud_within)} through "
                "the cloud.")
        else:
            items.append(f"{sp.name}: the outbox does not fit the chosen node or never drains; "
                         "an outage loses data (see the unmet checks).")
    b.append(H(3, "Reliability"))
    b.append(UL(items))
    gains = []
    for sp in plan.sites:
        f = sp.final
        lat = f.latency
        text = (f"{sp.name}: uplink {f.naive_per_s / max(f.edge_wire_per_s, 1e-9):,.0f}x "
                "smaller than the naive design"
                + ("" if baseline_fits(sp)[0] else
                   " (which this link could not carry at all)"))
        worst = max(alarm_latency(w, sp), key=lambda a: a.total, default=None)
        if worst is not None:
            text += (f"; alarm {worst.stage} {ms(worst.total)} from the event at the edge "
                     f"against {ms(worst.total - worst.path_p99 + lat.cloud_p99)} through the "
                     "cloud, independent of the link")
        gains.append(text + ".")
    b.append(H(3, "Improvements, quantified"))
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
        b.append(P(f"Model against measurement for {w.name} (the figures above use the "
                   "measurement):"))
        b.append(Table(["site", "figure", "estimate", "measured", "ratio"], rows))
    if plan.assumed:
        b.append(P("Assumptions the model could not derive: " + "; ".join(plan.assumed) + "."))
