"""`edgewise token|audit ...`: operator tokens and the audit log over the operator API.

A thin shell over `client.OperatorClient`, found as by every operator command (``--config``,
``$EDGEWISE_CONFIG``, ``~/.config/edgewise/cli.json``, ``--data DIR``; see `cli.operator`).
Managing tokens needs role admin; the audit log can be read by any role.

    edgewise token create NAME --role viewer|operator|admin [--ttl 30d]
    edgewise token list
    edgewise token revoke TOKEN
    edgewise audit list [--target T] [--actor A] [--limit N] [--before-id ID]

(`edgewise cloud token create` makes enrolment tokens for nodes; these are for people.)
"""

from __future__ import annotations

import json
from typing import Any

import click

from edgewise.cli.common import escape
from edgewise.cli.operator import _out, _when, api_command
from edgewise.errors import ConfigError


@click.group()
def token() -> None:
    """Operator tokens (for people and scripts): create, list, revoke; needs role admin."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True,
              help="viewer: read only; operator: also change nodes and config; admin: also "
                   "manage tokens, revoke and decommission nodes.")
@click.option("--ttl", default=None, help="Lifetime, e.g. 12h or 30d (default: no expiry).")
@api_command
def token_create(client: Any, name: str, role: str, ttl: str | None) -> Any:
    """Make an operator token for NAME (shown in the audit log); printed once."""
    from edgewise.cli.cloud import parse_ttl

    ttl_s = parse_ttl(ttl).total_seconds() if ttl is not None else None
    res = client.create_operator_token(name, role, ttl_s)
    expires = "never" if res.expires_at is None else _when(res.expires_at)

    def render() -> None:
        click.echo(f"operator token for {res.name} (role {res.role}, expires {expires}); "
                   "shown once, stored only hashed:", err=True)
        click.echo(res.token)

    return res, render


@token.command("list")
@api_command
def token_list(client: Any) -> Any:
    """Every operator token: name, role, hash prefix, expiry, revoked (never the token)."""
    from rich.table import Table

    res = client.list_operator_tokens()

    def render() -> None:
        t = Table(title=f"{len(res.tokens)} operator token(s)")
        for c in ("name", "role", "sha256 prefix", "created", "expires", "state"):
            t.add_column(c)
        for tk in res.tokens:
            t.add_row(escape(tk.name), tk.role, tk.hash_prefix, _when(tk.created),
                      "never" if tk.expires_at is None else _when(tk.expires_at),
                      "[red]revoked[/]" if tk.revoked else "active")
        _out().print(t)

    return res, render


@token.command("revoke")
@click.argument("token_text", metavar="TOKEN")
@api_command
def token_revoke(client: Any, token_text: str) -> Any:
    """Revoke an operator token (give the token itself, ewo_...); refused from now on."""
    if not token_text.startswith("ewo_"):
        raise ConfigError("give the operator token itself (it starts with ewo_); the list "
                          "shows only a hash prefix, which cannot revoke")
    res = client.revoke_operator_token(token_text)
    return res, lambda: _out().print("revoked: the token is refused from now on")


@click.group()
def audit() -> None:
    """The control plane's audit log: who did what, when."""


@audit.command("list")
@click.option("--target", default=None, help="Only entries about this target (e.g. node:ID).")
@click.option("--actor", default=None, help="Only entries by this actor.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--before-id", type=click.IntRange(0), default=None,
              help="Older entries: the id the previous page ended before.")
@api_command
def audit_list(client: Any, target: str | None, actor: str | None, limit: int,
               before_id: int | None) -> Any:
    """The newest audit entries first."""
    from rich.table import Table

    res = client.audit(target=target, actor=actor, limit=limit, before_id=before_id)

    def render() -> None:
        more = (f"; older: --before-id {res.next_before_id}"
                if res.next_before_id is not None else "")
        t = Table(title=f"{len(res.entries)} audit entr{'y' if len(res.entries) == 1 else 'ies'}"
                        f"{more}")
        for c in ("id", "time", "actor", "action", "target", "detail"):
            t.add_column(c)
        for e in res.entries:
            t.add_row(str(e.id), _when(e.ts), escape(e.actor), escape(e.action),
                      escape(e.target), escape(json.dumps(e.detail, sort_keys=True)))
        _out().print(t)

    return res, render
