"""First start (and every start) of a control plane: CA, server certificate, admin token.

In ``DIR/pki``: ``ca.pem`` / ``ca.key`` (made once with `CertificateAuthority.create`; later
starts load it and refuse a different trust domain), and ``server.pem`` / ``server.key`` for
``localhost``, ``127.0.0.1``, the ``--host`` address and any extra names, reissued when a
name is missing or less than 30 days are left.

When the store has no operator token yet, an ``admin`` token is made. Its plaintext is written
to ``DIR/cli.json`` (mode 0600) as ``{url, token, ca}``, the file the operator CLI reads,
*before* the token is stored and before the server binds its port, so a first start that
cannot listen does not lose it; the plaintext is also returned once (the CLI prints it). Later
starts only refresh the URL in that file. `replace_admin_token` is the offline recovery
(``edgewise cloud admin-token``): it revokes the admin token(s) and makes a new one.

`prepare_data_dir` makes ``DIR`` with mode 0700 (and tightens an existing one) before anything
else writes there; the store creates its SQLite files 0600.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from edgewise.cloud.server_tls import SERVER_CERT, SERVER_KEY, ServerTls, server_chain_extra
from edgewise.cloud.server_tls import prepare as prepare_tls
from edgewise.cloud.store import Store
from edgewise.errors import ConfigError, StorageError
from edgewise.security.pki import CA_CERT_FILE, CertificateAuthority, save_key, write_atomic
from edgewise.security.tokens import OperatorToken, Role

CLI_CONFIG = "cli.json"
RENEW_SERVER_BEFORE = timedelta(days=30)
ADMIN_TOKEN_NAME = "admin"


@dataclass(frozen=True)
class Bootstrap:
    ca: CertificateAuthority
    ca_path: Path  # what clients verify the server with (cli.json's ca; agents' --ca)
    server_cert: Path
    admin_token: str | None  # plaintext, only on the start that made it
    cli_config: Path
    created: tuple[str, ...]  # what this start made, for the log


def _split_names(names: list[str]) -> tuple[set[str], set[str]]:
    dns, ips = set(), set()
    for n in names:
        try:
            ip = ipaddress.ip_address(n)
        except ValueError:
            dns.add(n)
        else:
            if not ip.is_unspecified:
                ips.add(str(ip))
    return dns, ips


def _covers(path: Path, dns: set[str], ips: set[str], now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - now < RENEW_SERVER_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    return dns <= have_dns and ips <= have_ips


def server_url(host: str, port: int) -> str:
    h = host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if ip.is_unspecified:
            h = "127.0.0.1"
        elif ip.version == 6:
            h = f"[{host}]"
    return f"https://{h}:{port}"


def load_or_create_ca(pki: Path, trust_domain: str) -> tuple[CertificateAuthority, bool]:
    if (pki / CA_CERT_FILE).exists():
        ca = CertificateAuthority.load(pki)
        if ca.trust_domain != trust_domain:
            raise ConfigError(
                f"the CA in {pki} is for trust domain {ca.trust_domain!r}, not {trust_domain!r}; "
                "pass --trust-domain " + ca.trust_domain + " or use another --data directory"
            )
        return ca, False
    return CertificateAuthority.create(pki, trust_domain), True


def ensure_server_cert(ca: CertificateAuthority, pki: Path, host: str,
                       extra_names: tuple[str, ...] = (), *, now: datetime | None = None
                       ) -> bool:
    """Make sure ``pki/server.pem`` covers the names; True if a new one was issued."""
    t = now or datetime.now(UTC)
    dns, ips = _split_names(["localhost", "127.0.0.1", host, *extra_names])
    if _covers(pki / SERVER_CERT, dns, ips, t):
        return False
    key, issued = ca.issue_server_cert(sorted(dns), sorted(ips), now=t)
    save_key(pki / SERVER_KEY, key)
    write_atomic(pki / SERVER_CERT, issued.pem + server_chain_extra(ca), mode=0o644)
    return True


def write_cli_config(path: Path, url: str, ca_path: Path, token: str | None = None) -> None:
    """Write ``{url, token, ca}`` (mode 0600); without ``token`` keep the one in the file."""
    if token is None:
        try:
            token = json.loads(path.read_text()).get("token")
        except (OSError, ValueError, AttributeError):
            return  # no file to refresh: the admin token was shown once, at the first start
        if not isinstance(token, str):
            return
    body = {"url": url, "token": token, "ca": str(ca_path.resolve())}
    write_atomic(path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)
    os.chmod(path, 0o600)


def prepare_data_dir(data_dir: Path) -> None:
    """Make ``data_dir`` (mode 0700) or tighten it to 0700; the first thing a start does."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if data_dir.stat().st_mode & 0o077:
            os.chmod(data_dir, 0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {data_dir}: {exc.strerror or exc}") from None


def save_cli_config(path: Path, url: str, ca_path: Path, token: str) -> None:
    try:
        write_cli_config(path, url, ca_path, token)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def cli_config_url(path: Path, default: str) -> str:
    """The URL in an existing ``cli.json``, or ``default``."""
    try:
        url = json.loads(path.read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return default
    return url if isinstance(url, str) and url else default


async def bootstrap(data_dir: Path, store: Store, *, host: str, trust_domain: str,
                    extra_names: tuple[str, ...] = (), url: str | None = None,
                    tls: ServerTls | None = None) -> Bootstrap:
    """Everything `edgewise cloud serve` needs on disk and in the store before it listens.

    ``url`` goes into a new ``cli.json`` (default ``https://<host>:8443``); the CLI refreshes
    it once the port is bound. ``tls``: the organisation's own PKI (`server_tls`); with
    ``--tls-cert`` no server certificate is issued here.
    """
    prepare_data_dir(data_dir)
    pki = data_dir / "pki"
    created: list[str] = []
    ca, new_ca = load_or_create_ca(pki, trust_domain)
    if new_ca:
        created.append(f"CA for trust domain {trust_domain}: {pki / CA_CERT_FILE}")
    tls = tls or ServerTls()
    trust = prepare_tls(tls, ca, pki)  # refuses a --client-ca the enrolment CA is not under
    if tls.own_server_cert and ensure_server_cert(ca, pki, host, extra_names):
        created.append(f"server certificate: {pki / SERVER_CERT}")
    admin: str | None = None
    if not await store.list_operator_tokens():
        plaintext, record = OperatorToken.issue(ADMIN_TOKEN_NAME, Role.ADMIN)
        admin = plaintext.get_secret_value()
        # saved before it is stored: a token in the store is never one nobody has
        save_cli_config(data_dir / CLI_CONFIG, url or server_url(host, 8443), trust, admin)
        await store.add_operator_token(record, actor="bootstrap")
        created.append("admin operator token")
    return Bootstrap(ca, trust, tls.cert or pki / SERVER_CERT, admin, data_dir / CLI_CONFIG,
                     tuple(created))


async def replace_admin_token(store: Store, *, actor: str = "cli") -> tuple[str, int]:
    """Revoke the admin token(s) and make a new one (one transaction, audited): its plaintext
    (show it once, then `save_cli_config` it) and how many tokens were revoked."""
    plaintext, record = OperatorToken.issue(ADMIN_TOKEN_NAME, Role.ADMIN)
    revoked = await store.replace_operator_tokens(
        record, actor=actor, reason="offline recovery: edgewise cloud admin-token")
    return plaintext.get_secret_value(), revoked
