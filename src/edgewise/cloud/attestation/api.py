"""The attestation routes of the device API (docs/security.md, "Hardware-rooted trust").

* ``POST /v1/device/enrol/tpm`` (no client certificate): ``{token, csr, ek_public,
  ek_certificate?, node_key_public, ak_public, binding}`` (binary fields base64). The CSR is
  the node's TLS key's; ``binding`` is the TPM node key's signature over it
  (`binding_message`), since Python's TLS cannot use a key inside the TPM. Answers
  ``{challenge, credentials: [{blob, secret}, {blob, secret}]}``: credentials to the EK for the
  node key and the AK.
* ``POST /v1/device/enrol/tpm/finish``: ``{token, challenge, answers: [a, b]}`` → the ordinary
  enrolment answer (`device_api.enrol_with`), and the node is registered with its TPM.
* ``POST /v1/device/attest/challenge`` (mTLS): ``{nonce, pcrs}``.
* ``POST /v1/device/attest`` (mTLS): ``{nonce, quote, signature, events}`` → the verdict. A
  failure quarantines the node (`state.set_quarantine`, actor ``attestation``, the reason
  without expected values); a success lifts a quarantine the attestation set (never an
  operator's). A node enrolled without a TPM gets ``attestation: none`` (quarantined when the
  policy requires attestation of it: ``--require-attestation``, or a selector of
  ``--require-attestation-for`` its labels match; also checked when its session starts,
  `at_hello`). A TPM node with a live session that has not attested within ``max_age_s`` is
  quarantined as overdue (`overdue`, from the session registry's maintenance). What a
  quarantined node may still do: `edgewise.cloud.quarantine`.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography import x509

from edgewise.cloud import openapi as oa
from edgewise.cloud.attestation import models as m
from edgewise.cloud.attestation.enrolment import TpmEnrolments, TpmNode
from edgewise.cloud.attestation.verifier import NO_TPM, Attestations, Policy, policy_from_store
from edgewise.cloud.config import CONFIG
from edgewise.cloud.device_api import authenticate, enrol_with
from edgewise.cloud.http_errors import TooManyRequests
from edgewise.cloud.ratelimit import ENROL_PACER
from edgewise.cloud.request_body import read_json
from edgewise.cloud.state import OPENAPI, SESSIONS, STORE, set_quarantine
from edgewise.errors import BadRequest, ConfigError
from edgewise.security.tokens import ENROLMENT_PREFIX, check_format

ROUTES: tuple[oa.Route, ...] = (
    oa.Route("POST", "/v1/device/enrol/tpm", "device_enrol_tpm",
             "TPM enrolment: evidence -> credentials to the EK", "enrolment-token", "device",
             body=m.TpmEnrolRequest, response=m.TpmChallenge),
    oa.Route("POST", "/v1/device/enrol/tpm/finish", "device_enrol_tpm_finish",
             "TPM enrolment: the TPM's answers -> certificate", "enrolment-token", "device",
             body=m.TpmFinishRequest, response=oa.EnrolResponse, status=201, mutating=True),
    oa.Route("POST", "/v1/device/attest/challenge", "device_attest_challenge",
             "A nonce and the PCRs for a TPM quote", "device", "device",
             response=m.AttestChallenge),
    oa.Route("POST", "/v1/device/attest", "device_attest",
             "TPM quote + event log -> verdict (a failure quarantines the node)", "device",
             "device", body=m.Evidence, response=m.Verdict, mutating=True),
)
ENROLMENTS = web.AppKey("tpm_enrolments", TpmEnrolments)
ATTESTATIONS = web.AppKey("attestations", Attestations)
MAX_BODY = 64 << 10
ATTESTOR = "attestation"  # the actor of quarantines the verifier sets
OVERDUE = "attestation overdue: no attestation within the allowed time"
GRACE_S = 120.0  # s a session has to attest before it can be overdue


async def _body(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    data = await read_json(request, MAX_BODY)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    for name, typ in fields.items():
        if not isinstance(data.get(name), typ):
            raise BadRequest(f"field {name!r} is missing or not a {typ.__name__}")
    return data


def _b64(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"field {name!r} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"field {name!r} is not base64") from None


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def enrol_tpm(request: web.Request) -> web.Response:
    data = await _body(request, {"token": str, "csr": str, "ek_public": str,
                                 "node_key_public": str, "ak_public": str, "binding": str})
    check_format(data["token"], ENROLMENT_PREFIX)  # its form here; it is used at /finish
    retry = await request.app[ENROL_PACER].admit()  # paced as enrolments are
    if retry > 0:
        raise TooManyRequests("too many enrolments at once; retry later", retry)
    csr = data["csr"].encode()
    ek_cert = data.get("ek_certificate")
    challenge = request.app[ENROLMENTS].begin(
        csr, _b64(data["ek_public"], "ek_public"), _b64(data["node_key_public"],
                                                         "node_key_public"),
        _b64(data["ak_public"], "ak_public"),
        _b64(ek_cert, "ek_certificate") if ek_cert is not None else None,
        _b64(data["binding"], "binding"))
    return web.json_response({"challenge": challenge.id, "credentials": [
        {"blob": _enc(blob), "secret": _enc(secret)} for blob, secret in challenge.credentials]})


async def enrol_tpm_finish(request: web.Request) -> web.Response:
    data = await _body(request, {"token": str, "challenge": str, "answers": list})
    answers = [_b64(a, "answers") for a in data["answers"][:2]]
    node, csr = request.app[ENROLMENTS].finish(data["challenge"], answers)
    store = request.app[STORE]
    status, body = await enrol_with(request.app, data["token"], csr.decode(), tpm=True)
    await store.register_tpm(body["node_id"], node.ek_fingerprint, node.ak_public,
                             node.node_key_public)
    return web.json_response(body, status=status)


async def attest_challenge(request: web.Request) -> web.Response:
    node_id, _ = await authenticate(request)
    nonce = request.app[ATTESTATIONS].challenge(node_id)
    settings = request.app[CONFIG].attestation
    return web.json_response({"nonce": _enc(nonce),
                              "pcrs": sorted({*settings.pcrs, *settings.firmware_pcrs})})


async def _policy(app: web.Application) -> Policy:
    settings = app[CONFIG].attestation
    return await policy_from_store(app[STORE], settings.agents, settings.pcrs,
                                   settings.firmware_pcrs, settings.golden_firmware)


async def attest(request: web.Request) -> web.Response:
    node_id, _ = await authenticate(request)
    data = await _body(request, {})
    app = request.app
    store, attestations = app[STORE], app[ATTESTATIONS]
    record = await store.tpm_of(node_id)
    if record is None:
        node_info = await store.get_node(node_id)
        required = app[CONFIG].attestation.required(node_info.labels if node_info else {})
        verdict, before = attestations.no_tpm(node_id, required), NO_TPM
    else:
        node = TpmNode(record.ek_fingerprint, record.ak_public, record.node_key_public)
        verdict = attestations.verify(node_id, node, await _policy(app), data)
        before = (record.verdict or {}).get("reason")
        await store.record_verdict(node_id, verdict.to_json())
    await _quarantine(app, node_id, verdict.reason if verdict.quarantined else None, before)
    return web.json_response(verdict.to_json())


async def _quarantine(app: web.Application, node_id: str, reason: str | None,
                      before: str | None) -> None:
    """Quarantine for ``reason``, or lift the quarantine the previous verdict (``before``)
    set; a quarantine that is not the attestation's own (an operator's) stays. Through
    `state.set_quarantine`: audited, and the node's live session stores accordingly."""
    current = (await app[STORE].quarantines([node_id])).get(node_id)
    ours = current is not None and current in (before, OVERDUE)
    if reason is not None and (current is None or ours) and current != reason:
        await set_quarantine(app, node_id, reason, actor=ATTESTOR)
    elif reason is None and ours:
        await set_quarantine(app, node_id, None, actor=ATTESTOR)


async def overdue(app: web.Application, live: list[tuple[str, float]]) -> None:
    """Quarantine the TPM nodes among ``live`` ((node, seconds its session is open)) whose
    newest attestation (or enrolment) is older than ``max_age_s``: a node that stops quoting,
    or a copy of its TLS key that never does, is not trusted for long. A session gets
    `GRACE_S` (at most ``max_age_s``) to attest first. A successful attestation lifts it."""
    max_age = app[CONFIG].attestation.max_age_s
    ids = [n for n, age in live if age >= min(GRACE_S, max_age)]
    now = datetime.now(UTC)
    for i in range(0, len(ids), 1000):
        for node_id, at in (await app[STORE].attested_at(ids[i:i + 1000])).items():
            if (now - at).total_seconds() > max_age:
                await _quarantine(app, node_id, OVERDUE, OVERDUE)


async def at_hello(app: web.Application, node_id: str) -> str | None:
    """The node's quarantine reason when its session starts (`SessionRegistry`). A node
    without a TPM that the policy requires to attest (``--require-attestation``, or a
    ``--require-attestation-for`` selector its labels match) is quarantined here, and such a
    quarantine is lifted once the policy no longer requires it. One query unless a policy is
    configured or the node holds that quarantine."""
    settings, store = app[CONFIG].attestation, app[STORE]
    reason = (await store.quarantines([node_id])).get(node_id)
    if not (settings.require or settings.require_for or reason == NO_TPM):
        return reason
    if await store.tpm_of(node_id) is not None:
        return reason
    node = await store.get_node(node_id)
    required = settings.required(node.labels if node is not None else {})
    await _quarantine(app, node_id, NO_TPM if required else None, NO_TPM)
    return (await store.quarantines([node_id])).get(node_id)


def _manufacturers(app: web.Application) -> list[x509.Certificate]:
    cas = []
    for path in app[CONFIG].attestation.manufacturer_cas:
        try:
            cas += x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--tpm-manufacturer-ca {path}: not readable PEM ({exc})") \
                from None
    return cas


def setup(app: web.Application) -> None:
    settings = app[CONFIG].attestation
    app[ENROLMENTS] = TpmEnrolments(_manufacturers(app))
    app[ATTESTATIONS] = Attestations(require_attestation=settings.require)
    handlers = {"device_enrol_tpm": enrol_tpm, "device_enrol_tpm_finish": enrol_tpm_finish,
                "device_attest_challenge": attest_challenge, "device_attest": attest}
    for route in ROUTES:
        app.router.add_route(route.method, route.path, handlers[route.name])
    app[OPENAPI].update(oa.path_items(ROUTES))
    app[SESSIONS].quarantine_policy = lambda node_id: at_hello(app, node_id)
    app[SESSIONS].attestation_check = lambda live: overdue(app, live)
