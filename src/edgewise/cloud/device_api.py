"""The device API (`/v1/device/...`): enrolment, renewal, re-authentication, desired state and
the session upgrade, exactly as docs/decisions/0004-device-protocol.md lists them.

Identity: every endpoint except ``enrol`` and the two ``reauth`` ones requires a client
certificate, which the TLS layer has verified against our CA; `authenticate` reads the node id
from it with `security.tls.authenticate_peer` (trust domain, validity, revocation list) and
answers 401 (no or unusable certificate) or 403 (revoked). No endpoint takes a node id from
the URL, the body or a header to decide whose resources it serves.

Errors are JSON ``{"error": "..."}``: `PeerError`s carry their HTTP status (401/403/400),
others are 400; a database failure is 503.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from cryptography import x509

from edgewise.cloud import app as appmod
from edgewise.cloud.session import handle_session
from edgewise.cloud.store import new_node_id
from edgewise.errors import PeerError, StorageError
from edgewise.security.pki import (
    ChallengeError,
    CsrError,
    IdentityError,
    public_key_fingerprint,
    validate_node_id,
    verify_challenge,
)
from edgewise.security.tls import CertificateRevoked, authenticate_peer, peer_certificate
from edgewise.security.tokens import ENROLMENT_PREFIX, check_format
from edgewise.sync import protocol

MAX_BODY = 64 * 1024  # bytes of a device JSON request
NONCE_BYTES = 32
MAX_NONCES = 10_000  # outstanding re-authentication challenges

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(PeerError):
    status = 400


class NonceBook:
    """Single-use, short-lived re-authentication nonces (bounded; oldest expire first)."""

    def __init__(self, ttl: float, limit: int = MAX_NONCES) -> None:
        self.ttl = ttl
        self.limit = limit
        self._nonces: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def _prune(self, now: float) -> None:
        while self._nonces:
            nonce, (_, expires) = next(iter(self._nonces.items()))
            if expires > now:
                break
            del self._nonces[nonce]

    def issue(self, node_id: str) -> bytes:
        now = time.monotonic()
        self._prune(now)
        if len(self._nonces) >= self.limit:
            raise StorageError("too many pending re-authentication challenges; retry later")
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._nonces[nonce] = (node_id, now + self.ttl)
        return nonce

    def take(self, nonce: bytes, node_id: str) -> None:
        """Use a nonce up; `ChallengeError` unless it was issued for ``node_id`` and is fresh."""
        entry = self._nonces.pop(nonce, None)
        if entry is None or entry[0] != node_id or entry[1] <= time.monotonic():
            raise ChallengeError("unknown, used or expired challenge nonce; ask for a new one")


NONCES = web.AppKey("nonces", NonceBook)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/device/"):
        return await handler(request)
    try:
        return await handler(request)
    except PeerError as exc:
        status = int(getattr(exc, "status", 400))
        if status in (401, 403):
            request.app[appmod.METRICS].auth_failures.labels(str(status)).inc()
        return _error(status, str(exc))
    except StorageError as exc:
        return _error(503, f"the control plane cannot reach its store: {exc}")


def authenticate(request: web.Request) -> tuple[str, x509.Certificate]:
    """The node id and certificate of the verified TLS client certificate of this request."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        raise IdentityError("device endpoints need TLS with a client certificate")
    app = request.app
    node_id = authenticate_peer(ssl_object, app[appmod.CA].trust_domain,
                                app[appmod.REVOCATIONS])
    return node_id, peer_certificate(ssl_object)


async def _body(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("request body is not JSON") from None
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
    app = request.app
    metrics = app[appmod.METRICS]
    data = await _body(request, {"token": str, "csr": str})
    try:
        token_hash = check_format(data["token"], ENROLMENT_PREFIX)
        ca = app[appmod.CA]
        config = app[appmod.CONFIG]
        node_id = new_node_id()
        issued = ca.sign_node_csr(data["csr"], node_id, config.node_cert_lifetime)
        app[appmod.REVOCATIONS].check(issued.cert)  # a revoked key cannot come back
        await app[appmod.STORE].enrol_node(token_hash, node_id, issued)
    except PeerError as exc:
        metrics.enrolments.labels(type(exc).__name__).inc()
        raise
    metrics.enrolments.labels("ok").inc()
    return web.json_response({
        "node_id": node_id,
        "certificate": issued.pem.decode(),
        "ca": ca.cert_pem.decode(),
        "trust_domain": ca.trust_domain,
        "expires_at": issued.not_after.isoformat(),
    }, status=201)


async def renew(request: web.Request) -> web.Response:
    node_id, cert = authenticate(request)
    data = await _body(request, {"csr": str})
    app = request.app
    issued = app[appmod.CA].sign_node_csr(data["csr"], node_id,
                                          app[appmod.CONFIG].node_cert_lifetime)
    if issued.fingerprint != public_key_fingerprint(cert):
        raise CsrError("renewal keeps the key: the CSR must be made with the node's current key")
    await app[appmod.STORE].record_renewal(node_id, issued)
    app[appmod.METRICS].renewals.labels("renew", "ok").inc()
    return web.json_response({"certificate": issued.pem.decode(),
                              "expires_at": issued.not_after.isoformat()})


async def reauth_challenge(request: web.Request) -> web.Response:
    data = await _body(request, {"node_id": str})
    try:
        node_id = validate_node_id(data["node_id"])
    except Exception:
        raise BadRequest("node_id is not a valid node id") from None
    # a nonce is issued for any well-formed id, so this endpoint does not reveal which exist
    nonce = request.app[NONCES].issue(node_id)
    return web.json_response({"nonce": base64.b64encode(nonce).decode()})


async def reauth(request: web.Request) -> web.Response:
    data = await _body(request, {"node_id": str, "nonce": str, "signature": str,
                                 "certificate": str, "csr": str})
    app = request.app
    ca, config, store = app[appmod.CA], app[appmod.CONFIG], app[appmod.STORE]
    metrics = app[appmod.METRICS]
    node_id = data["node_id"]
    nonce, signature = _b64(data, "nonce"), _b64(data, "signature")
    try:
        app[NONCES].take(nonce, node_id)  # single use, whatever happens next
        cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    except ValueError:
        raise IdentityError("certificate is not a readable PEM certificate") from None
    try:
        named = ca.verify_node_cert(cert, grace=config.reauth_grace)
        if named != node_id:
            raise IdentityError(f"the certificate names node {named}, not {node_id}")
        app[appmod.REVOCATIONS].check(cert)
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
        await store.record_renewal(node_id, issued)
    except PeerError as exc:
        metrics.renewals.labels("reauth", type(exc).__name__).inc()
        raise
    metrics.renewals.labels("reauth", "ok").inc()
    await store.audit(f"node:{node_id}", "node.reauth", f"node:{node_id}",
                      {"old_serial": f"{cert.serial_number:x}"})
    return web.json_response({"certificate": issued.pem.decode(),
                              "expires_at": issued.not_after.isoformat()})


async def desired(request: web.Request) -> web.Response:
    node_id, _ = authenticate(request)
    version: int | None = None
    if "version" in request.query:
        try:
            version = int(request.query["version"])
        except ValueError:
            raise BadRequest("version must be an integer") from None
    state = await request.app[appmod.STORE].get_desired_state(node_id, version)
    if state is None:
        if version is not None:
            return _error(404, f"no desired state version {version} for this node")
        return web.json_response({"version": 0, "desired": None})
    return web.json_response({"version": state.version, "desired": state.to_wire()})


async def session(request: web.Request) -> web.StreamResponse:
    node_id, cert = authenticate(request)
    return await handle_session(request, request.app[appmod.SESSIONS], node_id, cert)


def _op(summary: str, auth: str) -> dict[str, Any]:
    return {"summary": summary, "description": f"Authentication: {auth}.",
            "tags": ["device"]}


def setup(app: web.Application) -> None:
    app.middlewares.append(errors)
    app[NONCES] = NonceBook(app[appmod.CONFIG].nonce_ttl)
    r = app.router
    r.add_post("/v1/device/enrol", enrol)
    r.add_post("/v1/device/renew", renew)
    r.add_post("/v1/device/reauth/challenge", reauth_challenge)
    r.add_post("/v1/device/reauth", reauth)
    r.add_get("/v1/device/desired", desired)
    r.add_get(protocol.SESSION_PATH, session)
    cert, token = "client certificate (mTLS)", "enrolment token in the body"
    app[appmod.OPENAPI].update({
        "/v1/device/enrol": {"post": _op("Enrol a node: {token, csr} -> certificate", token)},
        "/v1/device/renew": {"post": _op("Renew the certificate (same key): {csr}", cert)},
        "/v1/device/reauth/challenge": {"post": _op("Nonce for re-authentication", "none")},
        "/v1/device/reauth": {"post": _op(
            "Re-authenticate with an expired certificate within the grace period",
            "proof of possession of the registered key")},
        "/v1/device/desired": {"get": _op("This node's desired state (?version=N)", cert)},
        protocol.SESSION_PATH: {"get": _op("WebSocket session (msgpack frames)", cert)},
    })
