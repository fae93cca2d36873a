"""The node's identity: its key, its short-lived certificate, and the HTTPS calls that keep it.

Files in ``DATA/identity/`` (directory mode 0700):

    node.key      P-256 private key, made here and never sent anywhere (mode 0600)
    node.pem      the node certificate the control plane signed (SAN spiffe://<td>/node/<id>)
    ca.pem        the control plane's CA, the only trust anchor for the server
    node_id       the node id, one line
    cloud.json    the control plane URL and trust domain, so later runs need neither flag

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
    PeerError ──── CloudRefusal         the control plane answered 4xx/5xx (``status``, ``reason``)
    EdgewiseError ┬ Revoked             the control plane revoked this node: stop
                  └ ReenrolRequired     the certificate is past the grace period: new token
    TransportError                      the control plane could not be reached
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from edgewise.errors import ConfigError, EdgewiseError, PeerError, StorageError, TransportError
from edgewise.security import pki, tls

log = logging.getLogger(__name__)

KEY_FILE, CERT_FILE, CA_FILE, NODE_ID_FILE, CLOUD_FILE = (
    "node.key", "node.pem", "ca.pem", "node_id", "cloud.json",
)
MAX_ANSWER_BYTES = 4 * 1024 * 1024
REQUEST_TIMEOUT_S = 15.0


class EnrolmentRefused(ConfigError):
    """The control plane refused the enrolment token."""


class CloudRefusal(PeerError):
    """The control plane answered a device request with an error status."""

    def __init__(self, method: str, path: str, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{method} {path}: the control plane answered {status}: {reason}")


class Revoked(EdgewiseError):
    """The control plane revoked this node's certificate or key; the agent must stop."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"this node has been revoked by the control plane ({reason}). The agent stops; "
            "an operator must enrol it again with a new token before it can reconnect"
        )


class ReenrolRequired(EdgewiseError):
    """The certificate expired longer ago than the control plane's grace period."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def check_cloud_url(url: str) -> str:
    """``https://HOST:PORT`` (no path): the only form the device API accepts."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            f"--cloud {url!r}: use https://HOST:PORT (the device API is TLS only)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"--cloud {url!r}: give only https://HOST:PORT, without a path")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"--cloud {url!r}: {exc}") from None
    return f"https://{parts.netloc}"


def describe_network_error(exc: BaseException) -> str:
    """One stable line for a network failure (no object addresses, so repeats compare equal)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        why = os_error.strerror or str(os_error) or type(os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {why}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _reason(data: bytes) -> str:
    """The error text of a control-plane answer (JSON ``error``/``detail``/``reason`` or text)."""
    text = data[:2000].decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300] or "(no reason given)"
    if isinstance(body, dict):
        for k in ("error", "detail", "reason", "message"):
            if isinstance(body.get(k), str):
                return body[k][:300]
    return text[:300]


@dataclass
class CertInfo:
    """What status and the renewal loop need to know about the current certificate."""

    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        return cls(cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc,
                   pki.public_key_fingerprint(cert))

    def renew_at(self, fraction: float = pki.RENEW_FRACTION) -> datetime:
        return self.not_before + (self.not_after - self.not_before) * fraction

    def to_json(self, fraction: float = pki.RENEW_FRACTION) -> dict[str, Any]:
        return {
            "serial": f"{self.serial:x}",
            "not_before": self.not_before.isoformat(),
            "expires_at": self.not_after.isoformat(),
            "renew_at": self.renew_at(fraction).isoformat(),
        }


def read_cert_info(data_dir: str | os.PathLike[str]) -> CertInfo | None:
    """The certificate in ``DATA/identity/node.pem``, or None (for `edgewise agent status`)."""
    try:
        pem = (Path(data_dir) / "identity" / CERT_FILE).read_bytes()
        return CertInfo.of(x509.load_pem_x509_certificate(pem))
    except (OSError, ValueError):
        return None


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
        self.dir = Path(data_dir) / "identity"
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

    # -- paths ------------------------------------------------------------------------------
    @property
    def key_path(self) -> Path:
        return self.dir / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.dir / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.dir / CA_FILE

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

        Creates the key on first start. Does not contact the control plane.
        """
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror or exc}") from exc
        saved = self._read_cloud_file()
        self.cloud = self._cloud_flag or saved.get("cloud", "")
        if not self.cloud:
            raise ConfigError(
                f"{self.dir.parent} has no control plane yet: pass --cloud https://HOST:PORT"
            )
        self.trust_domain = saved.get("trust_domain")
        if self._ca_flag is not None:
            try:
                ca_pem = self._ca_flag.read_bytes()
                x509.load_pem_x509_certificate(ca_pem)
            except FileNotFoundError:
                raise ConfigError(f"--ca {self._ca_flag}: no such file") from None
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"--ca {self._ca_flag}: not a readable PEM certificate ({exc})"
                ) from None
            if not self.ca_path.exists() or self.ca_path.read_bytes() != ca_pem:
                pki.write_atomic(self.ca_path, ca_pem)
        elif not self.ca_path.exists():
            raise ConfigError(
                f"no CA certificate in {self.dir}: pass --ca CA.pem (the control plane's "
                "ca.pem, printed by `edgewise cloud serve`)"
            )
        if self.key_path.exists():
            self._key = pki.load_key(self.key_path)
        else:
            self._key = pki.generate_key(self.key_path)
            log.info("made a new node key in %s", self.key_path)
        node_id_file = self.dir / NODE_ID_FILE
        if self.cert_path.exists() and node_id_file.exists():
            cert = self._load_cert_file()
            self.node_id = node_id_file.read_text().strip()
            if pki.public_key_fingerprint(cert) != pki.public_key_fingerprint(self._key):
                raise ConfigError(
                    f"{self.cert_path} does not belong to {self.key_path}; remove "
                    f"{self.dir} and enrol again with --token"
                )
            self.cert = CertInfo.of(cert)
            if self._token is not None:
                log.info("already enrolled as node %s; --token is not needed", self.node_id)
        elif self._token is None:
            raise ConfigError(
                f"{self.dir.parent} is not enrolled yet: pass --token with an enrolment token "
                "(make one with `edgewise cloud token create`)"
            )
        if self._cloud_flag and self._cloud_flag != saved.get("cloud"):
            self._write_cloud_file()

    def _load_cert_file(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except ValueError as exc:
            raise StorageError(f"{self.cert_path} is not a readable certificate") from exc

    def _read_cloud_file(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / CLOUD_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StorageError(f"{self.dir / CLOUD_FILE} is unreadable: {exc}") from exc
        return data if isinstance(data, dict) else {}

    def _write_cloud_file(self) -> None:
        body = {"cloud": self.cloud, "trust_domain": self.trust_domain}
        pki.write_atomic(self.dir / CLOUD_FILE, json.dumps(body).encode() + b"\n")

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
        ctx = self.ssl_context(client_cert)
        url = self.cloud + path
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session, session.request(method, url, json=body, ssl=ctx) as resp:
                data = await resp.content.read(MAX_ANSWER_BYTES + 1)
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ConfigError(
                f"the control plane at {self.cloud} presented a certificate that does not "
                f"verify against {self.ca_path} ({exc.certificate_error}); check --cloud and --ca"
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{method} {path}: {describe_network_error(exc)}") from None
        if len(data) > MAX_ANSWER_BYTES:
            raise PeerError(f"{method} {path}: answer larger than {MAX_ANSWER_BYTES} bytes")
        if status >= 400:
            raise CloudRefusal(method, path, status, _reason(data))
        try:
            answer = json.loads(data)
        except ValueError:
            raise PeerError(f"{method} {path}: the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise PeerError(f"{method} {path}: the answer is not a JSON object")
        return answer

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
        from cryptography.hazmat.primitives import serialization

        pki.write_atomic(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
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
            pki.save_key(self.key_path, new_key)
            self._key = new_key
        self.node_id, self.trust_domain, self.problem = node_id, trust_domain, None
        pki.write_atomic(self.dir / NODE_ID_FILE, node_id.encode() + b"\n")
        self._write_cloud_file()
        self._store_cert(cert)
        self._token = None  # single use: never sent again by this process
        log.info("enrolled as node %s; certificate valid until %s", node_id,
                 self.cert.not_after.isoformat() if self.cert else "?")

    async def renew(self) -> None:
        """Renew over mutual TLS with a CSR of the same key. Raises like `request`, and
        `Revoked` on 403."""
        assert self._key is not None and self.node_id and self.trust_domain
        lock, _ = self._events()
        async with lock:
            body = {"csr": pki.make_csr(self._key).decode()}
            try:
                answer = await self.request("POST", "/v1/device/renew", body)
            except CloudRefusal as exc:
                if exc.status == 403:
                    raise Revoked(exc.reason) from None
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
            body = {
                "node_id": self.node_id,
                "nonce": base64.b64encode(nonce).decode(),
                "signature": base64.b64encode(pki.sign_challenge(self._key, nonce)).decode(),
                "certificate": self.cert_path.read_text(),
                "csr": pki.make_csr(self._key).decode(),
            }
            answer = await self.request("POST", "/v1/device/reauth", body, client_cert=False)
        except CloudRefusal as exc:
            if exc.status == 403:
                raise Revoked(exc.reason) from None
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
                delay = backoff(failures)
                log.warning("certificate renewal failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if self.needs_renewal():  # a very short-lived certificate: do not spin
                await asyncio.sleep(min_interval)

    async def _sleep_or_change(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.wait_changed(), timeout=max(seconds, 0.0))
        except TimeoutError:
            pass


def expires_in(info: CertInfo | None, now: datetime | None = None) -> timedelta | None:
    if info is None:
        return None
    return info.not_after - (now or _utcnow())
