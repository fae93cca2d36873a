"""What the installed Edgewise can do: the features the architecture document may state.

Every feature the document talks about is a `Capability`: the modules (and a name each must
define) that implement it, the sentence the document states when it is built, the
recommendation it gives instead when it is not (naming what would provide it), and the phrases
that mark a sentence as a claim of it (`claims`, used by the tests to check every sentence of
every example document against this registry).

Whether a feature is built is *detected from the code*, never a flag: `detect` finds the
installed ``edgewise`` package (`importlib.util.find_spec`), and a capability is built when
each of its implementing modules exists there and defines its marker at top level (read with
`ast`, without importing it: the planner must not import the control plane or the node, see
docs/architecture.md). When a later change lands a module (say ``edgewise/cloud/rollouts/``),
the capability flips and the documents follow without a template edit.

`Capabilities.state(key)` gives the document's sentence: the design sentence when built,
otherwise `RECOMMEND` + the recommendation.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

RECOMMEND = "Not built in this Edgewise (recommendation):"


@dataclass(frozen=True)
class Capability:
    key: str
    title: str
    implements: tuple[tuple[str, str], ...]  # (module, top-level name it must define)
    design: str  # stated as the design when built
    recommend: str  # stated, after RECOMMEND, when not built
    claims: tuple[str, ...]  # regular expressions marking a sentence as a claim of it


REGISTRY: tuple[Capability, ...] = (
    Capability(
        "mtls_identity", "mutual TLS with SPIFFE-style node ids",
        (("edgewise.security.pki.certs", "node_uri"), ("edgewise.security.tls", "server_context")),
        "a node's own P-256 key never leaves it; its certificate names it "
        "spiffe://<trust domain>/node/<id>; every request is mutual TLS, scoped to that node",
        "give every node its own key and a certificate naming it (SPIFFE-style ids), and "
        "authenticate every request by that certificate",
        (r"SPIFFE", r"mutual[- ]TLS")),
    Capability(
        "short_certs", "short-lived node certificates, renewed automatically",
        (("edgewise.security.pki.ca", "NODE_CERT_LIFETIME"),
         ("edgewise.security.pki.certs", "needs_renewal")),
        "node certificates live {cert_hours} h; the agent renews them after two thirds of that",
        "issue node certificates that live hours, not years, and renew them automatically",
        (r"certificates? (live|lives|last)", r"\brenews?\b")),
    Capability(
        "reauth", "re-authentication after an outage longer than a certificate",
        (("edgewise.edge.identity", "ReenrolRequired"), ("edgewise.cloud.config", "")),
        "a certificate expired offline is replaced after the node proves its key, within "
        "`reauth_grace` ({grace_days} days by default)",
        "let a node whose certificate expired offline re-authenticate with its key",
        (r"re-?authenticat", r"grace period")),
    Capability(
        "revocation", "node revocation",
        (("edgewise.cloud.state", "revoke_node"),),
        "`edgewise node revoke ID` ends the node's session at once and refuses its "
        "certificate from then on",
        "revoke a node's identity centrally and end its sessions at once",
        (r"\brevok", r"\brevocation\b")),
    Capability(
        "enrolment_tokens", "one-time enrolment tokens",
        (("edgewise.security.tokens", "new_token"),),
        "a node joins once, with a one-time enrolment token (1 h by default)",
        "bind each new node to the fleet with a one-time, short-lived enrolment token",
        (r"enrol\w* token",)),
    Capability(
        "durable_outbox", "durable outbox",
        (("edgewise.outbox.store", "Outbox"),),
        "a record is in the outbox (SQLite WAL) before its source is acknowledged and leaves "
        "it only after the cloud's durable commit",
        "buffer every record on the node durably until the cloud has committed it",
        (r"\boutbox\b",)),
    Capability(
        "exactly_once", "exactly-once sync",
        (("edgewise.outbox.numbering", "Numbered"), ("edgewise.cloud.ingest", "StreamTracker")),
        "sequence numbers per node and stream: at least once on the wire, exactly once in the "
        "store",
        "number records per node and stream and deduplicate them on ingest",
        (r"exactly[- ]once",)),
    Capability(
        "pressure", "visible pressure: compaction and eviction by priority",
        (("edgewise.outbox.policy", "choose_evictions"),),
        "a full outbox compacts or drops the lowest priorities first, alarms last, and counts "
        "every record affected",
        "evict by priority when the node's buffer is full and count what is lost",
        (r"\bcompacted\b", r"\bevict")),
    Capability(
        "lww_merge", "set-point merge by hybrid logical clock",
        (("edgewise.sync.merge", "LwwMap"), ("edgewise.sync.hlc", "HLC")),
        "set-points written on both sides merge by hybrid-logical-clock last-writer-wins; "
        "losing values go to an audit trail",
        "merge values both sides may write with a deterministic rule and keep the losers",
        (r"last-writer-wins", r"hybrid[- ]logical")),
    Capability(
        "tuf_releases", "TUF-signed releases",
        (("edgewise.sync.release", "Manifest"), ("edgewise.security.tuf.client", "TufClient"),
         ("edgewise.cloud.releases.service", "ReleaseService")),
        "releases are TUF-signed (root keys offline); the node verifies every file before use "
        "and downloads only files it lacks",
        "sign releases with The Update Framework (e.g. python-tuf) and verify them on the node "
        "before installing",
        (r"\bTUF\b", r"signed release")),
    Capability(
        "ab_rollback", "A/B slots with health-gated rollback",
        (("edgewise.edge.updater.machine", "rollback"), ("edgewise.edge.updater.gate", "judge"),
         ("edgewise.edge.updater.updater", "Updater")),
        "a release goes into the inactive A/B slot; a health gate commits it or the node rolls "
        "back by itself",
        "install releases into A/B slots and roll back automatically when a health check fails",
        (r"\bA/B\b", r"\broll(s|ed)? back\b", r"\brollback\b")),
    Capability(
        "decommission", "decommission with wipe",
        (("edgewise.edge.decommission", "wipe"),),
        "`edgewise node decommission ID --wipe` deletes the node's key, outbox, twin, slots and "
        "pipelines; it then needs a new enrolment token",
        "decommission nodes centrally with a remote wipe of keys and buffered data",
        (r"\bdecommission", r"\bwipe")),
    Capability(
        "heartbeats", "heartbeats on the control lane",
        (("edgewise.sync.protocol", "HEARTBEAT"),),
        "heartbeats travel on the control lane, ahead of data",
        "send heartbeats ahead of data so a backlog never hides a live node",
        (r"\bheartbeats?\b",)),
    Capability(
        "metrics", "Prometheus metrics of the control plane",
        (("edgewise.cloud.metrics", ""),),
        "the control plane serves Prometheus metrics at /metrics",
        "export the control plane's counters to a metrics system",
        (r"\bPrometheus\b", r"/metrics")),
    Capability(
        "retention", "retention in the cloud store",
        (("edgewise.cloud.retention", "prune"),),
        "the control plane deletes records older than its retention",
        "prune stored records after the retention period",
        (r"\bprunes?\b", r"records older than")),
    Capability(
        "forwarders", "data out to MQTT and NATS JetStream",
        (("edgewise.cloud.dataout.sender", "ForwarderSet"),),
        "committed records are forwarded to MQTT or NATS JetStream for cloud consumers",
        "forward committed records to a message broker for cloud-side consumers",
        (r"\bforwarders?\b", r"JetStream")),
    Capability(
        "staged_rollouts", "staged rollouts with health gates",
        (("edgewise.cloud.rollouts", ""),),
        "the control plane moves a release through a canary and waves (`edgewise rollout "
        "create`), each gated on the health of the one before",
        "a rollout controller (planned under `cloud/rollouts/`) would run the waves; until "
        "then start each wave with `edgewise config set --release`",
        (r"staged rollout", r"\bcanary\b", r"rollout controller")),
    Capability(
        "tpm_attestation", "TPM attestation",
        (("edgewise.security.tpm.quote", "check_quote"),
         ("edgewise.cloud.attestation.verifier", "Attestations"),
         ("edgewise.edge.tpm_node", "attestation_loop"),
         ("edgewise.cloud.quarantine", "split"),
         ("edgewise.edge.twin_files", "seal")),
        "a node with a TPM (`--tpm`) keeps its signing and attestation keys in the TPM, enrols "
        "bound to the TPM's endorsement key, and is quarantined when its TPM quote of the "
        "measured agent and release (and, if configured, the firmware PCRs against a golden "
        "set) does not match what the control plane allows: its data is then stored apart "
        "and only a new release reaches it; its outbox and twin files are encrypted under a "
        "key the TPM seals",
        "TPM attestation would bind identity to the hardware; the node key is a file, so "
        "encrypt the disk",
        (r"\bTPM\b", r"\battestation\b")),
    Capability(
        "console", "web console",
        (("edgewise.cloud.console", ""),),
        "the control plane serves a web console (`/console`, behind the operator tokens): the "
        "fleet by health state, each node's live stream charts and alarms, and rollouts",
        "a web console would show the fleet at a glance; today operators use `edgewise node`, "
        "`edgewise config` and `edgewise data` against the operator API",
        (r"\bconsole\b", r"\bdashboard\b")),
    Capability(
        "cloud_execution", "cloud-side execution of placed stages",
        (("edgewise.cloud.stages", ""),),
        "the control plane runs the stages placed in the cloud",
        "the control plane runs no stages; cloud stages need your own stream processor on "
        "its forwarders",
        (r"(control plane|cloud) (runs|executes)", r"stages? (run|runs) in the cloud")),
    Capability(
        "fleet_alerts", "fleet alarms on silence and backlog",
        (("edgewise.cloud.alerts", ""),),
        "the control plane raises a fleet alarm when a node goes silent or its backlog grows",
        "alarms on silent nodes or growing backlogs need alerting rules over the metrics",
        (r"fleet alarm", r"\balert(s|ing)? (on|when|rules?)")),
    Capability(
        "site_failover", "failover between the nodes of a site",
        (("edgewise.edge.failover", ""),),
        "the nodes of a site fail over to each other",
        "no failover between nodes: a second node runs the same pipeline (active-active, "
        "stored apart by node id) or waits idle for the site's supervisor (active-standby)",
        (r"fail(s)? over between", r"failover between", r"node failover")),
    Capability(
        "second_link", "a second uplink",
        (("edgewise.edge.links", ""),),
        "the agent keeps a second uplink and uses it by its role",
        "the agent has one uplink; a second link needs a router below it that switches routes "
        "(the node's session reconnects through whichever is up), and an offload window needs "
        "scheduling outside Edgewise",
        (r"second link",)),
)


@dataclass
class Capabilities:
    """Which capabilities the installed Edgewise has, and the values the sentences use."""

    built: dict[str, bool]
    values: dict[str, str] = field(default_factory=dict)
    modules: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        return self.built[key]

    def state(self, key: str, lead: str = "") -> str:
        """The sentence for ``key``: its design when built, else the recommendation; ``lead``
        (the workload's facts it applies to) opens the sentence."""
        cap = BY_KEY[key]
        text = cap.design.format(**self.values) if self.built[key] else cap.recommend
        if lead:
            text = f"{lead}: {text}"
        if self.built[key]:
            return _cap(text) + "."
        return f"{RECOMMEND} {text}."

    def missing(self) -> list[str]:
        return [c.key for c in REGISTRY if not self.built[c.key]]


BY_KEY = {c.key: c for c in REGISTRY}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def package_root() -> Path:
    """The directory of the installed ``edgewise`` package."""
    spec = importlib.util.find_spec("edgewise")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the edgewise package is not importable")
    return Path(next(iter(spec.submodule_search_locations)))


def _module_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> dict[str, ast.AST]:
    """Names a module defines at top level (functions, classes, assignments), with their
    value expressions (None for definitions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value
                elif isinstance(t, ast.Tuple):
                    out.update({e.id: node.value for e in t.elts if isinstance(e, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node.value or node
    return out


def _hours(expr: ast.AST | None) -> float | None:
    """Hours of a ``timedelta(hours=.., days=.., minutes=..)`` literal, else None."""
    if not (isinstance(expr, ast.Call) and getattr(expr.func, "id", "") == "timedelta"):
        return None
    per = {"days": 24.0, "hours": 1.0, "minutes": 1 / 60, "seconds": 1 / 3600}
    total = 0.0
    for kw in expr.keywords:
        if kw.arg not in per or not isinstance(kw.value, ast.Constant):
            return None
        total += float(kw.value.value) * per[kw.arg]
    return total


def _class_default(path: Path | None, attr: str) -> float | None:
    """Hours of a ``timedelta`` default of ``attr`` in any class of the module, else None."""
    if path is None:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id == attr):
            return _hours(node.value)
    return None


def detect(root: Path | None = None) -> Capabilities:
    """Read the installed code (or the package tree at ``root``) and say what is built."""
    root = root or package_root()
    built: dict[str, bool] = {}
    values = {"cert_hours": "24", "grace_days": "7"}
    modules: dict[str, tuple[str, ...]] = {}
    for cap in REGISTRY:
        ok = True
        for module, marker in cap.implements:
            path = _module_file(root, module)
            if path is None:
                ok = False
                break
            if marker:
                names = top_level_names(path)
                if marker not in names:
                    ok = False
                    break
                if marker == "NODE_CERT_LIFETIME":
                    hours = _hours(names[marker])
                    if hours is None:
                        ok = False
                        break
                    values["cert_hours"] = f"{hours:g}"
        if ok and cap.key == "reauth":
            grace = _class_default(_module_file(root, "edgewise.cloud.config"), "reauth_grace")
            ok = grace is not None
            if grace is not None:
                values["grace_days"] = f"{grace / 24:g}"
        built[cap.key] = ok
        modules[cap.key] = tuple(m for m, _ in cap.implements)
    return Capabilities(built, values, modules)


@lru_cache(maxsize=1)
def installed() -> Capabilities:
    """`detect` on the installed package, once per process."""
    return detect()


def claimed(sentence: str) -> list[str]:
    """The capabilities a sentence speaks of (by their `Capability.claims`)."""
    return [c.key for c in REGISTRY if any(re.search(p, sentence, re.I) for p in c.claims)]
