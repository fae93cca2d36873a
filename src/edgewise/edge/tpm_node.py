"""The node's TPM side of enrolment, measured launch and attestation (``--tpm TCTI``).

Files in ``DATA/identity/``: ``node.tpmkey`` and ``ak.tpmkey`` (TSS2 PRIVATE KEY PEM: the
private parts encrypted by the TPM, useless elsewhere), ``measurements.log`` (the event log of
`edgewise.security.tpm.measure`), ``outbox.key.tpm`` (the outbox key sealed by the TPM).

TLS: Python's ``ssl`` cannot use a key held in the TPM (that would need the tpm2 OpenSSL
provider), so the node's TLS key stays a file key (``node.key``). The TPM binds it: the TPM
node key signs the TLS key's CSR (`binding`), the control plane issues the certificate only
after the TPM answered its credential challenge, and every attestation needs a quote
from the AK in this TPM, every renewal the TPM node key's signature. A copied ``node.key``
opens a TLS session until its certificate expires, but cannot attest (the node it impersonates
is quarantined) nor renew.

Measured launch and the outbox key (`start`, called by the agent after the identity files are
read): the agent's code and the active release are measured into PCR 16 before any pipeline
runs, and the outbox's payloads are encrypted under a key the TPM seals. Attestation
(`attestation_loop`): after enrolment and every ``interval`` seconds, a quote over the control
plane's nonce; the verdict is logged (a quarantine as a WARNING with its reason).

The TPM calls block: async code runs them in a thread, one at a time (a lock).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgewise.errors import ConfigError, PeerError, TransportError
from edgewise.security.payload import PayloadCipher, tpm_key
from edgewise.security.pki import make_csr
from edgewise.security.tpm.credential import binding_message
from edgewise.security.tpm.measure import (
    DEFAULT_PCR,
    MeasurementLog,
    agent_code_digest,
    measure_launch,
)

if TYPE_CHECKING:  # tpm2-pytss is loaded only when a TPM is opened
    from edgewise.security.tpm import KeyBlob

log = logging.getLogger(__name__)
ATTEST_INTERVAL_S = 600.0  # between attestations (and at every start and enrolment)
ENROL_PATH, FINISH_PATH = "/v1/device/enrol/tpm", "/v1/device/enrol/tpm/finish"


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _dec(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise PeerError(f"the control plane's {what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise PeerError(f"the control plane's {what} is not base64") from None


class TpmNode:
    """The node's TPM and its key files. Open with ``with TpmNode(tcti, dir) as t:``."""

    def __init__(self, tcti: str, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        from edgewise.security.tpm import Tpm

        self.tpm = Tpm(tcti)
        self.key = self._key("node.tpmkey", "node")
        self.ak = self._key("ak.tpmkey", "ak")
        self.log = MeasurementLog(self.dir / "measurements.log")
        self.lock = threading.Lock()  # one TPM command sequence at a time
        self.verdict: dict[str, Any] | None = None  # the newest attestation verdict

    def _key(self, name: str, kind: str) -> KeyBlob:
        from edgewise.security.tpm import KeyBlob

        path = self.dir / name
        if path.exists():
            return KeyBlob.read(path)
        blob = self.tpm.create_key(kind)
        blob.save(path)
        return blob

    def close(self) -> None:
        self.tpm.close()

    def __enter__(self) -> TpmNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- enrolment --------------------------------------------------------------------------
    def bind(self, csr_pem: bytes) -> bytes:
        """The TPM node key's signature over `binding_message` of the TLS key's CSR."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        with self.tpm.signer(self.key) as key:
            return key.sign(binding_message(csr_pem), ec.ECDSA(hashes.SHA256()))

    def enrolment_evidence(self, csr_pem: bytes) -> dict[str, Any]:
        """The TPM's part of ``POST /v1/device/enrol/tpm`` for the TLS key's CSR."""
        binding = self.bind(csr_pem)
        cert = self.tpm.ek_certificate()
        evidence = {"csr": csr_pem.decode(), "ek_public": _enc(self.tpm.ek_public()),
                    "node_key_public": _enc(self.key.public_area()),
                    "ak_public": _enc(self.ak.public_area()), "binding": _enc(binding)}
        if cert is not None:
            from cryptography.hazmat.primitives.serialization import Encoding

            evidence["ek_certificate"] = _enc(cert.public_bytes(Encoding.DER))
        return evidence

    def activate(self, answer: dict[str, Any]) -> list[str]:
        """The TPM's answers to the control plane's credentials (node key, then AK)."""
        creds = answer.get("credentials")
        if not isinstance(creds, list) or len(creds) != 2 or \
                not all(isinstance(c, dict) for c in creds):
            raise PeerError("the control plane's TPM challenge is not two credentials")
        return [_enc(self.tpm.activate_credential(k, _dec(c.get("blob"), "credential"),
                                                  _dec(c.get("secret"), "secret")))
                for k, c in zip((self.key, self.ak), creds, strict=True)]

    def csr(self) -> bytes:
        """A CSR signed by the TPM node key itself (for a certificate of the TPM key)."""
        with self.tpm.signer(self.key) as key:
            return make_csr(key)

    # -- measured launch and attestation ----------------------------------------------------
    def measure(self, agent: str, release: str | None, pcr: int = DEFAULT_PCR) -> None:
        measure_launch(self.tpm, self.log, agent=agent, release=release, pcr=pcr)

    def evidence(self, challenge: dict[str, Any]) -> dict[str, Any]:
        """A quote over the control plane's nonce and PCRs, with the event log."""
        nonce = _dec(challenge.get("nonce"), "nonce")
        pcrs = challenge.get("pcrs")
        if not isinstance(pcrs, list) or not pcrs or \
                not all(isinstance(p, int) and 0 <= p <= 23 for p in pcrs):
            raise PeerError("the control plane's PCR selection is not a list of 0..23")
        values = self.tpm.read_pcrs(pcrs)  # the firmware PCRs' values (the quote proves them)
        attest, signature = self.tpm.quote(self.ak, nonce, pcrs)
        return {"nonce": _enc(nonce), "quote": _enc(attest), "signature": _enc(signature),
                "events": [e.to_json() for e in self.log.events() if e.pcr in pcrs],
                "pcr_values": {str(p): bytes(v).hex() for p, v in values.items()}}


Request = Callable[..., Any]  # `NodeIdentity.request`


async def _locked(tpm: TpmNode, fn: Callable[..., Any], *args: Any) -> Any:
    def run() -> Any:
        with tpm.lock:
            return fn(*args)
    return await asyncio.to_thread(run)


async def tpm_enrol(request: Request, tpm: TpmNode, token: str, csr: bytes) -> dict[str, Any]:
    """Enrol the TLS key's ``csr`` with the TPM's evidence (two requests, no client cert)."""
    evidence = await _locked(tpm, tpm.enrolment_evidence, csr)
    challenge = await request("POST", ENROL_PATH, {"token": token, **evidence},
                              client_cert=False)
    answers = await _locked(tpm, tpm.activate, challenge)
    return await request("POST", FINISH_PATH, {"token": token, "answers": answers,
                                               "challenge": challenge.get("challenge")},
                         client_cert=False)


async def tpm_binding(tpm: TpmNode, csr: bytes) -> str:
    """The TPM node key's signature over the TLS key's ``csr`` (renewal, re-authentication)."""
    return _enc(await _locked(tpm, tpm.bind, csr))


async def attest_once(request: Request, tpm: TpmNode) -> dict[str, Any]:
    challenge = await request("POST", "/v1/device/attest/challenge", {})
    evidence = await _locked(tpm, tpm.evidence, challenge)
    verdict = await request("POST", "/v1/device/attest", evidence)
    tpm.verdict = verdict
    return verdict


async def attestation_loop(identity: Any, tpm: TpmNode, interval: float,
                           backoff: Callable[[int], float]) -> None:
    """Attest once enrolled, then every ``interval`` s; failures retried with ``backoff``."""
    failures = 0
    while True:
        if not identity.enrolled:
            await identity.wait_changed()
            continue
        try:
            verdict = await attest_once(identity.request, tpm)
        except (TransportError, PeerError, ConfigError) as exc:
            failures += 1
            delay = backoff(failures)
            log.warning("attestation failed (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            continue
        failures = 0
        if verdict.get("quarantined"):
            log.warning("the control plane quarantined this node: %s", verdict.get("reason"))
        else:
            log.info("attested: %s", verdict.get("measurements"))
        await asyncio.sleep(interval)


def start(tcti: str, agent: Any) -> TpmNode:
    """Open the TPM for an `edgewise.edge.agent.Agent` whose identity files are read: the
    identity enrols through it, the launch is measured, the outbox is encrypted under a key
    the TPM seals. The caller closes it."""
    node = TpmNode(tcti, agent.identity.dir)
    try:
        agent.identity.tpm = node
        active = agent.updater.state.active
        agent_digest, release = agent_code_digest(), active.digest if active else None
        node.measure(agent_digest, release)
        log.info("measured launch: agent %s, release %s (PCR %d)", agent_digest, release,
                 DEFAULT_PCR)
        agent.outbox.cipher = PayloadCipher(tpm_key(node.tpm, node.dir / "outbox.key.tpm"))
    except BaseException:
        node.close()
        raise
    return node


def attestation(node: TpmNode | None, agent: Any) -> list[Coroutine[Any, Any, None]]:
    """The agent's attestation loop (none without a TPM)."""
    if node is None:
        return []
    return [attestation_loop(agent.identity, node, ATTEST_INTERVAL_S,
                             agent.config.renew_retry.delay)]
