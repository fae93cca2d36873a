"""Remote attestation: nonce → TPM quote + event log → verdict; failures are quarantined.

A TPM node asks for a fresh nonce at every agent start, after enrolment and every 600 s
(`edgewise.edge.tpm_node.attestation_loop`; `Attestations.challenge`) and answers with a
quote. `Attestations.verify` checks the node's evidence:

1. the nonce was issued to this node, is unused and fresh (single use, `nonce_ttl`);
2. the event log is well formed and only touches the policy's PCRs;
3. the quote is signed by the AK registered at enrolment, carries the nonce and the PCR digest
   the event log replays to (`edgewise.security.tpm.quote.check_quote`);
4. every measurement in the log is allowed: agent code digests the operator allows, releases
   the control plane has published (their manifest digests). A log keeps every launch since
   the TPM last reset, so one launch of a modified agent taints the node until a reboot.

A node that fails is **quarantined** with the reason (what failed, never the value expected).
`Verdict.allows` is the rule for what a quarantined node may still do (`QUARANTINE_ALLOWS`:
report and receive a new release); the session does not consult it yet (not built: see
docs/security.md). A node without a TPM is labelled ``attestation: none``; with
``require_attestation`` it is quarantined too. A later successful attestation (after a new
release, say) clears the verdict.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgewise.cloud.attestation.enrolment import TpmNode
from edgewise.errors import StorageError
from edgewise.security.tpm.credential import AttestationRefused
from edgewise.security.tpm.measure import DEFAULT_PCR, events_from_json, replay
from edgewise.security.tpm.quote import MAX_ATTEST_BYTES, MAX_SIGNATURE_BYTES, check_quote

QUARANTINE_ALLOWS = frozenset({"report", "release"})
NONCE_TTL_S = 60.0
NONCE_BYTES = 32
MAX_NONCES = 10_000


@dataclass(frozen=True)
class Policy:
    """What may run: allowed agent code digests and published releases' manifest digests."""

    agents: frozenset[str]
    releases: frozenset[str]
    pcrs: tuple[int, ...] = (DEFAULT_PCR,)

    @classmethod
    def of(cls, agents: Iterable[str], release_digests: Iterable[str],
           pcrs: Iterable[int] = (DEFAULT_PCR,)) -> Policy:
        return cls(frozenset(agents), frozenset(release_digests), tuple(sorted(set(pcrs))))


async def policy_from_store(store: Any, agents: Iterable[str],
                            pcrs: Iterable[int] = (DEFAULT_PCR,)) -> Policy:
    """The policy with every release published in ``store`` (`cloud.store.Store`)."""
    releases = await store.list_releases()
    return Policy.of(agents, (r.digest for r in releases), pcrs)


@dataclass(frozen=True)
class Verdict:
    node_id: str
    attestation: str  # "tpm" or "none"
    quarantined: bool
    reason: str | None = None  # why it is quarantined; never an expected value
    measurements: dict[str, str] = field(default_factory=dict)  # kind -> last digest

    def allows(self, action: str) -> bool:
        return not self.quarantined or action in QUARANTINE_ALLOWS

    def to_json(self) -> dict[str, object]:
        return {"node_id": self.node_id, "attestation": self.attestation,
                "quarantined": self.quarantined, "reason": self.reason,
                "measurements": self.measurements}


class _Nonces:
    """Single-use nonces per node, bounded (`MAX_NONCES`), expiring ``ttl`` after issue."""

    def __init__(self, ttl: float, limit: int, clock: Callable[[], float]) -> None:
        self.ttl, self.limit, self.clock = ttl, limit, clock
        self._nonces: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def issue(self, node_id: str) -> bytes:
        now = self.clock()
        while self._nonces:  # oldest first: they expire first
            nonce, (_, expires) = next(iter(self._nonces.items()))
            if expires > now:
                break
            del self._nonces[nonce]
        if len(self._nonces) >= self.limit:
            raise StorageError("too many pending attestation challenges; retry later")
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._nonces[nonce] = (node_id, now + self.ttl)
        return nonce

    def take(self, nonce: bytes, node_id: str) -> None:
        entry = self._nonces.pop(nonce, None)
        if entry is None or entry[0] != node_id or entry[1] <= self.clock():
            raise AttestationRefused("quote: not made for a live challenge of this node "
                                     "(stale, replayed or another node's)")


def _b64(evidence: dict[str, Any], name: str, limit: int) -> bytes:
    value = evidence.get(name)
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise AttestationRefused(f"evidence: {name} missing or too large")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise AttestationRefused(f"evidence: {name} is not base64") from None


class Attestations:
    """The verifier's state: outstanding nonces and each node's last verdict."""

    def __init__(self, *, require_attestation: bool = False, nonce_ttl: float = NONCE_TTL_S,
                 limit: int = MAX_NONCES, clock: Callable[[], float] = time.monotonic) -> None:
        self.require_attestation = require_attestation
        self.clock = clock
        self._nonces = _Nonces(nonce_ttl, limit, clock)
        self.verdicts: dict[str, Verdict] = {}

    def challenge(self, node_id: str) -> bytes:
        return self._nonces.issue(node_id)

    def no_tpm(self, node_id: str) -> Verdict:
        """A node enrolled without a TPM: ``attestation: none``, refused when required."""
        reason = ("attestation required: this node has no TPM"
                  if self.require_attestation else None)
        return self._record(Verdict(node_id, "none", reason is not None, reason))

    def verify(self, node_id: str, node: TpmNode, policy: Policy,
               evidence: dict[str, Any]) -> Verdict:
        """Check ``evidence`` ({nonce, quote, signature, events}, base64 and a JSON list)."""
        try:
            measurements = self._check(node_id, node, policy, evidence)
        except AttestationRefused as exc:
            return self._record(Verdict(node_id, "tpm", True, str(exc)))
        return self._record(Verdict(node_id, "tpm", False, None, measurements))

    def _check(self, node_id: str, node: TpmNode, policy: Policy,
               evidence: dict[str, Any]) -> dict[str, str]:
        if not isinstance(evidence, dict):
            raise AttestationRefused("evidence: expected an object")
        nonce = _b64(evidence, "nonce", 64)
        attest = _b64(evidence, "quote", MAX_ATTEST_BYTES)
        signature = _b64(evidence, "signature", MAX_SIGNATURE_BYTES)
        try:
            events = events_from_json(evidence.get("events"))
        except Exception as exc:  # PeerError with the field named
            raise AttestationRefused(str(exc)) from None
        self._nonces.take(nonce, node_id)  # used up whatever follows: a quote counts once
        if any(e.pcr not in policy.pcrs for e in events):
            raise AttestationRefused("event log: an event for a PCR outside the policy")
        check_quote(attest, signature, node.ak_public, nonce, replay(events, policy.pcrs))
        measurements: dict[str, str] = {}
        for event in events:
            allowed = policy.agents if event.kind == "agent" else policy.releases
            if event.digest not in allowed:
                what = "agent code" if event.kind == "agent" else "release"
                raise AttestationRefused(f"measurement: {what} not in the allowed set")
            measurements[event.kind] = event.digest
        if "agent" not in measurements:
            raise AttestationRefused("measurement: no agent launch measured")
        return measurements

    def _record(self, verdict: Verdict) -> Verdict:
        self.verdicts[verdict.node_id] = verdict
        return verdict

    def quarantined(self, node_id: str) -> str | None:
        """Why ``node_id`` is quarantined, or None."""
        verdict = self.verdicts.get(node_id)
        return verdict.reason if verdict is not None and verdict.quarantined else None
