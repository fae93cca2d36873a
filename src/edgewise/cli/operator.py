"""`edgewise node|config ...`: the operator CLI, a thin shell over `client.OperatorClient`
(``data`` is in `cli.data`, ``token`` and ``audit`` in `cli.tokens`; they share `api_command`).

Each command finds the server and token with `client.find_config` (``--config PATH``,
``$EDGEWISE_CONFIG``, ``~/.config/edgewise/cli.json``, then ``DIR/cli.json`` for ``--data DIR``,
default ``.edgewise/cloud``), prints a rich table, or the API's JSON with ``--json``. Errors are
one line on stderr (exit 2 for the user's input, a refused token or role, or an unknown node;
1 for an unreachable or failing server).

    edgewise node list [--selector site=plant1,line=1] [--state degraded]
    edgewise node show --node ID                 (or: node show ID; so for every node command)
    edgewise node label --node ID k=v ... [--remove k ...]
    edgewise node revoke --node ID [--reason TEXT] [--yes]
    edgewise node decommission --node ID [--wipe] [--reason TEXT] [--yes]
    edgewise config set (--node ID | --selector S) [--pipeline FILE ... | --no-pipelines]
                        [--set key=value ...] [--setpoint key=value ...] [--expires 1h]
                        [--release VERSION|none]
    edgewise config get --node ID
    (config layer|layers|diff|apply|drift and node quarantine|unquarantine: `cli.fleet_ops`)
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from edgewise.cli.common import LazyGroup, escape, fail
from edgewise.cli.health_text import health_line
from edgewise.cli.output import Output, current, output_options
from edgewise.errors import ConfigError, EdgewiseError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

F = TypeVar("F", bound=Callable[..., Any])


def _client(config_path: Path | None, data_dir: Path | None) -> Any:
    from edgewise.cloud.client import OperatorClient, find_config

    path = find_config(config_path, os.environ.get("EDGEWISE_CONFIG"), Path.home(), data_dir)
    return OperatorClient.from_file(path)


def api_command(fn: F) -> F:
    """Adds --config/--data and the output options (`cli.output`: --format, --json, --utc),
    and turns `EdgewiseError`s into one-line messages. ``fn(client, **options)`` returns
    ``(answer, render)``: the answer is printed for json/yaml, else ``render()`` is called."""

    @click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                  default=None, help="CLI config file {url, token, ca} (default: "
                  "$EDGEWISE_CONFIG, then ~/.config/edgewise/cli.json, then DIR/cli.json of "
                  "--data, then .edgewise/cloud/cli.json).")
    @click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
                  default=None, help="The control plane's --data directory: its cli.json is "
                  "used when neither --config, $EDGEWISE_CONFIG nor ~/.config/edgewise/cli.json "
                  "is there (default: .edgewise/cloud).")
    @output_options(times=True)
    @functools.wraps(fn)
    def wrapper(config_path: Path | None, data_dir: Path | None, out: Output,
                **kw: Any) -> None:
        from pydantic import BaseModel, ValidationError

        try:
            with _client(config_path, data_dir) as client:
                result = fn(client, **kw)
        except EdgewiseError as exc:
            fail(exc)
            return
        except ValidationError as exc:  # a request model built from the flags refused them
            fail(ConfigError("; ".join(e["msg"].removeprefix("Value error, ")
                                        for e in exc.errors())))
            return
        if result is None:
            return
        model, render = result
        if out.data:
            out.emit(model.model_dump_json() if isinstance(model, BaseModel) else model)
        else:
            render()  # reads the output settings with `cli.output.current` (_out, _when)

    return wrapper  # type: ignore[return-value]


def node_target(rest: str | None = None) -> Callable[[F], F]:
    """The node a command acts on, spelled ``--node ID`` as in every command that names one
    node (``config get``, ``data query``, ...); the node commands also take ID as their first
    argument (their first spelling, kept). Put it above `api_command`. ``rest``: the name of
    a later ``nargs=-1`` argument (``node label``'s pairs) that a first argument belongs to
    when ``--node`` is given."""

    def decorate(fn: F) -> F:
        @click.argument("node_arg", metavar="[ID]", required=False)
        @click.option("--node", "node_opt", metavar="ID", default=None,
                      help="The node (or give its id as the first argument).")
        @functools.wraps(fn)
        def wrapper(*args: Any, node_arg: str | None, node_opt: str | None, **kw: Any) -> Any:
            if node_opt is not None and node_arg is not None:
                if rest is None:
                    raise click.UsageError(f"give the node once: --node {node_opt} or "
                                           f"{node_arg}, not both")
                kw[rest] = (node_arg, *kw[rest])
            node_id = node_opt if node_opt is not None else node_arg
            if node_id is None:
                raise click.UsageError("Missing the node: give --node ID (or ID as the first "
                                       "argument).")
            return fn(*args, node_id=node_id, **kw)

        return wrapper  # type: ignore[return-value]

    return decorate


def _out() -> Console:
    """The console of this command's output (`cli.output`: fitted, or unbounded for wide)."""
    return current().console()


def _when(t: datetime | None) -> str:
    """A time as `cli.output.Output.when` shows it (local zone, or UTC with --utc)."""
    return current().when(t)


def _wide() -> bool:
    return current().format == "wide"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _pairs(items: tuple[str, ...], what: str, *, parse_values: bool) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r}: write key=value")
        if parse_values:
            try:  # YAML scalars: 5 -> int, 2.5 -> float, true -> bool, null -> remove
                out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError:
                out[key.strip()] = value
        else:
            out[key.strip()] = value.strip()
    return out


# -- node -------------------------------------------------------------------------------------


@click.group(cls=LazyGroup, lazy={"quarantine": "edgewise.cli.fleet_ops:quarantine",
                                   "unquarantine": "edgewise.cli.fleet_ops:unquarantine"})
def node() -> None:
    """Nodes of the fleet: list, show, label, revoke, decommission."""


def _status(n: Any) -> str:
    if n.decommissioned_at is not None:
        return "[red]decommissioned[/]" + (" (wipe)" if n.wipe else "")
    return "[red]revoked[/]" if n.revoked else escape(n.status)


def nodes_table(nodes: list[Any], title: str) -> Table:
    from rich.table import Table

    t = Table(title=title)
    wide = _wide()
    for c in ("node", "status", "TPM", "labels", "last seen", "certificate expires",
              *(("certificate serial", "key fingerprint") if wide else ())):
        # the id is never cut or wrapped (it is what you copy), nor a status word; others wrap
        t.add_column(c, no_wrap=True, min_width=len("node-") + 12) if c == "node" else \
            t.add_column(c, overflow="fold", min_width=14 if c == "status" else min(len(c), 10))
    for n in nodes:
        t.add_row(escape(n.id), _status(n) + (" (quarantined)" if n.quarantine else ""),
                  n.attestation or "-", escape(_labels(n.labels)), _when(n.last_seen),
                  _when(n.cert_expiry),
                  *((str(n.cert_serial), n.key_fingerprint) if wide else ()))
    return t


def states_table(nodes: list[Any], title: str) -> Table:
    from rich.table import Table

    t = Table(title=title)
    for c in ("node", "state", "why", "TPM", "labels", "last seen"):  # TPM: tpm or none
        t.add_column(c)
    for n in nodes:
        t.add_row(escape(n.id), n.state, escape("; ".join(n.reasons) or "-"),
                  n.attestation or "-", escape(_labels(n.labels)), _when(n.last_seen))
    return t


@node.command("list")
@click.option("--selector", default=None, help="Label equality, e.g. site=plant1,line=1.")
@click.option("--state", default=None,
              type=click.Choice(["online", "degraded", "offline", "quarantined", "any"]),
              help="Only nodes in this health state ('any': all, with their states).")
@api_command
def node_list(client: Any, selector: str | None, state: str | None) -> Any:
    """List nodes, optionally those matching a label selector or in a health state."""
    if state is not None:
        found = client.fleet_nodes(None if state == "any" else state, selector)
        title = f"{len(found)} node(s)" + (f" {state}" if state != "any" else "") + (
            f" matching {selector}" if selector else "")
        return {"nodes": [n.model_dump(mode="json") for n in found]}, \
            lambda: _out().print(states_table(found, title))
    nodes = client.list_nodes(selector)
    title = f"{len(nodes)} node(s)" + (f" matching {selector}" if selector else "")
    return {"nodes": [n.model_dump(mode="json") for n in nodes]}, \
        lambda: _out().print(nodes_table(nodes, title))


def streams_table(streams: list[Any], title: str, *, with_node: bool) -> Table:
    from rich.table import Table

    t = Table(title=title)
    if with_node:
        t.add_column("node")
    for c in ("stream", "records stored", "highest contiguous seq", "lost (gaps)",
              "last received"):
        t.add_column(c, justify="right" if c.startswith(("records", "highest", "lost")) else
                     "left")
    detail = any(s.missing for s in streams)
    if detail:
        t.add_column("missing above the mark")
    for s in streams:
        row = [escape(s.stream), f"{s.records_stored:,}",
               "-" if s.highest_contiguous_seq is None else f"{s.highest_contiguous_seq:,}",
               f"{s.lost_records:,}", _when(s.last_received)]
        if with_node:
            row.insert(0, escape(s.node))
        if detail:
            row.append(", ".join(f"{m.first}..{m.first + m.count - 1}" for m in s.missing or [])
                       or "-")
        t.add_row(*row)
    return t


@node.command("show")
@node_target()
@api_command
def node_show(client: Any, node_id: str) -> Any:
    """One node: identity, labels, health state, desired and applied versions, streams."""
    from rich.table import Table

    n = client.get_node(node_id)

    def render() -> None:
        t = Table(title=f"node {escape(n.id)}", show_header=False)
        t.add_column("what")
        t.add_column("value")
        t.add_row("status", _status(n))
        if n.decommissioned_at is not None:
            t.add_row("decommissioned",
                      f"{_when(n.decommissioned_at)} by {escape(n.decommissioned_by or '?')}")
        t.add_row("labels", escape(_labels(n.labels)))
        t.add_row("enrolled", _when(n.created))
        t.add_row("last seen", _when(n.last_seen))
        t.add_row("certificate", f"serial {n.cert_serial}, expires {_when(n.cert_expiry)}")
        t.add_row("key fingerprint", n.key_fingerprint)
        t.add_row("attestation", n.attestation or "-")
        if n.state is not None:
            t.add_row("state", n.state + (f" ({escape('; '.join(n.reasons))})"
                                          if n.reasons else ""))
        if n.health:
            t.add_row(f"health at {_when(n.health_at)}", escape(health_line(n.health)))
        t.add_row("desired version", str(n.desired_version or "-"))
        if n.reported is not None:
            r = n.reported
            t.add_row("applied version", str(r.applied_version or "-"))
            t.add_row("reported status", escape(r.status))
            for k, v in sorted(r.counters.items()):
                t.add_row(f"  {escape(k)}", f"{v:,}")
        console = _out()
        console.print(t)
        if n.streams:
            console.print(streams_table(n.streams, "streams in the cloud store", with_node=False))

    return n, render


@node.command("label")
@node_target(rest="pairs")
@click.argument("pairs", nargs=-1)
@click.option("--remove", "remove", multiple=True, help="Remove this label key (repeatable).")
@api_command
def node_label(client: Any, node_id: str, pairs: tuple[str, ...], remove: tuple[str, ...]
               ) -> Any:
    """Set labels (k=v ...) and remove some (--remove k)."""
    set_ = _pairs(pairs, "label", parse_values=False)
    if not set_ and not remove:
        raise ConfigError("nothing to change: give k=v pairs and/or --remove k")
    n = client.patch_labels(node_id, set_, list(remove))
    return n, lambda: _out().print(f"{escape(n.id)}: labels {escape(_labels(n.labels))}")


@node.command("revoke")
@node_target()
@click.option("--reason", default="", help="Why (kept in the audit log).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@api_command
def node_revoke(client: Any, node_id: str, reason: str, yes: bool) -> Any:
    """Revoke a node: its certificate and key are refused from now on (needs role admin)."""
    if not yes:
        click.confirm(f"Revoke node {node_id}? It will have to be enrolled again", abort=True)
    n = client.revoke_node(node_id, reason)
    return n, lambda: _out().print(f"{escape(n.id)}: revoked (certificate and key); its "
                                   "session, if any, was closed")


@node.command("decommission")
@node_target()
@click.option("--wipe", is_flag=True,
              help="The node deletes its keys, identity, outbox, twin and release slots when "
                   "it hears it (now, or when it comes back), and its agent exits.")
@click.option("--reason", default="", help="Why (kept in the audit log).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@api_command
def node_decommission(client: Any, node_id: str, wipe: bool, reason: str, yes: bool) -> Any:
    """Decommission a node: revoke it at once (its session is closed), keep its record, and
    stop its agent for good; coming back needs a new enrolment token (needs role admin)."""
    if not yes:
        what = " and wipe its keys and data" if wipe else ""
        click.confirm(f"Decommission node {node_id}{what}? It will need a new enrolment token",
                      abort=True)
    n = client.decommission_node(node_id, wipe=wipe, reason=reason)
    wiped = "; it wipes its keys and data when it hears it" if n.wipe else ""
    return n, lambda: _out().print(f"{escape(n.id)}: decommissioned (revoked, session closed)"
                                   f"{wiped}")


# -- config -----------------------------------------------------------------------------------


@click.group(cls=LazyGroup, lazy={c: f"edgewise.cli.fleet_ops:{c}"
                                   for c in ("layer", "layers", "diff", "apply", "drift")})
def config() -> None:
    """Desired state: pipelines, config and setpoints per node or label selector."""


def _pipelines(files: tuple[Path, ...]) -> dict[str, str] | None:
    from edgewise.pipeline.spec import load_pipeline

    if not files:
        return None
    out: dict[str, str] = {}
    for f in files:
        spec = load_pipeline(f)  # file:line errors here, before anything is sent
        if spec.name in out:
            raise ConfigError(f"{f}: pipeline name {spec.name!r} is given twice")
        out[spec.name] = f.read_text(encoding="utf-8")
    return out


@config.command("set")
@click.option("--node", "node_id", default=None, help="One node.")
@click.option("--selector", default=None, help="Every node matching, e.g. site=plant1,line=1.")
@click.option("--pipeline", "pipelines", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Pipeline YAML file (repeatable); replaces the node's pipelines. Left "
                   "out, the node keeps them (or its own --pipeline if none were ever named).")
@click.option("--no-pipelines", "no_pipelines", is_flag=True, default=False,
              help="Assign no pipeline: the node stops its pipeline, --pipeline included.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Config value (YAML scalar; 'null' removes the key). Repeatable.")
@click.option("--setpoint", "setpoints", multiple=True, metavar="KEY=VALUE",
              help="Setpoint write (last writer wins against on-site writes). Repeatable.")
@click.option("--expires", default=None, help="Not applied by nodes after this (e.g. 1h).")
@click.option("--release", default=None, metavar="VERSION",
              help="Assign this published release ('none': assign none). Left out, the "
                   "assigned release stays.")
@api_command
def config_set(client: Any, node_id: str | None, selector: str | None,
               pipelines: tuple[Path, ...], no_pipelines: bool, settings: tuple[str, ...],
               setpoints: tuple[str, ...], expires: str | None, release: str | None) -> Any:
    """Assign pipelines, config and setpoints to a node or a label selector.

    Without --pipeline or --no-pipelines the node's pipelines stay as they are: a node whose
    desired state never named any keeps running its own `agent run --pipeline`."""
    from rich.table import Table

    from edgewise.cloud.openapi import ConfigSetRequest
    from edgewise.pipeline.units import parse_duration

    if (node_id is None) == (selector is None):
        raise ConfigError("give exactly one of --node ID and --selector k=v,...")
    if pipelines and no_pipelines:
        raise ConfigError("give --pipeline FILE or --no-pipelines, not both")
    expires_s = None
    if expires is not None:
        try:
            expires_s = parse_duration(expires)
        except ValueError as exc:
            raise ConfigError(f"--expires: {exc}") from None
        if expires_s <= 0:
            raise ConfigError("--expires must be a positive duration")
    request = ConfigSetRequest(
        node=node_id, selector=selector,
        pipelines={} if no_pipelines else _pipelines(pipelines),
        config=_pairs(settings, "--set", parse_values=True) or None,
        setpoints=_pairs(setpoints, "--setpoint", parse_values=True) or None,
        expires_in_s=expires_s,
        release=None if release is None else ("" if release == "none" else release),
    ) if (pipelines or no_pipelines or settings or setpoints or release is not None) else None
    if request is None:
        raise ConfigError("nothing to set: give --pipeline FILE, --no-pipelines, --set k=v, "
                          "--setpoint k=v or --release VERSION")
    res = client.set_config(request)

    def render() -> None:
        t = Table(title=f"desired state stored for {len(res.nodes)} node(s)")
        for c in ("node", "version", "session poked"):
            t.add_column(c)
        for nv in res.nodes:
            t.add_row(escape(nv.node), str(nv.version), "yes" if nv.notified else
                      "no (applies at the next connection)")
        for h in res.held:  # quarantined: nothing but a release reaches it
            t.add_row(escape(h.node), "held", escape(f"quarantined: {h.reason}"))
        _out().print(t)

    return res, render


@config.command("get")
@click.option("--node", "node_id", required=True)
@api_command
def config_get(client: Any, node_id: str) -> Any:
    """A node's newest desired state and what it reports having applied."""
    from rich.table import Table

    res = client.get_config(node_id)

    def render() -> None:
        t = Table(title=f"desired state of {escape(res.node)}", show_header=False)
        t.add_column("what")
        t.add_column("value")
        d = res.desired
        if d is None:
            t.add_row("desired", "none yet (`edgewise config set`)")
        else:
            t.add_row("version", str(d.version))
            t.add_row("expires", _when(d.expires_at))
            t.add_row("pipelines", "none named (the node runs its own --pipeline)"
                      if d.pipelines is None else escape(", ".join(sorted(d.pipelines)) or "-"))
            for k, v in sorted(d.config.items()):
                if k != "setpoints":
                    t.add_row(f"config {escape(k)}", escape(json.dumps(v)))
            t.add_row("labels", escape(_labels(d.labels)))
            t.add_row("release", escape(d.release or "none assigned"))
        r = res.reported
        if r is not None:
            t.add_row("applied version", str(r.applied_version or "-"))
            t.add_row("status", escape(r.status))
            for k, v in sorted(r.setpoints.items()):
                held = " (pending: the node has not applied it yet)" \
                    if k in r.pending_setpoints else ""
                t.add_row(f"setpoint {escape(k)}", escape(json.dumps(v)) + held)
        _out().print(t)

    return res, render


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds from ``1764547200``, an ISO time (``2026-12-01T08:00:00Z``; no zone means
    UTC) or an age (``10m``, ``2h``, ``1d``: that long ago)."""
    from edgewise.pipeline.units import parse_duration

    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    if s and s[-1] in "smhd" and s[0].isdigit():
        try:
            return (time.time() if now is None else now) - parse_duration(s)
        except ValueError:
            pass
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: give Unix seconds, an ISO time (2026-12-01T08:00:00Z) or an "
            "age such as 10m, 2h or 1d"
        ) from None
    if t.tzinfo is None:
        from datetime import UTC

        t = t.replace(tzinfo=UTC)
    return t.timestamp()
