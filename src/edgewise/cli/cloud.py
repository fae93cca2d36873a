"""`edgewise cloud ...`: run the control plane, make enrolment tokens, recover the admin token.

* ``edgewise cloud serve --data DIR [--host 127.0.0.1] [--port 8443] [--db URL]
  [--trust-domain edgewise.local] [--name NAME ...] [--limit NAME=VALUE ...]`` runs one
  control-plane process until Ctrl-C / SIGTERM (``--processes N``: N processes on one port
  and one PostgreSQL database, `cloud_processes`). First start: CA, server certificate and an
  admin token (written to DIR/cli.json before the port is bound, and printed once).
  ``--limit`` sets `ServerLimits` (timeouts, the cap on unauthenticated connections, the
  per-node request rate).
* ``edgewise cloud admin-token --data DIR [--db URL] [--url URL]`` is the offline recovery of a
  lost admin token: access to DIR proves you run this control plane. It revokes the admin
  token(s), prints a new one once and writes it to DIR/cli.json; audited.
* ``edgewise cloud token create --labels site=plant1,line=1 [--ttl 1h] [--uses 1] --data DIR
  [--db URL]`` writes the token's hash straight into the store (the same SQLite file or
  PostgreSQL database the server uses; safe while it runs) and prints the plaintext once.
* ``edgewise cloud keys init ROOT_DIR --data DIR [--root-keys N] [--threshold K]`` makes the
  TUF root key(s) in ROOT_DIR (to be kept offline) and the online keys in DIR/tuf/keys, and
  writes root version 1 into the store; ``edgewise cloud keys rotate ROOT_DIR --data DIR
  [--keep-online] [--new-root]`` signs the next root version (docs/updates.md, "Key ceremony").
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path

import click

from edgewise.cli.cloud_pipeline import pipeline
from edgewise.cli.common import CLOUD_DATA, fail, need_extra
from edgewise.cli.logs import log_format_option
from edgewise.cli.output import Output, output_options
from edgewise.errors import ConfigError, EdgewiseError

_TTL = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d`` (or combined, ``1h30m``)."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    for m in _TTL.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s or total <= 0:
        raise ConfigError(f"--ttl {text!r}: use a positive duration like 90s, 30m, 1h or 2d")
    return timedelta(seconds=total)


def parse_labels(text: str | None) -> dict[str, str]:
    from edgewise.security.tokens import validate_labels

    labels: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--labels: {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return validate_labels(labels)


@click.group()
def cloud() -> None:
    """Run and administer the control plane."""
    need_extra("cloud", "edgewise cloud")


@cloud.command()
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=CLOUD_DATA, show_default=True,
              help="State directory: pki/, the SQLite store, cli.json.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8443, show_default=True)
@click.option("--db", default=None, envvar="EDGEWISE_DB", show_envvar=True,
              help="Database URL (postgresql://...); default SQLite in --data. Prefer the "
              "environment variable for a URL with a password: flags show in the process list.")
@click.option("--trust-domain", default="edgewise.local", show_default=True)
@click.option("--name", "names", multiple=True,
              help="Extra DNS name or IP for the server certificate (repeatable).")
@click.option("--data-out", "data_out", type=click.Path(dir_okay=False), default=None,
              help="YAML file with forwarders (MQTT, NATS JetStream) and retention; see "
              "docs/operations.md.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Present this certificate chain (PEM, leaf first) instead of the one the "
              "control plane issues itself; with --tls-key. Agents need its CA as --ca.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The private key of --tls-cert (PEM, unencrypted).")
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The CA certificate(s) that verify --tls-cert, written to cli.json for the "
              "operator CLI (default: the root at the end of --tls-cert).")
@click.option("--client-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Verify node certificates against these CA certificates instead of the "
              "enrolment CA alone; the enrolment CA (DIR/pki/ca.pem), which still issues "
              "node certificates, must be one of them or issued by one (docs/security.md).")
@click.option("--limit", "limits", multiple=True, metavar="NAME=VALUE",
              help="Connection and request limits (repeatable): handshake_timeout, "
              "read_timeout, idle_timeout (s), max_unauthenticated, device_rate (/s), "
              "device_burst, handshake_rate (/s), handshake_burst, handshake_queue, "
              "queue_wait (s), backlog, enrol_rate (/s), enrol_burst, enrol_queue, "
              "push_fetch_rate (/s), push_max_jitter (s), store_wait (s), pipeline_lease (s); see "
              "docs/control-plane.md.")
@click.option("--require-attestation", is_flag=True,
              help="Enrol only nodes with a TPM; a node without one is refused at enrolment "
              "and quarantined when it asks to attest (docs/security.md).")
@click.option("--allow-agent-digest", "agent_digests", multiple=True, metavar="SHA256",
              help="An agent code digest TPM nodes may run (repeatable; a TPM node logs its "
              "own at start: 'measured launch: agent ...'). Releases are allowed once "
              "published.")
@click.option("--tpm-manufacturer-ca", "tpm_cas", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A TPM manufacturer's CA certificate (PEM, repeatable): TPM nodes must then "
              "present an EK certificate it issued.")
@click.option("--require-attestation-for", "require_for", multiple=True, metavar="SELECTOR",
              help="Nodes whose labels match (e.g. site=plant1; repeatable) must attest: one "
              "without a TPM is refused at enrolment (its token's labels) and quarantined when "
              "its session starts (docs/security.md).")
@click.option("--firmware-pcrs", default=None, metavar="0-7",
              help="Quote the firmware's measured-boot PCRs too (e.g. 0-7 or 0,2,7).")
@click.option("--golden-firmware", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="JSON list of allowed firmware PCR sets "
              '[{"0": "<sha256 hex>", ...}]: other values are quarantined.')
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Serving processes sharing --port (SO_REUSEPORT) and the database; more "
              "than 1 needs PostgreSQL (--db) and a fixed --port (docs/control-plane.md, "
              "\"Several processes\").")
@log_format_option
def serve(data_dir: Path, host: str, port: int, db: str | None, trust_domain: str,
          names: tuple[str, ...], data_out: str | None, tls_cert: Path | None,
          tls_key: Path | None, tls_ca: Path | None, client_ca: Path | None,
          limits: tuple[str, ...], require_attestation: bool, agent_digests: tuple[str, ...],
          tpm_cas: tuple[Path, ...], require_for: tuple[str, ...], firmware_pcrs: str | None,
          golden_firmware: Path | None, processes: int) -> None:
    """Run the control plane (device API, sessions, ingest) until Ctrl-C.

    TLS: by default the control plane's own CA (DIR/pki/ca.pem) issues the server certificate
    and every node certificate. --tls-cert/--tls-key present an organisation's server
    certificate instead; --client-ca verifies node certificates against the organisation's CA
    (node certificates are still issued by the enrolment CA, which must chain to it)."""

    from edgewise.cloud.config import AttestationSettings, CloudConfig, ServerLimits
    from edgewise.cloud.server_tls import ServerTls

    try:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port {port} is not a TCP port")
        server = ServerLimits.parse(limits)
        out = None
        if data_out is not None:
            from edgewise.cloud.dataout.config import load_data_out

            out = load_data_out(data_out)
        from edgewise.cloud.attestation import settings as att

        firmware = att.pcr_list(firmware_pcrs)
        config = CloudConfig(data_dir=data_dir, host=host, port=port, db=db,
                             trust_domain=trust_domain, server_names=names, data_out=out,
                             server=server, tls=ServerTls(tls_cert, tls_key, tls_ca, client_ca),
                             attestation=AttestationSettings(
                                 require=require_attestation, agents=agent_digests,
                                 manufacturer_cas=tpm_cas,
                                 require_for=att.selectors(require_for),
                                 firmware_pcrs=firmware,
                                 golden_firmware=att.golden_sets(golden_firmware, firmware)))
        if processes == 1:
            config.db_url  # noqa: B018 - validates --db early
            from edgewise.common import eventloop  # asyncio: not imported for --help

            eventloop.run(_serve(config))
            return
        if not config.db_url.startswith("postgresql"):
            raise ConfigError(f"--processes {processes} needs PostgreSQL (--db postgresql://...): "
                              "SQLite takes one writing process")
        if port == 0:
            raise ConfigError(f"--processes {processes} needs a fixed --port: the processes "
                              "share it")
        from edgewise.cli.cloud_processes import serve_processes

        sys.exit(serve_processes(config, processes, _serve))
    except EdgewiseError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass


async def _serve(config: object, *, index: int | None = None) -> None:
    """Serve until SIGINT / SIGTERM. ``index``: one of `cloud serve --processes N`, whose
    supervisor has bootstrapped and said everything there is to say already."""

    from edgewise.cloud.app import start
    from edgewise.cloud.bootstrap import bootstrap, prepare_data_dir, server_url, write_cli_config
    from edgewise.cloud.config import CloudConfig
    from edgewise.cloud.store import Store
    from edgewise.common import eventloop
    from edgewise.common.collector import tune_for_server

    assert isinstance(config, CloudConfig)
    echo = lambda s: click.echo(s, err=True)  # noqa: E731 - progress goes to stderr
    prepare_data_dir(config.data_dir)  # 0700 before the store or anything else writes there
    async with Store(config.db_url, wait=config.server.store_wait) as store:
        boot = await bootstrap(config.data_dir, store, host=config.host,
                               trust_domain=config.trust_domain, extra_names=config.server_names,
                               url=server_url(config.host, config.port), tls=config.tls)
        for line in boot.created:  # none in a process of `--processes N` (bootstrapped)
            echo(f"created {line}")
        if boot.admin_token is not None:  # already saved: shown even if the port is taken
            click.echo(f"admin token (shown once): {boot.admin_token}")
            echo(f"saved with the URL and CA to {boot.cli_config} (mode 0600)")
        # a process holding thousands of sessions: fewer, cheaper collections (issue 11)
        tune_for_server()
        running = await start(config, boot.ca, store=store)
        try:
            url = server_url(config.host, running.port)
            if index is not None:
                echo(f"serving process {index} (pid {os.getpid()}) listening on {url}")
                await _until_stopped()
                return
            write_cli_config(boot.cli_config, url, boot.ca_path)  # the URL; keeps the token
            echo(f"CA certificate for agents (--ca): {boot.ca_path}")
            if config.tls.client_ca is not None:
                echo(f"node certificates: issued by {config.pki_dir / 'ca.pem'}, verified "
                     f"against {config.tls.client_ca}")
            echo(f"control plane listening on {url} (TLS 1.3; store: {store.describe()}; "
                 f"event loop: {eventloop.loop_factory()[0]})")
            await _until_stopped()
        finally:
            await running.stop()


async def _until_stopped() -> None:
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    click.echo("stopping", err=True)


@cloud.command("admin-token")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=CLOUD_DATA, show_default=True,
              help="The control plane's --data directory.")
@click.option("--db", default=None, envvar="EDGEWISE_DB", show_envvar=True,
              help="Database URL if the control plane uses one.")
@click.option("--url", default=None,
              help="URL for cli.json; default: the one already there, else "
              "https://127.0.0.1:8443.")
@output_options()
def admin_token(data_dir: Path, db: str | None, url: str | None, out: Output) -> None:
    """Replace a lost admin token (offline): revoke it, print a new one, save it to cli.json.

    Access to the --data directory proves you run this control plane; the server may be
    running. The change is in the audit log (token.replace).
    """
    import asyncio

    from edgewise.cloud.bootstrap import (
        CLI_CONFIG,
        cli_config_url,
        replace_admin_token,
        save_cli_config,
        server_url,
    )
    from edgewise.cloud.server_tls import client_trust
    from edgewise.cloud.store import DB_FILE, Store, database_url
    from edgewise.security.pki import CA_CERT_FILE

    cli_path, ca_path = data_dir / CLI_CONFIG, data_dir / "pki" / CA_CERT_FILE
    try:
        if not ca_path.exists() or (db is None and not (data_dir / DB_FILE).exists()):
            raise ConfigError(f"no control plane in {data_dir} ({ca_path.name} or {DB_FILE} "
                              "missing); pass the --data directory of `edgewise cloud serve`, "
                              "and --db URL if it uses one")

        async def replace() -> tuple[str, int]:
            async with Store(database_url(db, data_dir)) as store:
                return await replace_admin_token(store, actor="cli:admin-token")

        secret, revoked = asyncio.run(replace())
    except EdgewiseError as exc:
        fail(exc)
    if out.data:
        out.emit({"token": secret, "revoked": revoked, "cli_config": str(cli_path)})
    else:
        click.echo(f"admin token (shown once): {secret}")
        click.echo(f"revoked {revoked} earlier admin token(s)", err=True)
    try:
        save_cli_config(cli_path, url or cli_config_url(cli_path, server_url("127.0.0.1", 8443)),
                        client_trust(data_dir / "pki"), secret)
    except EdgewiseError as exc:
        fail(exc)
    click.echo(f"saved with the URL and CA to {cli_path} (mode 0600)", err=True)


@cloud.group()
def token() -> None:
    """Enrolment tokens."""


@token.command("create")
@click.option("--labels", default="", help="Labels the node gets, e.g. site=plant1,line=1.")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime (90s, 30m, 1h, 2d).")
@click.option("--uses", type=int, default=1, show_default=True,
              help="How many nodes may enrol with it.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=CLOUD_DATA, show_default=True,
              help="The control plane's --data directory.")
@click.option("--db", default=None, envvar="EDGEWISE_DB", show_envvar=True,
              help="Database URL if the control plane uses one.")
@output_options(times=True)
def token_create(labels: str, ttl: str, uses: int, data_dir: Path, db: str | None,
                 out: Output) -> None:
    """Make a one-time enrolment token (stored hashed; printed once)."""
    import asyncio

    from edgewise.cloud.store import DB_FILE, Store, database_url
    from edgewise.security.tokens import EnrolmentToken

    try:
        lifetime = parse_ttl(ttl)
        parsed = parse_labels(labels)
        if db is None and not (data_dir / DB_FILE).exists():
            raise ConfigError(f"no control plane store in {data_dir} ({DB_FILE} missing); pass "
                              "the --data directory of `edgewise cloud serve`, or --db URL")
        plaintext, record = EnrolmentToken.issue(parsed, lifetime, uses)

        async def save() -> None:
            async with Store(database_url(db, data_dir)) as store:
                await store.add_enrolment_token(record)
                await store.audit("cli", "token.enrolment.create", "enrolment-token",
                                  {"hash": record.hash[:12], "labels": parsed, "uses": uses,
                                   "expires_at": record.expires_at.isoformat()})

        asyncio.run(save())
    except EdgewiseError as exc:
        fail(exc)
    secret = plaintext.get_secret_value()
    if out.data:
        out.emit({"token": secret, "labels": parsed, "uses": uses,
                  "expires_at": record.expires_at.isoformat()})
        return
    click.echo(secret)
    click.echo(f"enrolment token for labels {parsed or '{}'}: {uses} use(s), expires "
               f"{out.when(record.expires_at)}", err=True)


@cloud.group()
def keys() -> None:
    """TUF signing keys for releases: make them (init) and replace them (rotate)."""


def _store_url(data_dir: Path, db: str | None) -> str:
    from edgewise.cloud.store import DB_FILE, database_url

    if db is None and not (data_dir / DB_FILE).exists():
        raise ConfigError(f"no control plane store in {data_dir} ({DB_FILE} missing); pass the "
                          "--data directory of `edgewise cloud serve` (start it once), or --db URL")
    return database_url(db, data_dir)


def _keys_report(result: object, what: str, out: Output) -> None:
    from edgewise.cloud.releases.keys import KeysResult

    assert isinstance(result, KeysResult)
    if out.data:
        out.emit({"root_version": result.root_version,
                  "root_keys": [str(p) for p in result.root_keys],
                  "online_keys": str(result.online_dir), "root": str(result.root_file)})
        return
    click.echo(f"{what}: TUF root version {result.root_version}")
    for path in result.root_keys:
        click.echo(f"  root key (keep offline): {path}")
    click.echo(f"  online keys (targets, snapshot, timestamp): {result.online_dir}")
    click.echo(f"  copy of the root: {result.root_file}")


@keys.command("init")
@click.argument("root_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=CLOUD_DATA, show_default=True,
              help="The control plane's --data directory (online keys go to DIR/tuf/keys).")
@click.option("--db", default=None, envvar="EDGEWISE_DB", show_envvar=True,
              help="Database URL if the control plane uses one.")
@click.option("--root-keys", type=int, default=1, show_default=True,
              help="How many root keys to make.")
@click.option("--threshold", type=int, default=None,
              help="Root signatures needed (default: all root keys).")
@output_options()
def keys_init(root_dir: Path, data_dir: Path, db: str | None, root_keys: int,
              threshold: int | None, out: Output) -> None:
    """Make the root key(s) in ROOT_DIR (keep it offline) and the online keys; sign root v1.

    Run once, with access to the control plane's --data directory (the server may run). Then
    move ROOT_DIR to offline storage: it is needed again only by `keys rotate`."""
    import asyncio

    from edgewise.cloud.releases.keys import init_keys
    from edgewise.cloud.store import Store

    try:
        url = _store_url(data_dir, db)

        async def run() -> object:
            async with Store(url) as store:
                return await init_keys(root_dir, data_dir, store, root_keys=root_keys,
                                       threshold=threshold)

        result = asyncio.run(run())
    except EdgewiseError as exc:
        fail(exc)
    _keys_report(result, "made", out)


@keys.command("rotate")
@click.argument("root_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=CLOUD_DATA, show_default=True,
              help="The control plane's --data directory.")
@click.option("--db", default=None, envvar="EDGEWISE_DB", show_envvar=True,
              help="Database URL if the control plane uses one.")
@click.option("--online/--keep-online", "online", default=True, show_default=True,
              help="Replace the online keys (targets, snapshot, timestamp).")
@click.option("--new-root", is_flag=True, help="Replace the root key(s) too.")
@output_options()
def keys_rotate(root_dir: Path, data_dir: Path, db: str | None, online: bool, new_root: bool,
                out: Output) -> None:
    """Sign the next root version with the root keys in ROOT_DIR: new online keys (e.g. one
    was compromised), new root keys with --new-root, or only a later expiry
    (--keep-online). Nodes follow the rotation at their next refresh."""
    import asyncio

    from edgewise.cloud.releases.keys import rotate_keys
    from edgewise.cloud.store import Store

    try:
        url = _store_url(data_dir, db)

        async def run() -> object:
            async with Store(url) as store:
                return await rotate_keys(root_dir, data_dir, store, online=online,
                                         new_root=new_root)

        result = asyncio.run(run())
    except EdgewiseError as exc:
        fail(exc)
    _keys_report(result, "rotated", out)


cloud.add_command(pipeline)  # edgewise cloud pipeline list|show|set|delete


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cloud())
