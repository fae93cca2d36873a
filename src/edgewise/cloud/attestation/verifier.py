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
report and receive a new release); `edgewise.cloud.quarantine` and the session enforce it. A
node without a TPM is labelled ``attestation: none``; when the policy requires attestation of
it (``require_attestation`` or a selector it matches) it is quarantined too.

With firmware PCRs in the policy (`Policy.firmware_pcrs`, the platform's measured boot: 0-7)
the quote covers them too; the node sends their values (``pcr_values``), which the quote's PCR
digest proves, and with a golden firmware set they must be one of its sets. A later successful
attestation (after a new release, say) clears the verdict.
"""

from __future__ import annotations

import base64
import re
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

QUARANTINE_ALLOWS = frozenset({"report", "release"})  # `cloud.quarantine` enforces it
_HEX64 = re.compile(r"[0-9a-f]{64}")
NONCE_TTL_S = 60.0
NO_TPM = "attestation required: this node has no TPM"
NONCE_BYTES = 32
MAX_NONCES = 10_000


FirmwareSet = tuple[tuple[int, str], ...]  # ((pcr, sha256 hex), ...) sorted by PCR


@dataclass(frozen=True)
class Policy:
    """What may run: allowed agent code digests and published releases' manifest digests;
    with ``firmware_pcrs``, the firmware's measured-boot PCRs are quoted too, and their values
    must be one of ``golden`` (whole sets; no golden set: quoted and shown, not judged)."""

    agents: frozenset[str]
    releases: frozenset[str]
    pcrs: tuple[int, ...] = (DEFAULT_PCR,)  # the PCRs the event log explains
    firmware_pcrs: tuple[int, ...] = ()
    golden: frozenset[FirmwareSet] = frozenset()

    @classmethod
    def of(cls, agents: Iterable[str], release_digests: Iterable[str],
           pcrs: Iterable[int] = (DEFAULT_PCR,), firmware_pcrs: Iterable[int] = (),
           golden: Iterable[FirmwareSet] = ()) -> Policy:
        return cls(frozenset(agents), frozenset(release_digests), tuple(sorted(set(pcrs))),
                   tuple(sorted(set(firmware_pcrs))), frozenset(golden))


async def policy_from_store(store: Any, agents: Iterable[str],
                            pcrs: Iterable[int] = (DEFAULT_PCR,), firmware_pcrs: Iterable[int] = (),
                            golden: Iterable[FirmwareSet] = ()) -> Policy:
    """The policy with every release published in ``store`` (`cloud.store.Store`)."""
    releases = await store.list_releases()
    return Policy.of(agents, (r.digest for r in releases), pcrs, firmware_pcrs, golden)


def _firmware_values(evidence: dict[str, Any], pcrs: tuple[int, ...]) -> dict[int, bytes]:
    """The firmware PCR values the node claims (the quote then proves them)."""
    values = evidence.get("pcr_values")
    if not isinstance(values, dict) or len(values) > 24:
        raise AttestationRefused("evidence: pcr_values missing (the firmware PCRs' values)")
    out: dict[int, bytes] = {}
    for pcr in pcrs:
        value = values.get(str(pcr))
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise AttestationRefused(f"evidence: pcr_values has no sha256 value for PCR {pcr}")
        out[pcr] = bytes.fromhex(value)
    return out


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

    def no_tpm(self, node_id: str, required: bool | None = None) -> Verdict:
        """A node enrolled without a TPM: ``attestation: none``, refused when required
        (``required``: the policy for this node; None: ``require_attestation``)."""
        required = self.require_attestation if required is None else required
        reason = NO_TPM if required else None
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
        software = tuple(p for p in policy.pcrs if p not in policy.firmware_pcrs)
        if any(e.pcr not in software for e in events):
            raise AttestationRefused("event log: an event for a PCR outside the policy")
        firmware = _firmware_values(evidence, policy.firmware_pcrs) if policy.firmware_pcrs \
            else {}
        check_quote(attest, signature, node.ak_public, nonce,
                    {**replay(events, software), **firmware})
        measurements: dict[str, str] = {f"pcr{p}": v.hex() for p, v in firmware.items()}
        if policy.golden and tuple((p, v.hex()) for p, v in sorted(firmware.items())) \
                not in policy.golden:
            raise AttestationRefused("firmware: measured-boot PCR values not in the golden set")
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
