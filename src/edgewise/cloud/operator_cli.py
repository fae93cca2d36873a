"""`edgewise node|config|data ...`: the operator CLI, a thin shell over `client.OperatorClient`.

Each command finds the server and token with `client.find_config` (``--config PATH``,
``$EDGEWISE_CONFIG``, ``~/.config/edgewise/cli.json``, then ``DIR/cli.json`` for ``--data DIR``,
default ``.edgewise/cloud``), prints a rich table, or the API's JSON with ``--json``. Errors are
one line on stderr (exit 2 for the user's input, a refused token or role, or an unknown node;
1 for an unreachable or failing server).

    edgewise node list [--selector site=plant1,line=1]
    edgewise node show ID
    edgewise node label ID k=v ... [--remove k ...]
    edgewise node revoke ID [--reason TEXT] [--yes]
    edgewise config set (--node ID | --selector S) [--pipeline FILE ...] [--set key=value ...]
                        [--setpoint key=value ...] [--expires 1h]
    edgewise config get --node ID
    edgewise data query --node N --stream S [--since T] [--limit N] [--from-seq SEQ]
    edgewise data stats [--node N]
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgewise.errors import ConfigError, EdgewiseError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(exc: EdgewiseError) -> None:
    from edgewise.cli import _fail as fail

    fail(exc)


def _client(config_path: Path | None, data_dir: Path | None) -> Any:
    from edgewise.cloud.client import OperatorClient, find_config

    path = find_config(config_path, os.environ.get("EDGEWISE_CONFIG"), Path.home(), data_dir)
    return OperatorClient.from_file(path)


def api_command(fn: F) -> F:
    """Adds --config/--data/--json and turns `EdgewiseError`s into one-line messages."""

    @click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                  default=None, help="CLI config file {url, token, ca} (or $EDGEWISE_CONFIG).")
    @click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
                  default=None, help="The control plane's --data directory (uses its cli.json).")
    @click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
    @functools.wraps(fn)
    def wrapper(config_path: Path | None, data_dir: Path | None, as_json: bool,
                **kw: Any) -> None:
        try:
            with _client(config_path, data_dir) as client:
                result = fn(client, **kw)
        except EdgewiseError as exc:
            _fail(exc)
            return
        except ValidationError as exc:  # a request model built from the flags refused them
            _fail(ConfigError("; ".join(e["msg"].removeprefix("Value error, ")
                                        for e in exc.errors())))
            return
        if result is None:
            return
        model, render = result
        if as_json:
            click.echo(model.model_dump_json() if isinstance(model, BaseModel)
                       else json.dumps(model, default=str))
        else:
            render()

    return wrapper  # type: ignore[return-value]


def _out() -> Console:
    return Console(soft_wrap=True)


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _pairs(items: tuple[str, ...], what: str, *, parse_values: bool) -> dict[str, Any]:
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


@click.group()
def node() -> None:
    """Nodes of the fleet: list, show, label, revoke."""


def nodes_table(nodes: list[Any], title: str) -> Table:
    t = Table(title=title)
    for c in ("node", "status", "labels", "last seen (UTC)", "certificate expires (UTC)"):
        t.add_column(c)
    for n in nodes:
        status = "[red]revoked[/]" if n.revoked else escape(n.status)
        t.add_row(escape(n.id), status, escape(_labels(n.labels)), _when(n.last_seen),
                  _when(n.cert_expiry))
    return t


@node.command("list")
@click.option("--selector", default=None, help="Label equality, e.g. site=plant1,line=1.")
@api_command
def node_list(client: Any, selector: str | None) -> Any:
    """List nodes, optionally those matching a label selector."""
    nodes = client.list_nodes(selector)
    title = f"{len(nodes)} node(s)" + (f" matching {selector}" if selector else "")
    return {"nodes": [n.model_dump(mode="json") for n in nodes]}, \
        lambda: _out().print(nodes_table(nodes, title))


def streams_table(streams: list[Any], title: str, *, with_node: bool) -> Table:
    t = Table(title=title)
    if with_node:
        t.add_column("node")
    for c in ("stream", "records stored", "highest contiguous seq", "lost (gaps)",
              "last received (UTC)"):
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
@click.argument("node_id")
@api_command
def node_show(client: Any, node_id: str) -> Any:
    """One node: identity, labels, desired and applied versions, streams."""
    n = client.get_node(node_id)

    def render() -> None:
        t = Table(title=f"node {escape(n.id)}", show_header=False)
        t.add_column("what")
        t.add_column("value")
        t.add_row("status", "[red]revoked[/]" if n.revoked else escape(n.status))
        t.add_row("labels", escape(_labels(n.labels)))
        t.add_row("enrolled (UTC)", _when(n.created))
        t.add_row("last seen (UTC)", _when(n.last_seen))
        t.add_row("certificate", f"serial {n.cert_serial}, expires {_when(n.cert_expiry)} UTC")
        t.add_row("key fingerprint", n.key_fingerprint)
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
@click.argument("node_id")
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
@click.argument("node_id")
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


# -- config -----------------------------------------------------------------------------------


@click.group()
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
              help="Pipeline YAML file (repeatable); replaces the node's pipelines.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Config value (YAML scalar; 'null' removes the key). Repeatable.")
@click.option("--setpoint", "setpoints", multiple=True, metavar="KEY=VALUE",
              help="Setpoint write (last writer wins against on-site writes). Repeatable.")
@click.option("--expires", default=None, help="Not applied by nodes after this (e.g. 1h).")
@api_command
def config_set(client: Any, node_id: str | None, selector: str | None,
               pipelines: tuple[Path, ...], settings: tuple[str, ...],
               setpoints: tuple[str, ...], expires: str | None) -> Any:
    """Assign pipelines, config and setpoints to a node or a label selector."""
    from edgewise.cloud.openapi import ConfigSetRequest
    from edgewise.pipeline.units import parse_duration

    if (node_id is None) == (selector is None):
        raise ConfigError("give exactly one of --node ID and --selector k=v,...")
    expires_s = None
    if expires is not None:
        try:
            expires_s = parse_duration(expires)
        except ValueError as exc:
            raise ConfigError(f"--expires: {exc}") from None
        if expires_s <= 0:
            raise ConfigError("--expires must be a positive duration")
    request = ConfigSetRequest(
        node=node_id, selector=selector, pipelines=_pipelines(pipelines),
        config=_pairs(settings, "--set", parse_values=True) or None,
        setpoints=_pairs(setpoints, "--setpoint", parse_values=True) or None,
        expires_in_s=expires_s,
    ) if (pipelines or settings or setpoints) else None
    if request is None:
        raise ConfigError("nothing to set: give --pipeline FILE, --set k=v or --setpoint k=v")
    res = client.set_config(request)

    def render() -> None:
        t = Table(title=f"desired state stored for {len(res.nodes)} node(s)")
        for c in ("node", "version", "session poked"):
            t.add_column(c)
        for nv in res.nodes:
            t.add_row(escape(nv.node), str(nv.version), "yes" if nv.notified else
                      "no (applies at the next connection)")
        _out().print(t)

    return res, render


@config.command("get")
@click.option("--node", "node_id", required=True)
@api_command
def config_get(client: Any, node_id: str) -> Any:
    """A node's newest desired state and what it reports having applied."""
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
            exp = "-" if d.expires_at is None else time.strftime(
                "%Y-%m-%d %H:%M:%S UTC", time.gmtime(d.expires_at))
            t.add_row("expires", exp)
            t.add_row("pipelines", escape(", ".join(sorted(d.pipelines)) or "-"))
            for k, v in sorted(d.config.items()):
                if k != "setpoints":
                    t.add_row(f"config {escape(k)}", escape(json.dumps(v)))
            t.add_row("labels", escape(_labels(d.labels)))
        r = res.reported
        if r is not None:
            t.add_row("applied version", str(r.applied_version or "-"))
            t.add_row("status", escape(r.status))
            for k, v in sorted(r.setpoints.items()):
                t.add_row(f"setpoint {escape(k)}", escape(json.dumps(v)))
        _out().print(t)

    return res, render


# -- data -------------------------------------------------------------------------------------


@click.group()
def data() -> None:
    """Data stored in the control plane: per-stream statistics and records."""


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


@data.command("query")
@click.option("--node", "node_id", required=True)
@click.option("--stream", required=True)
@click.option("--since", default=None, help="Records with ts at or after: Unix s, ISO, or 10m.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--from-seq", type=click.IntRange(0), default=0, show_default=True,
              help="Start at this sequence number (the answer's next_seq continues).")
@api_command
def data_query(client: Any, node_id: str, stream: str, since: str | None, limit: int,
               from_seq: int) -> Any:
    """Stored records of one stream, in sequence order."""
    res = client.data_query(node_id, stream, since=parse_since(since) if since else None,
                            from_seq=from_seq, limit=limit)

    def render() -> None:
        cols: list[str] = []
        for r in res.records:
            cols.extend(k for k in r.data if k not in cols)
        more = f"; more from seq {res.next_seq}" if res.next_seq is not None else ""
        t = Table(title=f"{escape(res.node)}/{escape(res.stream)}: {len(res.records):,} "
                        f"record(s){more}")
        t.add_column("seq", justify="right")
        for c in cols:
            t.add_column(escape(c))
        for r in res.records:
            t.add_row(str(r.seq), *(escape(_cell(r.data.get(c))) for c in cols))
        _out().print(t)

    return res, render


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6f}".rstrip("0").rstrip(".") if abs(v) < 1e15 else repr(v)
    return str(v)


@data.command("stats")
@click.option("--node", "node_id", default=None, help="One node (adds gaps and missing ranges).")
@api_command
def data_stats(client: Any, node_id: str | None) -> Any:
    """Per node and stream: records stored, highest contiguous sequence number, losses."""
    res = client.data_stats(node_id)
    title = f"cloud store: {len(res.streams)} stream(s)" + (f" of {node_id}" if node_id else "")
    return res, lambda: _out().print(streams_table(res.streams, title, with_node=True))
