"""The node's identity: its key, its short-lived certificate, and the HTTPS calls that keep it.

This module enrols, renews and re-authenticates. The files (``DATA/identity/``: node.key,
node.pem, ca.pem, node_id, cloud.json) and their modes are `edgewise.edge.identity_files`; one
JSON request to the device API and its errors are `edgewise.edge.device_http`.

Lifecycle (docs/agent.md, docs/security.md):

* **Enrol** (first run, ``--token``): CSR + token → ``POST /v1/device/enrol`` over TLS that
  verifies the server against ``ca.pem`` and presents no client certificate.
* **Renew** once `pki.needs_renewal` says 2/3 of the lifetime has passed: a CSR of the same key
  → ``POST /v1/device/renew`` over mutual TLS.
* **Re-authenticate** when the certificate expired during an outage: a nonce from
  ``/v1/device/reauth/challenge``, signed with the node key, plus the expired certificate and a
  CSR → ``/v1/device/reauth``. Past the control plane's grace period it answers 401, and the
  node needs a new enrolment token (`ReenrolRequired`).

Every certificate that comes back is checked to hold our own key and to name the node of our
trust domain, then written atomically. The token and the key are never logged.

Errors:

    ConfigError ── EnrolmentRefused     the enrolment token was refused (wrong, used, expired)
    PeerError ──── CloudRefusal         the control plane answered 4xx/5xx (`device_http`)
    EdgewiseError ┬ Revoked             the control plane revoked this node: stop
                  └ ReenrolRequired     the certificate is past the grace period: new token
    TransportError                      the control plane could not be reached
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from edgewise.edge.damaged import DamagedFile, set_aside

# ``x as x``: re-exported, edge/uplink.py and edge/status.py import them from this module
from edgewise.edge.device_http import (
    REQUEST_TIMEOUT_S,
    CloudRefusal,
    check_cloud_url,
    device_request,
)
from edgewise.edge.device_http import describe_network_error as describe_network_error
from edgewise.edge.identity_files import CertInfo, IdentityFiles, identity_of
from edgewise.edge.identity_files import read_cert_info as read_cert_info
from edgewise.edge.tpm_node import tpm_binding, tpm_enrol
from edgewise.errors import ConfigError, EdgewiseError, PeerError, StorageError, TransportError
from edgewise.security import pki, tls

log = logging.getLogger(__name__)

class EnrolmentRefused(ConfigError):
    """The control plane refused the enrolment token."""


class Revoked(EdgewiseError):
    """The control plane revoked this node's certificate or key; the agent must stop.

    ``decommissioned``: it was decommissioned (`edgewise.edge.decommission`), and with ``wipe``
    the node deletes its keys and data."""

    def __init__(self, reason: str, *, decommissioned: bool = False, wipe: bool = False) -> None:
        self.reason = reason
        self.decommissioned = decommissioned
        self.wipe = wipe and decommissioned
        what = "decommissioned" if decommissioned else "revoked"
        super().__init__(
            f"this node has been {what} by the control plane ({reason}). The agent stops; "
            "an operator must enrol it again with a new token before it can reconnect"
        )

    @classmethod
    def of(cls, refusal: CloudRefusal) -> Revoked:
        """From a 403 answer, with the decommission order it carries, if any."""
        return cls(refusal.reason, decommissioned=refusal.decommissioned, wipe=refusal.wipe)


class ReenrolRequired(EdgewiseError):
    """The certificate expired longer ago than the control plane's grace period."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class NodeIdentity:
    """The node's key and certificate, and the device API calls that need them.

    ``prepare()`` (synchronous, at start) reads or creates the files and checks the flags;
    everything that needs the network is async and raises `TransportError` when it cannot
    reach the control plane, so callers retry with backoff.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        cloud: str | None = None,
        ca: str | os.PathLike[str] | None = None,
        token: SecretStr | None = None,
        *,
        renew_fraction: float = pki.RENEW_FRACTION,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.files = IdentityFiles(data_dir)
        self._cloud_flag = check_cloud_url(cloud) if cloud else None
        self._ca_flag = Path(ca) if ca is not None else None
        self._token = token
        self.renew_fraction = renew_fraction
        self.now = now
        self.cloud = ""
        self.trust_domain: str | None = None
        self.node_id: str | None = None
        self.cert: CertInfo | None = None
        self.problem: str | None = None  # set when only an operator can help (re-enrol)
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self.renewals = 0
        self.reauths = 0
        self.tpm: Any = None  # `edge.tpm_node.TpmNode` with --tpm: enrolment through the TPM

    # -- paths ------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.files.dir

    @property
    def key_path(self) -> Path:
        return self.files.key_path

    @property
    def cert_path(self) -> Path:
        return self.files.cert_path

    @property
    def ca_path(self) -> Path:
        return self.files.ca_path

    @property
    def enrolled(self) -> bool:
        return self.cert is not None and self.node_id is not None

    @property
    def label(self) -> str:
        """The node id, or a stable local name before enrolment (for clocks and logs)."""
        if self.node_id:
            return self.node_id
        assert self._key is not None, "prepare() first"
        return "key-" + pki.public_key_fingerprint(self._key)[:12]

    # -- start ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read (or create) the identity files; raise `ConfigError` for what the user must fix.

        Creates the key on first start. Does not contact the control plane. A damaged file is
        a `DamagedFile` (exit 2) unless it can be put right here: ``cloud.json`` from
        ``--cloud``, ``ca.pem`` from ``--ca``, ``node_id`` from node.pem, the key or the
        certificate by enrolling again as a new node when ``--token`` is given.
        """
        files = self.files
        files.make_dir()
        try:
            saved = files.read_cloud()
        except DamagedFile as exc:
            if self._cloud_flag is None:
                raise
            log.warning("%s; writing it again from --cloud", exc.what)
            saved = {}
        self.cloud = self._cloud_flag or saved.get("cloud", "")
        if not self.cloud:
            raise ConfigError(
                f"{self.dir.parent} has no control plane yet: pass --cloud https://HOST:PORT"
            )
        self.trust_domain = saved.get("trust_domain")
        if self._ca_flag is not None:
            files.install_ca(self._ca_flag)
        elif not self.ca_path.exists():
            raise ConfigError(
                f"no CA certificate in {self.dir}: pass --ca CA.pem (the control plane's "
                "ca.pem, printed by `edgewise cloud serve`)"
            )
        files.check_ca()
        try:
            self._key = files.load_or_make_key()
            cert = files.load_cert() if files.enrolled() else None
        except DamagedFile as exc:
            if self._token is None:
                raise
            self._key, cert = self._start_over(exc), None
        if cert is not None:
            self._take_cert(cert)
            if self._token is not None:
                log.info("already enrolled as node %s; --token is not needed", self.node_id)
        elif self._token is None:
            raise ConfigError(
                f"{self.dir.parent} is not enrolled yet: pass --token with an enrolment token "
                "(make one with `edgewise cloud token create`)"
            )
        if (self.cloud, self.trust_domain) != (saved.get("cloud"), saved.get("trust_domain")):
            files.write_cloud(self.cloud, self.trust_domain)

    def _take_cert(self, cert: x509.Certificate) -> None:
        """The certificate on disk is ours: who it names is who we are (``node_id`` and the
        trust domain are written again from it when they say otherwise)."""
        files = self.files
        assert self._key is not None
        if pki.public_key_fingerprint(cert) != pki.public_key_fingerprint(self._key):
            raise ConfigError(
                f"{self.cert_path} does not belong to {self.key_path}; remove "
                f"{self.dir} and enrol again with --token"
            )
        self.trust_domain, self.node_id = identity_of(cert)
        try:
            on_disk: str | None = files.read_node_id() if files.node_id_path.exists() else None
            state = "is missing" if on_disk is None else f"is damaged ({on_disk!r})"
        except DamagedFile as exc:
            on_disk, state = None, f"is damaged ({exc.why})"
        if on_disk != self.node_id:
            log.warning("%s %s; written again from %s, which names node %s",
                        files.node_id_path, state, self.cert_path.name, self.node_id)
            files.write_node_id(self.node_id)
        self.cert = CertInfo.of(cert)

    def _start_over(self, damage: DamagedFile) -> ec.EllipticCurvePrivateKey:
        """The key or certificate is damaged and a token was given: keep the old files as
        ``*.damaged`` and make a fresh key to enrol as a new node."""
        files = self.files
        old = None
        with contextlib.suppress(EdgewiseError):
            old = files.read_node_id() if files.node_id_path.exists() else None
        for path in (files.key_path, files.cert_path, files.node_id_path):
            if path.exists() and set_aside(path) is None:
                raise StorageError(f"cannot move {path} aside to enrol again") from None
        log.warning("%s; enrolling again with the --token given, as a new node with a new "
                    "key (the old files are kept as *.damaged)%s", damage.what,
                    f"; revoke the old node {old} (`edgewise node revoke {old}`)" if old else "")
        return files.load_or_make_key()

    def _events(self) -> tuple[asyncio.Lock, asyncio.Event]:
        # created on first use inside the running loop, never in __init__
        if self._lock is None or self._changed is None:
            self._lock, self._changed = asyncio.Lock(), asyncio.Event()
        return self._lock, self._changed

    # -- TLS and HTTPS ----------------------------------------------------------------------
    def ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        """TLS 1.3 to the control plane, verified against ``ca.pem``; with our certificate
        unless ``client_cert`` is False (enrolment and re-authentication)."""
        if client_cert:
            return tls.client_context(self.ca_path, self.cert_path, self.key_path)
        return tls.client_context(self.ca_path)

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None,
        *, client_cert: bool = True, timeout: float = REQUEST_TIMEOUT_S,
    ) -> dict[str, Any]:
        """One JSON request to the device API. Raises `TransportError`, `CloudRefusal`,
        `PeerError` (an answer that is not a JSON object) or `ConfigError` (the server's
        certificate does not verify against our CA)."""
        return await device_request(
            self.cloud, self.ssl_context(client_cert), method, path, body,
            timeout=timeout, ca_path=self.ca_path,
        )

    # -- certificates that come back --------------------------------------------------------
    def _accept_cert(
        self, answer: dict[str, Any], key: ec.EllipticCurvePrivateKey, node_id: str,
        trust_domain: str,
    ) -> x509.Certificate:
        pem = answer.get("certificate")
        if not isinstance(pem, str):
            raise PeerError("the control plane's answer has no certificate")
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            raise PeerError("the control plane sent an unreadable certificate") from None
        if pki.public_key_fingerprint(cert) != pki.public_key_fingerprint(key):
            raise PeerError("the control plane sent a certificate for another key")
        named = pki.node_id_from_cert(cert, trust_domain)
        if named != node_id:
            raise PeerError(f"the certificate names node {named!r}, expected {node_id!r}")
        return cert

    def _store_cert(self, cert: x509.Certificate) -> None:
        self.files.write_cert(cert)
        self.cert = CertInfo.of(cert)
        _, changed = self._events()
        changed.set()

    # -- operations -------------------------------------------------------------------------
    def expired(self) -> bool:
        return self.cert is not None and self.now() >= self.cert.not_after

    def needs_renewal(self) -> bool:
        return self.cert is not None and self.now() >= self.cert.renew_at(self.renew_fraction)

    async def ensure_usable(self) -> None:
        """Make sure there is a certificate the control plane will accept now: enrol when
        there is none, re-authenticate when it has expired. Raises `TransportError` (retry
        later), `EnrolmentRefused`, `ReenrolRequired`, `Revoked`."""
        lock, _ = self._events()
        async with lock:
            if self.problem is not None:
                raise ReenrolRequired(self.problem)
            if not self.enrolled:
                await self._enrol(self._key)
            elif self.expired():
                try:
                    await self._reauth()
                except ReenrolRequired as exc:
                    if self._token is None:
                        self.problem = str(exc)
                        raise
                    log.warning("%s; enrolling again with the --token given", exc)
                    await self._enrol(None)

    async def _enrol(self, key: ec.EllipticCurvePrivateKey | None) -> None:
        """Enrol with the token; ``key`` None makes a fresh key (re-enrolment)."""
        if self._token is None:
            raise ConfigError("not enrolled and no --token given")
        fresh = key is None
        new_key = ec.generate_private_key(ec.SECP256R1()) if key is None else key
        body = {"token": self._token.get_secret_value(),
                "csr": pki.make_csr(new_key).decode()}
        log.info("enrolling with the control plane at %s", self.cloud)
        try:
            if self.tpm is not None:  # the TPM vouches for the TLS key (edge/tpm_node.py)
                answer = await tpm_enrol(self.request, self.tpm, body["token"],
                                         body["csr"].encode())
            else:
                answer = await self.request("POST", "/v1/device/enrol", body, client_cert=False)
        except CloudRefusal as exc:
            if exc.status in (400, 401, 403, 404, 409, 410):
                raise EnrolmentRefused(
                    f"the control plane refused the enrolment token ({exc.status}: "
                    f"{exc.reason}); ask an operator for a new one "
                    "(`edgewise cloud token create`)"
                ) from None
            raise
        node_id, trust_domain = answer.get("node_id"), answer.get("trust_domain")
        if not isinstance(node_id, str) or not isinstance(trust_domain, str):
            raise PeerError("the enrolment answer lacks node_id or trust_domain")
        pki.validate_node_id(node_id)
        pki.validate_trust_domain(trust_domain)
        cert = self._accept_cert(answer, new_key, node_id, trust_domain)
        if fresh:
            self.files.save_key(new_key)
            self._key = new_key
        self.node_id, self.trust_domain, self.problem = node_id, trust_domain, None
        self.files.write_node_id(node_id)
        self.files.write_cloud(self.cloud, self.trust_domain)
        self.files.write_tuf_root(answer.get("tuf_root"))
        self._store_cert(cert)
        self._token = None  # single use: never sent again by this process
        log.info("enrolled as node %s; certificate valid until %s", node_id,
                 self.cert.not_after.isoformat() if self.cert else "?")

    async def _bound(self, body: dict[str, Any]) -> dict[str, Any]:
        """With a TPM, the TPM node key's signature over the CSR (the control plane wants it)."""
        if self.tpm is not None:
            body["binding"] = await tpm_binding(self.tpm, body["csr"].encode())
        return body

    async def renew(self) -> None:
        """Renew over mutual TLS with a CSR of the same key. Raises like `request`, and
        `Revoked` on 403."""
        assert self._key is not None and self.node_id and self.trust_domain
        lock, _ = self._events()
        async with lock:
            body = await self._bound({"csr": pki.make_csr(self._key).decode()})
            try:
                answer = await self.request("POST", "/v1/device/renew", body)
            except CloudRefusal as exc:
                if exc.status == 403:
                    raise Revoked.of(exc) from None
                raise
            self._store_cert(self._accept_cert(answer, self._key, self.node_id,
                                               self.trust_domain))
            self.renewals += 1
            log.info("certificate renewed; valid until %s",
                     self.cert.not_after.isoformat() if self.cert else "?")

    async def _reauth(self) -> None:
        assert self._key is not None and self.node_id and self.trust_domain
        log.warning("certificate of node %s expired at %s; re-authenticating with the node key",
                    self.node_id, self.cert.not_after.isoformat() if self.cert else "?")
        try:
            challenge = await self.request(
                "POST", "/v1/device/reauth/challenge", {"node_id": self.node_id},
                client_cert=False,
            )
            try:
                nonce = base64.b64decode(str(challenge.get("nonce", "")), validate=True)
            except ValueError:
                raise PeerError("the re-authentication nonce is not base64") from None
            body = await self._bound({
                "node_id": self.node_id,
                "nonce": base64.b64encode(nonce).decode(),
                "signature": base64.b64encode(pki.sign_challenge(self._key, nonce)).decode(),
                "certificate": self.cert_path.read_text(),
                "csr": pki.make_csr(self._key).decode(),
            })
            answer = await self.request("POST", "/v1/device/reauth", body, client_cert=False)
        except CloudRefusal as exc:
            if exc.status == 403:
                raise Revoked.of(exc) from None
            if exc.status in (400, 401, 404, 410):
                raise ReenrolRequired(
                    f"node {self.node_id} cannot re-authenticate ({exc.status}: {exc.reason}). "
                    "Its certificate expired longer ago than the grace period allows: enrol "
                    "it again with a new token (`edgewise cloud token create`, then "
                    "`edgewise agent run ... --token NEW`)"
                ) from None
            raise
        self._store_cert(self._accept_cert(answer, self._key, self.node_id, self.trust_domain))
        self.reauths += 1
        log.info("re-authenticated; certificate valid until %s",
                 self.cert.not_after.isoformat() if self.cert else "?")

    async def wait_changed(self) -> None:
        """Wait until the certificate changes (enrolment, renewal, re-authentication)."""
        _, changed = self._events()
        changed.clear()
        await changed.wait()

    async def renewal_loop(
        self,
        backoff: Callable[[int], float],
        *,
        min_interval: float = 60.0,
        max_sleep: float = 3600.0,
    ) -> None:
        """Renew at 2/3 of the lifetime, re-authenticate after an expiry, forever.

        ``backoff(attempt)`` gives the delay after a failed attempt. Returns only when an
        operator must act (`ReenrolRequired`: logged, ``problem`` set); raises `Revoked`.
        """
        failures = 0
        while True:
            if not self.enrolled:
                await self.wait_changed()
                continue
            assert self.cert is not None
            now = self.now()
            due = self.cert.renew_at(self.renew_fraction)
            if now < due:
                await self._sleep_or_change(min((due - now).total_seconds(), max_sleep))
                continue
            try:
                if self.expired():
                    await self.ensure_usable()
                else:
                    await self.renew()
            except ReenrolRequired:
                return  # ``problem`` is set; the uplink logs it and status shows it
            except (TransportError, PeerError, ConfigError) as exc:
                failures += 1
                delay = max(backoff(failures), getattr(exc, "retry_after", None) or 0.0)
                log.warning("certificate renewal failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            if failures:  # the failures were WARNINGs: so is their end
                log.warning("certificate renewal succeeded after %d failed attempt(s)", failures)
            failures = 0
            if self.needs_renewal():  # a very short-lived certificate: do not spin
                await asyncio.sleep(min_interval)

    async def _sleep_or_change(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wait_changed(), timeout=max(seconds, 0.0))
        except TimeoutError:
            pass

