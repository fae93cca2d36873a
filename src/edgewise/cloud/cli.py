"""`edgewise cloud ...`: run the control plane and make enrolment tokens.

* ``edgewise cloud serve --data DIR [--host 127.0.0.1] [--port 8443] [--db URL]
  [--trust-domain edgewise.local] [--name NAME ...]`` runs one control-plane process until
  Ctrl-C / SIGTERM. First start: CA, server certificate and an admin token (printed once and
  written to DIR/cli.json).
* ``edgewise cloud token create --labels site=plant1,line=1 [--ttl 1h] [--uses 1] --data DIR
  [--db URL]`` writes the token's hash straight into the store (the same SQLite file or
  PostgreSQL database the server uses; safe while it runs) and prints the plaintext once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path

import click

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


def _fail(exc: EdgewiseError) -> None:
    from edgewise.cli import _fail as fail

    fail(exc)


@click.group()
def cloud() -> None:
    """Run and administer the control plane."""


@cloud.command()
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="State directory: pki/, the SQLite store, cli.json.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8443, show_default=True)
@click.option("--db", default=None, help="Database URL (postgresql://...); default SQLite "
              "in --data.")
@click.option("--trust-domain", default="edgewise.local", show_default=True)
@click.option("--name", "names", multiple=True,
              help="Extra DNS name or IP for the server certificate (repeatable).")
@click.option("--data-out", "data_out", type=click.Path(dir_okay=False), default=None,
              help="YAML file with forwarders (MQTT, NATS JetStream) and retention; see "
              "docs/operations.md.")
def serve(data_dir: Path, host: str, port: int, db: str | None, trust_domain: str,
          names: tuple[str, ...], data_out: str | None) -> None:
    """Run the control plane (device API, sessions, ingest) until Ctrl-C."""
    from edgewise.cloud.app import CloudConfig

    try:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port {port} is not a TCP port")
        out = None
        if data_out is not None:
            from edgewise.cloud.forward import load_data_out

            out = load_data_out(data_out)
        config = CloudConfig(data_dir=data_dir, host=host, port=port, db=db,
                             trust_domain=trust_domain, server_names=names, data_out=out)
        config.db_url  # noqa: B018 - validates --db early
        asyncio.run(_serve(config))
    except EdgewiseError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


async def _serve(config: object) -> None:
    from edgewise.cloud.app import CloudConfig, start
    from edgewise.cloud.bootstrap import bootstrap, server_url, write_cli_config
    from edgewise.cloud.store import Store

    assert isinstance(config, CloudConfig)
    echo = lambda s: click.echo(s, err=True)  # noqa: E731 - progress goes to stderr
    async with Store(config.db_url) as store:
        boot = await bootstrap(config.data_dir, store, host=config.host,
                               trust_domain=config.trust_domain, extra_names=config.server_names)
        for line in boot.created:
            echo(f"created {line}")
        running = await start(config, boot.ca, store=store)
        try:
            url = server_url(config.host, running.port)
            write_cli_config(boot.cli_config, url, boot.ca_path, boot.admin_token)
            if boot.admin_token is not None:
                click.echo(f"admin token (shown once): {boot.admin_token}")
                echo(f"saved with the URL and CA to {boot.cli_config} (mode 0600)")
            echo(f"CA certificate for agents: {boot.ca_path}")
            echo(f"control plane listening on {url} (TLS 1.3; store {store!r})")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            echo("stopping")
        finally:
            await running.stop()


@cloud.group()
def token() -> None:
    """Enrolment tokens."""


@token.command("create")
@click.option("--labels", default="", help="Labels the node gets, e.g. site=plant1,line=1.")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime (90s, 30m, 1h, 2d).")
@click.option("--uses", type=int, default=1, show_default=True,
              help="How many nodes may enrol with it.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".edgewise/cloud"), show_default=True,
              help="The control plane's --data directory.")
@click.option("--db", default=None, help="Database URL if the control plane uses one.")
@click.option("--json", "as_json", is_flag=True, help="Print {token, expires_at, ...} as JSON.")
def token_create(labels: str, ttl: str, uses: int, data_dir: Path, db: str | None,
                 as_json: bool) -> None:
    """Make a one-time enrolment token (stored hashed; printed once)."""
    import json

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
        _fail(exc)
    secret = plaintext.get_secret_value()
    if as_json:
        click.echo(json.dumps({"token": secret, "labels": parsed, "uses": uses,
                               "expires_at": record.expires_at.isoformat()}))
        return
    click.echo(secret)
    click.echo(f"enrolment token for labels {parsed or '{}'}: {uses} use(s), expires "
               f"{record.expires_at:%Y-%m-%d %H:%M:%S} UTC", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cloud())
