"""The node's identity on disk: the files in ``DATA/identity/``, their modes, reading and writing.

Files in ``DATA/identity/`` (directory mode 0700):

    node.key      P-256 private key, made here and never sent anywhere (mode 0600)
    node.pem      the node certificate the control plane signed (SAN spiffe://<td>/node/<id>)
    ca.pem        the control plane's CA, the only trust anchor for the server
    node_id       the node id, one line
    cloud.json    the control plane URL and trust domain, so later runs need neither flag

Every file is replaced whole with `edgewise.common.files.write_atomic` (the key through
`edgewise.security.pki.save_key`, which uses it too), so a crash leaves the old file or the new
one. `IdentityFiles` knows the paths and does the reading and writing; what the files mean and
when they change is `edgewise.edge.identity.NodeIdentity`'s business. `CertInfo` is what status
and the renewal loop need to know about the current certificate.

A file that is there but does not parse (empty, garbage, cut short) is a
`edgewise.edge.damaged.DamagedFile` naming it and the fix; `damaged` lists them without changing
anything (for `edgewise agent status`). node.pem is the authority on who the node is: its SAN
names the node id and the trust domain (`identity_of`), so ``node_id`` can be written again
from it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgewise.common.files import write_atomic
from edgewise.edge.damaged import DamagedFile, reason
from edgewise.errors import ConfigError, EdgewiseError, PeerError, StorageError
from edgewise.security import pki
from edgewise.security.pki.certs import uri_sans

log = logging.getLogger(__name__)

IDENTITY_DIR = "identity"  # under the agent's data directory
KEY_FILE, CERT_FILE, CA_FILE, NODE_ID_FILE, CLOUD_FILE = (
    "node.key", "node.pem", "ca.pem", "node_id", "cloud.json",
)
TUF_ROOT_FILE = "tuf-root.json"  # the TUF root from enrolment (the trust anchor of releases)
MAX_TUF_ROOT = 512_000  # bytes, as tuf.ngclient bounds a root


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
        pem = (Path(data_dir) / IDENTITY_DIR / CERT_FILE).read_bytes()
        return CertInfo.of(x509.load_pem_x509_certificate(pem))
    except (OSError, ValueError):
        return None


def identity_of(cert: x509.Certificate) -> tuple[str, str]:
    """``(trust_domain, node_id)`` named by a node certificate's one SAN URI
    ``spiffe://<trust-domain>/node/<node-id>``; `PeerError` if it names no node."""
    uris = uri_sans(cert)
    rest = uris[0].removeprefix("spiffe://") if len(uris) == 1 else ""
    trust_domain, sep, _ = rest.partition("/node/")
    try:
        pki.validate_trust_domain(trust_domain)
    except ConfigError:
        raise pki.IdentityError("the certificate names no node of a trust domain") from None
    if not sep:
        raise pki.IdentityError("the certificate names no node of a trust domain")
    return trust_domain, pki.node_id_from_cert(cert, trust_domain)


def expires_in(info: CertInfo | None, now: datetime | None = None) -> timedelta | None:
    if info is None:
        return None
    return info.not_after - (now or datetime.now(UTC))


class IdentityFiles:
    """The files of one node identity, in ``DATA/identity/``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir) / IDENTITY_DIR

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
    def node_id_path(self) -> Path:
        return self.dir / NODE_ID_FILE

    @property
    def cloud_path(self) -> Path:
        return self.dir / CLOUD_FILE

    @property
    def tuf_root_path(self) -> Path:
        return self.dir / TUF_ROOT_FILE

    def write_tuf_root(self, root: object) -> None:
        """Keep the TUF root of the enrolment answer (text; nothing when the control plane
        has none yet). Its signatures are checked when it is used (`ReleaseFetcher`)."""
        if root is None:
            return
        if not isinstance(root, str) or not 0 < len(root) <= MAX_TUF_ROOT:
            raise PeerError(f"the enrolment answer's tuf_root is not text of at most "
                            f"{MAX_TUF_ROOT} characters")
        write_atomic(self.tuf_root_path, root.encode(), mode=0o644)

    def make_dir(self) -> None:
        """Create the directory (mode 0700) if it is missing."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.dir}: {exc.strerror or exc}") from exc

    # -- cloud.json -------------------------------------------------------------------------
    def read_cloud(self) -> dict[str, Any]:
        """What ``cloud.json`` holds (``cloud``, ``trust_domain``); empty when there is none.
        Raises `DamagedFile` when it does not hold them."""
        try:
            data = self.cloud_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StorageError(f"cannot read {self.cloud_path}: {exc.strerror or exc}") from exc
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or not isinstance(body.get("cloud"), str):
                raise ValueError("no control plane URL in it")
            trust_domain = body.get("trust_domain")
            if trust_domain is not None:
                pki.validate_trust_domain(trust_domain)
        except (ValueError, ConfigError) as exc:
            raise DamagedFile(self.cloud_path, reason(exc, data),
                              "pass --cloud https://HOST:PORT to write it again") from None
        return body

    def write_cloud(self, cloud: str, trust_domain: str | None) -> None:
        body = {"cloud": cloud, "trust_domain": trust_domain}
        write_atomic(self.cloud_path, json.dumps(body).encode() + b"\n")

    # -- ca.pem -----------------------------------------------------------------------------
    def install_ca(self, given: Path) -> None:
        """Copy the CA certificate given with ``--ca`` to ``ca.pem`` (when it differs).

        Raises `ConfigError` when ``given`` is missing or not a readable PEM certificate.
        """
        try:
            ca_pem = given.read_bytes()
            x509.load_pem_x509_certificate(ca_pem)
        except FileNotFoundError:
            raise ConfigError(f"--ca {given}: no such file") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--ca {given}: not a readable PEM certificate ({exc})") from None
        if not self.ca_path.exists() or self.ca_path.read_bytes() != ca_pem:
            write_atomic(self.ca_path, ca_pem)

    def check_ca(self) -> None:
        """Raise `DamagedFile` unless ``ca.pem`` holds a certificate."""
        self._load_pem_cert(self.ca_path, "pass --ca CA.pem (the control plane's ca.pem, "
                                          "printed by `edgewise cloud serve`) to write it again")

    # -- node.key ---------------------------------------------------------------------------
    def load_or_make_key(self) -> ec.EllipticCurvePrivateKey:
        """The node key; made (mode 0600) on first start. `DamagedFile` if it is unreadable."""
        if self.key_path.exists():
            return self.load_key()
        key = pki.generate_key(self.key_path)
        log.info("made a new node key in %s", self.key_path)
        return key

    def load_key(self) -> ec.EllipticCurvePrivateKey:
        try:
            return pki.load_key(self.key_path)
        except StorageError as exc:
            if isinstance(exc.__cause__, OSError):
                raise
            data = _peek(self.key_path)
            raise DamagedFile(self.key_path, reason(None, data) if data is not None
                              and not data.strip() else "not a P-256 private key in PEM",
                              "restore it from a backup, or enrol the node again as a new "
                              "node: `edgewise agent run --data DIR --token NEW`") from None

    def save_key(self, key: ec.EllipticCurvePrivateKey) -> None:
        """Replace the node key (re-enrolment with a fresh key)."""
        pki.save_key(self.key_path, key)

    # -- node.pem and node_id ---------------------------------------------------------------
    def enrolled(self) -> bool:
        """A certificate is on disk (it names the node id)."""
        return self.cert_path.exists()

    def load_cert(self) -> x509.Certificate:
        """The node certificate; `DamagedFile` unless it holds one that names a node."""
        fix = ("restore it from a backup, or enrol the node again as a new node: "
               "`edgewise agent run --data DIR --token NEW`")
        cert = self._load_pem_cert(self.cert_path, fix)
        try:
            identity_of(cert)
        except EdgewiseError as exc:
            raise DamagedFile(self.cert_path, reason(exc), fix) from None
        return cert

    def write_cert(self, cert: x509.Certificate) -> None:
        write_atomic(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def read_node_id(self) -> str:
        """The node id in ``node_id``; `DamagedFile` if it does not hold one (the caller
        writes it again from node.pem)."""
        try:
            data = self.node_id_path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {self.node_id_path}: {exc.strerror or exc}") from exc
        try:
            return pki.validate_node_id(data.decode().strip())
        except (ValueError, ConfigError) as exc:
            raise DamagedFile(self.node_id_path, reason(exc, data),
                              f"the agent writes it again from {self.cert_path} when it starts"
                              ) from None

    def write_node_id(self, node_id: str) -> None:
        write_atomic(self.node_id_path, node_id.encode() + b"\n")

    # -- checks -----------------------------------------------------------------------------
    def _load_pem_cert(self, path: Path, fix: str) -> x509.Certificate:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            why = reason(exc, data) if not data.strip() else "not a PEM certificate"
            raise DamagedFile(path, why, fix) from None

    def damaged(self) -> list[DamagedFile]:
        """The files here that are present but damaged; reads only (for `agent status`)."""
        out: list[DamagedFile] = []
        cert: x509.Certificate | None = None
        checks: list[tuple[Path, Any]] = [
            (self.cloud_path, self.read_cloud), (self.ca_path, self.check_ca),
            (self.key_path, self.load_key), (self.cert_path, self.load_cert),
        ]
        for path, check in checks:
            if not path.exists():
                continue
            try:
                got = check()
            except DamagedFile as exc:
                out.append(exc)
            except StorageError:
                pass  # cannot be read by this user: not known to be damaged
            else:
                cert = got if path == self.cert_path else cert
        if cert is not None and self.node_id_path.exists():
            try:
                node_id = self.read_node_id()
                named = identity_of(cert)[1]
                if node_id != named:
                    raise DamagedFile(self.node_id_path, f"{node_id!r}, node.pem names {named}",
                                      f"the agent writes it again from {self.cert_path} when "
                                      "it starts")
            except DamagedFile as exc:
                out.append(exc)
            except StorageError:
                pass
        return out


def _peek(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
