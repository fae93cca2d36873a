"""The document's prose from the workload's own facts: Security Architecture, Fleet
Management and Operational Procedures, and the sentences other sections borrow (what leaves
the site, the bill of a metered link, the baseline against the link).

Every sentence is made from something the workload or the plan says: the protocols in use and
what each needs on the site network (Modbus has no authentication, so the node needs a
segment of its own), the sites and who can touch a node, the nodes per site and what a failure
or an update of one means, the models to deploy, the compliance tags and which streams carry
them, the link's price. What Edgewise itself does comes from the capability registry
(`edgewise.plan.capabilities`): a built feature is stated as the design, anything else as a
recommendation naming what would provide it.
"""

from __future__ import annotations

from typing import Any

from edgewise.plan.blocks import UL, Block, H, P, Table
from edgewise.plan.capabilities import BY_KEY, Capabilities
from edgewise.plan.checks import baseline_fits, leaving, source_tags, usable_uplink
from edgewise.plan.formatting import dur, plural, rate, size, usd
from edgewise.plan.results import SitePlan, is_alarm

TAG_MEANING = {
    "personal": "personal data",
    "phi": "protected health information",
    "pci": "payment card data",
    "biometric": "biometric data",
    "location": "location data",
    "confidential": "confidential business data",
}


def _ids(items: list[str]) -> str:
    return ", ".join(items) if len(items) < 5 else f"{', '.join(items[:4])} and " \
        f"{len(items) - 4} more"


def _sources_by_protocol(plan: Any) -> dict[str, list[tuple[SitePlan, Any]]]:
    out: dict[str, list[tuple[SitePlan, Any]]] = {}
    for sp in plan.sites:
        for s in sp.site.sources:
            out.setdefault(s.protocol, []).append((sp, s))
    return out


def protocol_sentences(plan: Any) -> list[str]:
    """What each protocol in use needs on the site network, naming its sources."""
    out = []
    for proto, items in sorted(_sources_by_protocol(plan).items()):
        names = _ids([f"{sp.name}/{s.id} ({s.kind})" for sp, s in items])
        per_s = sum(s.count * s.rate_hz for _, s in items)
        users = [s for _, s in items if s.connection.get("username")]
        if proto == "modbus":
            out.append(
                f"Modbus TCP from {names} has no authentication and no encryption: any host on "
                "that network can read and write the registers. Put these devices and one "
                "interface of the node on a segment of their own that nothing else reaches, and "
                "let the firewall pass only read function codes from the node; the Edgewise "
                f"Modbus source only polls (reads), {per_s:,.0f} registers per second here.")
        elif proto == "opcua":
            cred = "given in the workload" if users else "not given in the workload yet"
            out.append(
                f"OPC UA from {names}: the Edgewise source logs in with a user name and password "
                f"({cred}) but sets no security policy, so {per_s:,.0f} values per second cross "
                "the site network unsigned and unencrypted; keep the servers on the node's "
                "segment, or put a gateway with the Basic256Sha256 policy in front of them.")
        elif proto == "mqtt":
            out.append(
                f"MQTT from {names}: {per_s:,.0f} messages per second; the Edgewise source logs "
                "in with a user name and password, without TLS, so the broker stays on the node "
                "or the site segment, each device publishes to its own topics only, and port "
                "1883 stays closed beyond the site.")
        elif proto == "http":
            out.append(
                f"HTTP ingest from {names}: the node's HTTP source demands a bearer token when "
                "one is configured (set one: without it any host on the segment can post "
                "readings) and speaks plain HTTP, so it listens on the site network only.")
        elif proto == "file":
            out.append(
                f"Files from {names} are read from the node's own disk: whoever may write that "
                "directory can inject readings, so only the exporting service's account may.")
        else:
            out.append(f"{names} are simulated ({proto}): no device protocol to secure.")
    return out


def privacy_sentence(sp: SitePlan) -> str | None:
    """What leaves the site, said from the stream table (never more than it shows)."""
    tagged = {s.id: source_tags(s) for s in sp.site.sources if source_tags(s)}
    if not tagged:
        return None
    lv = [x for x in leaving(sp) if x.tags]
    raw = [x for x in lv if x.per_record]
    agg = [x for x in lv if not x.per_record]
    what = "; ".join(f"{k} is {', '.join(TAG_MEANING.get(t, t) for t in sorted(v))}"
                     for k, v in sorted(tagged.items()))
    if raw:
        return (f"{sp.name}: {what}, and it leaves the site: stream(s) "
                + ", ".join(f"{x.stream} ({x.records_per_s:,.2f} records/s from "
                            f"{', '.join(x.sources)})" for x in raw)
                + " carry it record by record to the control plane, so the cloud store holds "
                "it too and must be run under the same regime as the site.")
    text = f"{sp.name}: {what}; no record of it crosses the uplink"
    if agg:
        text += (", only " + ", ".join(f"{x.stream} (computed at the edge by "
                                       f"{' -> '.join(x.path)})" for x in agg))
    return text + "."


def capability_table(caps: Capabilities, keys: list[str], compact: bool = False) -> Table:
    """What Edgewise provides for a section: built (with its modules, not in the shorter
    form) or not, and the sentence: the design, or the recommendation."""
    rows = []
    for k in keys:
        cap = BY_KEY[k]
        modules = "" if compact else ": " + ", ".join(f"`{m}`" for m in caps.modules.get(k, ()))
        status = "built" + modules if caps.has(k) else "not built"
        rows.append([cap.title, status, caps.state(k)])
    return Table(["Edgewise capability", "status", "what it means here"], rows)


def _certificates(plan: Any, caps: Capabilities) -> list[str]:
    """Per site type: its longest outage against the certificate lifetime and the grace."""
    hours = float(caps.values.get("cert_hours", "24"))
    grace = float(caps.values.get("grace_days", "7")) * 86400
    out = []
    for sp in plan.sites:
        outage = sp.site.link.longest_outage
        if not caps.has("short_certs"):
            continue
        if outage < hours * 3600 / 3:
            text = (f"{sp.name}: its longest outage ({dur(outage)}) is shorter than the third of "
                    f"a {hours:g} h certificate left after renewal starts, so no certificate "
                    "expires offline.")
        elif caps.has("reauth") and outage <= grace:
            text = (f"{sp.name}: a certificate can expire during its longest outage "
                    f"({dur(outage)}); the node re-authenticates with its key when "
                    f"{sp.site.link.kind} returns, within the control plane's grace of "
                    f"{dur(grace)}.")
        else:
            text = (f"{sp.name}: its longest outage ({dur(outage)}) outlasts the grace of "
                    f"{dur(grace)} for expired certificates, so its nodes need new enrolment "
                    "tokens after it unless `reauth_grace` is raised above it.")
        out.append(text)
    return out


def _tpm_sentence(plan: Any, caps: Capabilities, compact: bool = False) -> str:
    options = sorted({sp.final.sizing.option.name for sp in plan.sites
                      if sp.final.sizing.option.tpm})
    name = plan.workload.name
    lead = (f"the {', '.join(options)} node(s) chosen for {name} have a TPM" if options else
            f"the nodes chosen for {name} have no TPM")
    if compact and options and caps.has("tpm_attestation"):  # the table above says the rest
        return f"{lead[0].upper()}{lead[1:]}: TPM attestation as in the table above."
    return caps.state("tpm_attestation", lead)


def where(plan: Any) -> str:
    """The workload and its site types, for the sentences that apply to all of them."""
    return f"{plan.workload.name} ({', '.join(sp.name for sp in plan.sites)})"


def _physical(plan: Any, caps: Capabilities) -> list[str]:
    out = []
    for sp in plan.sites:
        f = sp.final
        tags = sorted({t for s in sp.site.sources for t in source_tags(s)})
        held = f"{dur(f.outage_s)} of output ({size(f.outbox_bytes)} outbox)"
        if tags:
            held += f" including {', '.join(TAG_MEANING.get(t, t) for t in tags)}"
        out.append(
            f"{sp.name} ({plural(sp.site.count, 'site')}): a node that is stolen or opened "
            f"holds its key and up to {held} in files Edgewise does not encrypt, so use full-disk "
            "encryption, a locked enclosure, and revoke a missing node at once"
            + (f"; its certificate dies within {caps.values.get('cert_hours', '24')} h anyway."
               if caps.has("short_certs") else "."))
    return out


def security_section(b: list[Block], plan: Any, caps: Capabilities,
                     compact: bool = False) -> None:
    w = plan.workload
    b.append(H(2, "4. Security Architecture"))
    nodes = sum(sp.site.count * sp.final.sizing.nodes for sp in plan.sites)
    b.append(capability_table(caps, ["mtls_identity", "short_certs", "reauth",
                                     "enrolment_tokens", "revocation", "tpm_attestation",
                                     "tuf_releases", "retention"], compact))
    b.append(H(3, f"Certificates of the {nodes:,} node(s) against each link's outages"))
    b.append(UL([*_certificates(plan, caps), _tpm_sentence(plan, caps, compact)]))
    b.append(H(3, "Site networks and protocols"))
    b.append(UL(protocol_sentences(plan)))
    b.append(H(3, "Physical access"))
    b.append(UL(_physical(plan, caps)))
    b.append(H(3, "Data protection and compliance"))
    items = [x for x in (privacy_sentence(sp) for sp in plan.sites) if x]
    tags = sorted({t for sp in plan.sites for s in sp.site.sources for t in source_tags(s)})
    retention = w.requirements.retention / 86400
    if tags:
        items.append(
            f"Compliance regimes named in {w.name}: "
            f"{', '.join(TAG_MEANING.get(t, t) for t in tags)}; in transit everything is "
            f"inside the nodes' mutual-TLS sessions, at rest in the cloud store for "
            f"{retention:,.0f} days, whose encryption and access logging are the database's "
            "job.")
    else:
        items.append(f"No source of {w.name} carries a compliance tag; the cloud keeps "
                     f"records {retention:,.0f} days.")
    b.append(UL(items))


def _ha_sentence(sp: SitePlan, caps: Capabilities) -> str:
    n = sp.final.sizing.nodes
    mode = getattr(sp.site, "ha", None)
    alarms = [st.id for st in sp.stages if is_alarm(st) and sp.where(st.id) != "cloud"]
    if n <= 1:
        return (f"{sp.name} has one node per site: while it is down or being replaced, "
                f"{_ids(alarms) or 'its edge stages'} stop at that site and readings are lost "
                "at the source unless the devices buffer them; the outbox on its disk keeps "
                "what was not yet sent.")
    text = (f"{sp.name} has {n} nodes per site" + (f", declared {mode}" if mode else "")
            + f", each sized to carry the whole site alone ({sp.final.sizing.option.name}). ")
    return text + caps.state("site_failover")


def fleet_section(b: list[Block], plan: Any, caps: Capabilities, compact: bool = False) -> None:
    from edgewise.plan.artefacts import rollout_command, rollout_settings, rollout_waves

    cp = plan.control
    b.append(H(2, "5. Fleet Management"))
    b.append(capability_table(caps, ["heartbeats", "metrics", "fleet_alerts", "ab_rollback",
                                     "staged_rollouts", "site_failover"], compact))
    b.append(P(f"Monitoring {cp.nodes:,} node(s) of {where(plan)}: {cp.heartbeats_per_s:,.1f} "
               f"heartbeats and {cp.chunks_per_s:,.1f} chunks a second reach {cp.store}."))
    b.append(Table(["control plane", f"{cp.nodes:,} nodes (this fleet)",
                    f"{cp.design_nodes:,} nodes (design scale)"], [
        ["replicas (N+1)", f"{cp.replicas}", f"{cp.replicas_at_scale}"],
        ["store", cp.store, "PostgreSQL"],
        ["database rows/s", f"{cp.rows_per_s:,.0f}", f"{cp.rows_per_s_at_scale:,.0f}"],
        ["ingest", rate(cp.ingest_bytes_per_s),
         rate(cp.ingest_bytes_per_s * cp.design_nodes / cp.nodes)],
        ["storage for the retention period", size(cp.storage_bytes),
         size(cp.storage_bytes * cp.design_nodes / cp.nodes)],
    ]))
    b.append(H(3, "Updates"))
    items = []
    longest = max(sp.site.link.longest_outage for sp in plan.sites)
    for sp in plan.sites if caps.has("staged_rollouts") else ():
        n = sp.final.sizing.nodes
        budget = (f"; at most {n - 1} of a site's {n} nodes update at once" if n > 1 and
                  not compact else "")
        items.append(f"Releases reach {sp.name} with `{rollout_command(plan, sp)}` (VERSION: "
                     f"a published release){budget}; its steps outlive the longest outage "
                     f"({dur(longest)}).")
    if not caps.has("staged_rollouts"):
        items.append(caps.state("staged_rollouts"))
    b.append(UL(items))
    if not compact and caps.has("staged_rollouts"):
        b.append(Table(["site type", "wave", "nodes", "share", "gates"], [
            [sp.name, name, f"{k:,}", f"{pct:.2g}%",
             "dead letters <= 0.1% of readings, nothing dropped"]
            for sp in plan.sites
            for name, k, pct in rollout_waves(rollout_settings(plan, sp)["nodes"])]))
    models = _model_sentences(plan, caps)
    if models:
        b.append(H(3, "Model deployment"))
        b.append(UL(models))
    b.append(H(3, "High availability"))
    b.append(UL([_ha_sentence(sp, caps) for sp in plan.sites]))
    b.append(P("Configuration of " + ", ".join(
        f"{sp.name} (`edgewise config set --selector site={sp.name}`)" for sp in plan.sites)
        + ": desired state (pipelines, config, set-points, the release to run) is versioned "
        "per node."))


def _model_sentences(plan: Any, caps: Capabilities) -> list[str]:
    w = plan.workload
    models = list(getattr(w.body, "models", []) or [])
    staged = [st.id for st in w.stages if st.needs and ({"gpu", "large_model"} & set(st.needs))]
    if not models and not staged:
        return []
    out = []
    for m in models:
        for sp in plan.sites:
            down = sp.site.link.downlink / 8
            gb = m.size / 1e9 * sp.site.count * sp.final.sizing.nodes
            out.append(
                f"Model {m.name} ({size(m.size)}, accelerator {m.accelerator}) to {sp.name}: "
                f"{dur(m.size / down)} per node over the {sp.site.link.downlink / 1e6:g} Mbit/s "
                f"downlink, {gb:,.1f} GB for all its nodes"
                + (f", {usd(gb * sp.site.link.cost_per_gb)} at the link's price"
                   if sp.site.link.cost_per_gb else "") + ".")
    if staged:
        out.append(f"Stages {', '.join(staged)} need a GPU or a large model; models ship as "
                   "files of a release. " + (
                       "Files are content-addressed, so a node that holds a model already "
                       "downloads nothing when only the pipeline changes."
                       if caps.has("tuf_releases") else caps.state("tuf_releases")))
    return out


def bill_sentences(plan: Any) -> list[str]:
    """Per site type on a metered link: the monthly bill and what dominates it."""
    out = []
    for sp in plan.sites:
        ln = sp.site.link
        f = sp.final
        gb = f.gb_month(f.edge_wire_per_s)
        if ln.cost_per_gb <= 0 or not f.calibration.stream_wire:
            continue
        top, top_b = max(f.calibration.stream_wire.items(), key=lambda kv: kv[1])
        share = top_b / max(f.edge_wire_per_s, 1e-12)
        out.append(
            f"{sp.name} on {ln.kind} at {usd(ln.cost_per_gb)}/GB: {gb:,.2f} GB a month per site, "
            f"{usd(gb * ln.cost_per_gb)} per site and {usd(gb * ln.cost_per_gb * sp.site.count)} "
            f"for its {sp.site.count:,}; stream {top} is {share:.0%} of it"
            + (f", so its {ln.batch_interval:g} s batches and its aggregates decide the bill."
               if share >= 0.5 else ", no single stream dominates."))
    return out


def baseline_sentences(plan: Any) -> list[str]:
    out = []
    for sp in plan.sites:
        fits, share = baseline_fits(sp)
        naive = sp.final.naive_per_s
        if fits:
            out.append(f"{sp.name}: the naive design would use {share:.0%} of the usable "
                       f"uplink ({rate(naive)} of {rate(usable_uplink(sp))}), so it could run; "
                       "the reduction is what the edge stages save.")
        else:
            out.append(f"{sp.name}: the naive design needs {rate(naive)}, {share:,.1f}x the "
                       f"usable uplink of {rate(usable_uplink(sp))}; it could not run on this "
                       "link at all, so the reduction compares with a design that cannot exist "
                       "here.")
    return out


def operations_section(b: list[Block], plan: Any, caps: Capabilities,
                       compact: bool = False) -> None:
    w = plan.workload
    b.append(H(2, "6. Operational Procedures"))
    items = []
    for sp in plan.sites:
        n = sp.site.count * sp.final.sizing.nodes
        cloud = [st.id for st in sp.stages if sp.where(st.id) != "edge"]
        items.append(
            f"Deploying {sp.name} ({n:,} node(s) of {sp.final.sizing.option.name}): enrol "
            "each node (`edgewise agent run --cloud URL --token TOKEN`, the token from "
            f"`edgewise cloud token create --labels site={sp.name}`), then `edgewise plan "
            "apply DIR --cloud URL` (DIR: this folder; `--dry-run` first) installs "
            f"`pipelines/{sp.name}.yaml`: its edge part on every node labelled "
            f"`site={sp.name}`" + (f", its cloud part ({_ids(cloud)}) on the control plane"
                                   if cloud else "") + ".")
    b.append(UL(items))
    items = []
    for sp in plan.sites:
        alarms = [st for st in sp.stages if is_alarm(st) and sp.where(st.id) != "cloud"]
        local = [st.id for st in alarms if st.local is not None]
        text = (f"{sp.name}: `edgewise run --json` prints per-stream counts and alarm latency; "
                f"`edgewise dead-letters` names readings of "
                f"{_ids([s.id for s in sp.site.sources])} that could not be used and why")
        if local:
            text += f"; {_ids(local)} act locally, so test them on site after every release"
        items.append(text + ".")
    b.append(H(3, "Troubleshooting"))
    b.append(UL(items))
    b.append(H(3, "Recovery"))
    rec = []
    for sp in plan.sites:
        f = sp.final
        rec.append(f"{sp.name}: after {dur(f.outage_s)} without the link the backlog of "
                   f"{size(f.backlog_bytes)} drains in {dur(f.drain_s)}, alarms first; "
                   "a replaced node enrols with a new token and receives its desired state.")

    b.append(UL(rec))
    b.append(H(3, "Decommissioning"))
    b.append(capability_table(caps, ["decommission", "pressure"], compact))
    items = []
    for sp in plan.sites:
        tags = sorted({t for s in sp.site.sources for t in source_tags(s)})
        if tags:
            items.append(f"A retired {sp.name} node may hold "
                         f"{', '.join(TAG_MEANING.get(t, t) for t in tags)} in its outbox: "
                         "decommission it with `--wipe` before it leaves the site, and destroy "
                         "the disk where the wipe cannot reach flash blocks.")
    if w.requirements.retention:
        items.append(f"Records of a decommissioned {w.name} node stay in the cloud store for "
                     f"the retention period of {w.requirements.retention / 86400:,.0f} days.")
    b.append(UL(items))
