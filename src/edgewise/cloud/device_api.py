"""The device API (`/v1/device/...`): enrolment, renewal, re-authentication, desired state and
the session upgrade, exactly as docs/decisions/0004-device-protocol.md lists them.

Identity: every endpoint except ``enrol`` and the two ``reauth`` ones requires a client
certificate, which the TLS layer has verified against our CA; `authenticate` reads the node id
from it with `security.tls.authenticate_peer` (trust domain, validity, revocation list) and
answers 401 (no or unusable certificate) or 403 (revoked). No endpoint takes a node id from
the URL, the body or a header to decide whose resources it serves.

Errors are JSON ``{"error": "..."}``, answered by `http_errors.error_answer` (the one mapping
both APIs use): `BadRequest` 400, `NotFound` 404, `PeerError`s their HTTP status (401/403/400),
a store failure 503. A `ConfigError` here is the server's own (device requests carry no
configuration), so it is not answered as the node's fault.

Only nodes the store knows may authenticate: a certificate of our CA whose node id is not
enrolled, or whose key is not the registered one, gets 401, a revoked node 403. Each node has a
request rate (`ratelimit`, ``ServerLimits.device_rate`` / ``device_burst``) over the endpoints
that take its certificate, the session upgrade included: 429 with ``Retry-After`` above it.
Bodies are read whole, up to 64 KiB (413 above), as strict JSON (`request_body`). One key is
one node: enrolling a key that already has a node is refused with 409. Enrolment is idempotent
per key and token: the same key with the token it enrolled with, before that token expires,
gets its node again (200, a fresh certificate), so an answer lost on the way burns no token and
leaves no orphan node. Enrolments' store writes are grouped (`enrolments.EnrolWriter`: one
transaction for the enrolments of the same moment, a savepoint each) and admitted only while
that writer's backlog is short (429 with ``Retry-After`` beyond it; then the `Pacer`).

**Decommissioned nodes** (`edgewise node decommission`) are revoked like any other, with one
difference: when a request proves possession of the node's registered key (the TLS handshake
with its certificate, or a re-authentication's signed nonce, also with an expired certificate)
the 403 carries ``Edgewise-Decommissioned: wipe`` or ``keep`` (`DecommissionedNode`), so a node
that was offline at the time still learns it must wipe itself. Nothing else is served to it
(docs/security.md, "Decommissioning").
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from aiohttp import web
from cryptography import x509

from edgewise.cloud.config import CONFIG
from edgewise.cloud.enrolments import ENROL_WRITER, EnrolWriter
from edgewise.cloud.http_errors import TooManyRequests, error_answer
from edgewise.cloud.openapi import MAX_INT
from edgewise.cloud.ratelimit import DEVICE_RATE, ENROL_PACER, Pacer, RateLimiter
from edgewise.cloud.request_body import DEVICE_BODY, read_json
from edgewise.cloud.sessions import handle_session
from edgewise.cloud.state import CA, METRICS, OPENAPI, REVOCATIONS, SESSIONS, STORE
from edgewise.cloud.store import KeyInUse, Store, new_node_id
from edgewise.cloud.store.identity import EnrolRequest
from edgewise.errors import BadRequest, EdgewiseError, NotFound, PeerError, StorageError
from edgewise.security.pki import (
    ChallengeError,
    CsrError,
    IdentityError,
    public_key_fingerprint,
    validate_node_id,
    verify_challenge,
)
from edgewise.security.tls import CertificateRevoked, authenticate_peer, peer_certificate
from edgewise.security.tokens import ENROLMENT_PREFIX, TokenError, check_format
from edgewise.security.tpm.credential import AttestationRequired, check_binding
from edgewise.sync import protocol

MAX_BODY = DEVICE_BODY  # bytes of a device JSON request; 413 above
NONCE_BYTES = 32
MAX_NONCES = 10_000  # outstanding re-authentication challenges

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ANY_AGE = timedelta(days=36_500)  # a decommissioned node may come back after any time


class DecommissionedNode(CertificateRevoked):
    """A decommissioned node, proven to hold its registered key: 403 with the order."""

    def __init__(self, node_id: str, wipe: bool) -> None:
        super().__init__(f"node {node_id} has been decommissioned"
                         + ("; wipe its keys and data" if wipe else ""))
        self.answer_headers = {protocol.DECOMMISSIONED_HEADER: "wipe" if wipe else "keep"}


async def tell_decommissioned(app: web.Application, cert: x509.Certificate,
                              prove: Callable[[], None] | None = None) -> None:
    """Raise `DecommissionedNode` if ``cert`` (issued by our CA, of any age) names a
    decommissioned node and holds the key registered for it; return otherwise. Possession of
    the key must be proven: by the TLS handshake (``prove`` None), or by ``prove()`` (which
    raises if the proof fails). Within the node's request rate."""
    try:
        node_id = app[CA].verify_node_cert(cert, grace=ANY_AGE)
    except IdentityError:
        return
    wait = app[DEVICE_RATE].take(node_id)
    if wait > 0:
        raise TooManyRequests(f"node {node_id} is over its request rate; retry later", wait)
    node = await app[STORE].get_node(node_id)
    if (node is None or not node.decommissioned
            or public_key_fingerprint(cert) != node.key_fingerprint):
        return
    if prove is not None:
        prove()
    raise DecommissionedNode(node_id, node.wipe)


class NonceBook:
    """Single-use, short-lived re-authentication nonces (bounded; oldest expire first): in
    process memory, or in the store (``store``: PostgreSQL, where several control-plane
    processes share the database and a node may take its nonce from another one,
    `Store.issue_nonce`)."""

    def __init__(self, ttl: float, limit: int = MAX_NONCES, *, store: Store | None = None
                 ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.store = store
        self._nonces: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def _prune(self, now: float) -> None:
        while self._nonces:
            nonce, (_, expires) = next(iter(self._nonces.items()))
            if expires > now:
                break
            del self._nonces[nonce]

    async def issue(self, node_id: str) -> bytes:
        if self.store is not None:
            return await self.store.issue_nonce(node_id, self.ttl, limit=self.limit)
        now = time.monotonic()
        self._prune(now)
        if len(self._nonces) >= self.limit:
            raise StorageError("too many pending re-authentication challenges; retry later")
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._nonces[nonce] = (node_id, now + self.ttl)
        return nonce

    async def take(self, nonce: bytes, node_id: str) -> None:
        """Use a nonce up; `ChallengeError` unless it was issued for ``node_id`` and is fresh."""
        if self.store is not None:
            fresh = len(nonce) == NONCE_BYTES and await self.store.take_nonce(nonce, node_id)
        else:
            entry = self._nonces.pop(nonce, None)
            fresh = entry is not None and entry[0] == node_id and entry[1] > time.monotonic()
        if not fresh:
            raise ChallengeError("unknown, used or expired challenge nonce; ask for a new one")


NONCES = web.AppKey("nonces", NonceBook)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/device/"):
        return await handler(request)
    try:
        return await handler(request)
    except EdgewiseError as exc:
        answer = error_answer(exc, config_is_input=False)
        if answer is None:
            raise
        if answer.status in (401, 403):
            request.app[METRICS].auth_failures.labels(str(answer.status)).inc()
        return answer


async def authenticate(request: web.Request) -> tuple[str, x509.Certificate]:
    """The node id and certificate of the verified TLS client certificate of this request,
    within the node's request rate, of a node the store knows (not revoked, same key)."""
    node_id, cert, _ = await identify(request)
    return node_id, cert


async def identify(request: web.Request) -> tuple[str, x509.Certificate, str]:
    """`authenticate`, with the certificate's key fingerprint (a session keeps it)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        raise IdentityError("device endpoints need TLS with a client certificate")
    app = request.app
    cert = peer_certificate(ssl_object)
    fingerprint = public_key_fingerprint(cert)  # once: the revocation check and the match
    try:
        node_id = authenticate_peer(ssl_object, app[CA].trust_domain, app[REVOCATIONS],
                                    cert=cert, fingerprint=fingerprint)
    except CertificateRevoked:
        await tell_decommissioned(app, cert)
        raise
    wait = app[DEVICE_RATE].take(node_id)
    if wait > 0:
        raise TooManyRequests(f"node {node_id} is over its request rate "
                              f"({app[CONFIG].server.device_rate:g}/s); retry later", wait)
    node = await app[STORE].get_node(node_id)
    if node is None:
        raise IdentityError(f"node {node_id} is not enrolled here; enrol with a token")
    if node.revoked:
        if node.decommissioned and fingerprint == node.key_fingerprint:
            raise DecommissionedNode(node_id, node.wipe)  # revoked on another replica
        raise CertificateRevoked(f"node {node_id} has been revoked")
    if fingerprint != node.key_fingerprint:
        raise IdentityError("the certificate's key is not the key registered for this node")
    return node_id, cert, fingerprint


async def _body(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    data = await read_json(request, MAX_BODY)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    for name, typ in fields.items():
        if not isinstance(data.get(name), typ):
            raise BadRequest(f"field {name!r} is missing or not a {typ.__name__}")
    return data


def _b64(data: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(data[name], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"field {name!r} is not base64") from None


async def enrol(request: web.Request) -> web.Response:
    """201 with a new node; 200 with the same node (and a fresh certificate) for a retry of an
    enrolment that succeeded: the same key with the same token, before the token expires."""
    data = await _body(request, {"token": str, "csr": str})
    status, body = await enrol_with(request.app, data["token"], data["csr"])
    return web.json_response(body, status=status)


async def enrol_with(app: web.Application, token: str, csr: str, *, tpm: bool = False,
                     ) -> tuple[int, dict[str, Any]]:
    """Enrol with ``token`` and ``csr``: (status, answer). ``tpm``: the caller checked the
    node's TPM (`edgewise.cloud.attestation.api`); without it a control plane that requires
    attestation (of all nodes, or of those the token's labels match a selector of) refuses
    (403)."""
    metrics = app[METRICS]
    if not tpm and app[CONFIG].attestation.require:
        metrics.enrolments.labels("AttestationRequired").inc()
        raise AttestationRequired("this control plane enrols only nodes with a TPM "
                                  "(enrol with --tpm)")
    # admission: enrolments beyond the rate wait their turn (a queue, not timeouts), and
    # beyond what the store's grouped writes take in a few seconds are told when to come back
    writer, pacer = app[ENROL_WRITER], app[ENROL_PACER]
    retry = writer.retry_after()
    if retry == 0.0:
        retry = await pacer.admit()
    if retry > 0:
        metrics.enrolments.labels("busy").inc()
        raise TooManyRequests("too many enrolments at once; retry later", retry)
    try:
        return await _enrol_admitted(app, token, csr, tpm)
    finally:
        pacer.done()


async def _enrol_admitted(app: web.Application, token: str, csr: str, tpm: bool
                          ) -> tuple[int, dict[str, Any]]:
    metrics, writer = app[METRICS], app[ENROL_WRITER]
    status, outcome = 201, "ok"
    try:
        token_hash = check_format(token, ENROLMENT_PREFIX)
        ca, config, store = app[CA], app[CONFIG], app[STORE]
        if not tpm and config.attestation.require_for and config.attestation.required(
                await store.token_labels(token_hash) or {}):  # the token is not used up
            raise AttestationRequired("nodes with this token's labels must enrol with a TPM "
                                      "(--require-attestation-for; enrol with --tpm)")
        node_id = new_node_id()
        issued = ca.sign_node_csr(csr, node_id, config.node_cert_lifetime)
        app[REVOCATIONS].check(issued.cert)  # a revoked key cannot come back
        try:  # stored with the enrolments of the same moment, in one transaction
            _, tuf_root = await writer.enrol(EnrolRequest(token_hash, node_id, issued))
        except (TokenError, KeyInUse):
            # the token used up or the key taken: by this very enrolment, whose answer was lost?
            node = await store.enrolment_of(token_hash, issued.fingerprint)
            if node is None:
                raise
            if node.revoked:
                raise CertificateRevoked(f"node {node.id} has been revoked") from None
            node_id, status, outcome = node.id, 200, "retry"
            issued = ca.sign_node_csr(csr, node_id, config.node_cert_lifetime)
            await store.enrol_again(token_hash, node_id, issued)
            tuf_root = await store.tuf_metadata("root")  # the newest; None until keys init
    except PeerError as exc:
        metrics.enrolments.labels(type(exc).__name__).inc()
        raise
    metrics.enrolments.labels(outcome).inc()
    return status, {
        "node_id": node_id,
        "certificate": issued.pem.decode(),
        "ca": ca.cert_pem.decode(),
        "trust_domain": ca.trust_domain,
        "expires_at": issued.not_after.isoformat(),
        "tuf_root": tuf_root.decode() if tuf_root is not None else None,
    }


async def renew(request: web.Request) -> web.Response:
    node_id, cert = await authenticate(request)
    data = await _body(request, {"csr": str})
    app = request.app
    issued = app[CA].sign_node_csr(data["csr"], node_id,
                                          app[CONFIG].node_cert_lifetime)
    if issued.fingerprint != public_key_fingerprint(cert):
        raise CsrError("renewal keeps the key: the CSR must be made with the node's current key")
    await _tpm_bound(app, node_id, data)
    await app[STORE].record_renewal(node_id, issued)
    app[METRICS].renewals.labels("renew", "ok").inc()
    return web.json_response({"certificate": issued.pem.decode(),
                              "expires_at": issued.not_after.isoformat()})


async def _tpm_bound(app: web.Application, node_id: str, data: dict[str, Any]) -> None:
    """A node enrolled with a TPM renews only with the TPM node key's signature over the CSR
    (``binding``): a copy of its TLS key alone cannot keep a certificate alive."""
    tpm = await app[STORE].tpm_of(node_id)
    if tpm is not None:
        check_binding(tpm.node_key_public, data.get("binding"), data["csr"].encode())


async def reauth_challenge(request: web.Request) -> web.Response:
    data = await _body(request, {"node_id": str})
    try:
        node_id = validate_node_id(data["node_id"])
    except Exception:
        raise BadRequest("node_id is not a valid node id") from None
    # a nonce is issued for any well-formed id, so this endpoint does not reveal which exist
    nonce = await request.app[NONCES].issue(node_id)
    return web.json_response({"nonce": base64.b64encode(nonce).decode()})


async def reauth(request: web.Request) -> web.Response:
    data = await _body(request, {"node_id": str, "nonce": str, "signature": str,
                                 "certificate": str, "csr": str})
    app = request.app
    ca, config, store = app[CA], app[CONFIG], app[STORE]
    metrics = app[METRICS]
    node_id = data["node_id"]
    nonce, signature = _b64(data, "nonce"), _b64(data, "signature")
    try:
        await app[NONCES].take(nonce, node_id)  # single use, whatever happens next
        cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    except ValueError:
        raise IdentityError("certificate is not a readable PEM certificate") from None
    try:
        named = ca.verify_node_cert(cert, grace=config.reauth_grace)
        if named != node_id:
            raise IdentityError(f"the certificate names node {named}, not {node_id}")
        app[REVOCATIONS].check(cert)
        node = await store.get_node(node_id)
        if node is None:
            raise IdentityError(f"node {node_id} is not enrolled; enrol with a token")
        if node.revoked:
            raise CertificateRevoked(f"node {node_id} has been revoked")
        fingerprint = public_key_fingerprint(cert)
        if fingerprint != node.key_fingerprint:
            raise IdentityError("the certificate's key is not the key registered for this node")
        verify_challenge(cert, nonce, signature)
        issued = ca.sign_node_csr(data["csr"], node_id, config.node_cert_lifetime)
        if issued.fingerprint != node.key_fingerprint:
            raise CsrError("the CSR must be made with the node's registered key")
        await _tpm_bound(app, node_id, data)
        await store.record_renewal(node_id, issued)
    except PeerError as exc:
        if isinstance(exc, CertificateRevoked | IdentityError):
            try:  # a decommissioned node hears it, once it proves it holds the key
                await tell_decommissioned(
                    app, cert, lambda: verify_challenge(cert, nonce, signature))
            except PeerError as told:
                metrics.renewals.labels("reauth", type(told).__name__).inc()
                raise told from None
        metrics.renewals.labels("reauth", type(exc).__name__).inc()
        raise
    metrics.renewals.labels("reauth", "ok").inc()
    await store.audit(f"node:{node_id}", "node.reauth", f"node:{node_id}",
                      {"old_serial": f"{cert.serial_number:x}"})
    return web.json_response({"certificate": issued.pem.decode(),
                              "expires_at": issued.not_after.isoformat()})


async def desired(request: web.Request) -> web.Response:
    node_id, _ = await authenticate(request)
    version: int | None = None
    if "version" in request.query:
        try:
            version = int(request.query["version"])
        except ValueError:
            raise BadRequest("version must be an integer") from None
        if not 0 <= version <= MAX_INT:
            raise BadRequest(f"version must be between 0 and {MAX_INT}")
    state = await request.app[STORE].get_desired_state(node_id, version)
    if state is None:
        if version is not None:
            raise NotFound(f"no desired state version {version} for this node")
        return web.json_response({"version": 0, "desired": None})
    return web.json_response({"version": state.version, "desired": state.to_wire()})


async def session(request: web.Request) -> web.StreamResponse:
    registry = request.app[SESSIONS]
    # a storm waits in line for a start slot, or outside (429) beyond a few seconds' line.
    # Before `authenticate`, whose store read every upgrade would otherwise make at once: in
    # a 5,000-node storm those reads queued on SQLite's four read connections for their 30 s
    # and the storm collapsed (docs/benchmarks.md, "The cap's wait and the reads before
    # admission"). The TLS layer has verified the certificate already.
    wait = await registry.admission.admit()
    if wait > 0:
        registry.metrics.session_errors.labels("busy: told to retry").inc()
        raise TooManyRequests("too many sessions starting at once; retry later", wait)
    try:
        node_id, cert, fingerprint = await identify(request)
    except BaseException:
        registry.admission.ended(welcomed=False)  # the slot, for the next in line
        raise
    return await handle_session(request, registry, node_id, cert, fingerprint)


def _op(summary: str, auth: str) -> dict[str, Any]:
    return {"summary": summary, "description": f"Authentication: {auth}.",
            "tags": ["device"]}


def setup(app: web.Application) -> None:
    app.middlewares.append(errors)
    config = app[CONFIG]
    store = app[STORE]
    app[NONCES] = NonceBook(config.nonce_ttl, store=store if store.shared else None)
    app[DEVICE_RATE] = RateLimiter(config.server.device_rate, config.server.device_burst)
    # enrolments hold unauthenticated connections: at most half of the listener's cap, so
    # the other half stays for the handshakes of the nodes' sessions (`Pacer`)
    app[ENROL_PACER] = Pacer(config.server.enrol_rate, config.server.enrol_burst,
                             config.server.enrol_queue,
                             max(1, config.server.max_unauthenticated // 2))
    writer = app[ENROL_WRITER] = EnrolWriter(app[STORE])

    async def close_writer(_app: web.Application) -> None:
        await writer.close()  # before the store closes (cleanup)

    app.on_shutdown.append(close_writer)
    r = app.router
    r.add_post("/v1/device/enrol", enrol)
    r.add_post("/v1/device/renew", renew)
    r.add_post("/v1/device/reauth/challenge", reauth_challenge)
    r.add_post("/v1/device/reauth", reauth)
    r.add_get("/v1/device/desired", desired)
    r.add_get(protocol.SESSION_PATH, session)
    cert, token = "client certificate (mTLS)", "enrolment token in the body"
    app[OPENAPI].update({
        "/v1/device/enrol": {"post": _op("Enrol a node: {token, csr} -> certificate", token)},
        "/v1/device/renew": {"post": _op("Renew the certificate (same key): {csr}", cert)},
        "/v1/device/reauth/challenge": {"post": _op("Nonce for re-authentication", "none")},
        "/v1/device/reauth": {"post": _op(
            "Re-authenticate with an expired certificate within the grace period",
            "proof of possession of the registered key")},
        "/v1/device/desired": {"get": _op("This node's desired state (?version=N)", cert)},
        protocol.SESSION_PATH: {"get": _op("WebSocket session (msgpack frames)", cert)},
    })
