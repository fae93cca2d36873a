"""`edgewise config layer|layers|diff|apply|drift` and `edgewise node quarantine|unquarantine`:
fleet operations (docs/operations.md), a thin shell over `client.OperatorClient` like
`cli.operator`, whose groups load these commands lazily.

    edgewise config layer (--fleet | --group NAME [--selector S] [--position N] | --node ID)
                          [k=v ...] [--remove k ...] [--if-version N] [--delete]
    edgewise config layers [--node ID]
    edgewise config diff --node ID
    edgewise config apply (--node ID | --selector S | --all) [--yes]
    edgewise config drift [--selector S]
    edgewise node quarantine ID --reason TEXT
    edgewise node unquarantine ID
"""

from __future__ import annotations

import json
from typing import Any

import click

from edgewise.cli.common import escape
from edgewise.cli.operator import _out, _pairs, api_command, node_target
from edgewise.errors import ConfigError


def _value(v: Any) -> str:
    return "-" if v is None else escape(json.dumps(v))


def _layer_name(kind: str, name: str) -> str:
    return "fleet" if kind == "fleet" else f"{kind} {name}"


@click.command("layer")
@click.option("--fleet", "fleet", is_flag=True, help="The fleet defaults (lowest layer).")
@click.option("--group", "group", default=None, metavar="NAME",
              help="A group: nodes matching its selector (middle layers, by position).")
@click.option("--node", "node_id", default=None, help="One node's overrides (top layer).")
@click.option("--selector", default=None,
              help="Group: label equality, e.g. site=plant1 ('' matches every node); needed "
                   "when the group is new.")
@click.option("--position", type=int, default=None,
              help="Group: lower positions apply first (ties by name).")
@click.option("--remove", "remove", multiple=True, metavar="KEY",
              help="Take this key out of the layer (repeatable).")
@click.option("--if-version", type=click.IntRange(min=0), default=None,
              help="Refuse unless the layer is at this version (0: it must be new).")
@click.option("--delete", is_flag=True, help="Delete the layer.")
@click.argument("pairs", nargs=-1)
@api_command
def layer(client: Any, fleet: bool, group: str | None, node_id: str | None,
          selector: str | None, position: int | None, remove: tuple[str, ...],
          if_version: int | None, delete: bool, pairs: tuple[str, ...]) -> Any:
    """Set (k=v, YAML values) or remove keys of one config layer. Nothing reaches a node
    until `edgewise config apply`; `edgewise config diff --node ID` shows what would change."""
    from edgewise.cloud.openapi import LayerWrite

    if sum((fleet, group is not None, node_id is not None)) != 1:
        raise ConfigError("give exactly one of --fleet, --group NAME and --node ID")
    kind = "fleet" if fleet else "group" if group is not None else "node"
    if (selector is not None or position is not None) and kind != "group":
        raise ConfigError("--selector and --position are for --group")
    set_ = _pairs(pairs, "value", parse_values=True)
    if not (set_ or remove or delete or selector is not None or position is not None):
        raise ConfigError("nothing to change: give k=v pairs, --remove k, --selector, "
                          "--position or --delete")
    res = client.write_layer(LayerWrite(
        kind=kind, name=group or node_id or "", set=set_, remove=list(remove),
        selector=selector, position=position, if_version=if_version, delete=delete))

    def render() -> None:
        la = res.layer
        if la is None:
            _out().print(f"{escape(_layer_name(kind, group or node_id or ''))}: deleted")
            return
        keys = ", ".join(f"{escape(k)}={_value(v)}" for k, v in sorted(la.values.items()))
        _out().print(f"{escape(la.key)} v{la.version}: {keys or '(empty)'}; not applied yet: "
                     "`edgewise config diff --node ID`, then `edgewise config apply`")

    return res, render


@click.command("layers")
@click.option("--node", "node_id", default=None, help="Include this node's own layer.")
@api_command
def layers(client: Any, node_id: str | None) -> Any:
    """The config layers in the order they apply (later wins)."""
    from rich.table import Table

    res = client.list_layers(node_id)

    def render() -> None:
        t = Table(title=f"{len(res.layers)} config layer(s), lowest first")
        for c in ("layer", "selector", "position", "version", "values", "updated by"):
            t.add_column(c)
        for la in res.layers:
            sel = ",".join(f"{k}={v}" for k, v in sorted(la.selector.items()))
            t.add_row(escape(la.key), escape(sel or ("(all)" if la.kind == "group" else "-")),
                      str(la.position) if la.kind == "group" else "-", str(la.version),
                      ", ".join(f"{escape(k)}={_value(v)}" for k, v in sorted(la.values.items())),
                      escape(la.updated_by or "-"))
        _out().print(t)

    return res, render


@click.command("diff")
@click.option("--node", "node_id", required=True)
@api_command
def diff(client: Any, node_id: str) -> Any:
    """A node's effective config from the layers, where each value comes from, and what
    `edgewise config apply` would change in its desired config."""
    from rich.table import Table

    res = client.diff_config(node_id)

    def render() -> None:
        console = _out()
        t = Table(title=f"effective config of {escape(res.node)} (desired v"
                        f"{res.desired_version or '-'})")
        for c in ("key", "value", "from layer"):
            t.add_column(c)
        for k, v in sorted(res.effective.items()):
            t.add_row(escape(k), _value(v), escape(res.sources[k]))
        console.print(t)
        if not res.changes:
            console.print("no change: the desired config is the layers' effective config")
            return
        c = Table(title=f"{len(res.changes)} change(s) `edgewise config apply` would make")
        for col in ("key", "now", "after", "from layer"):
            c.add_column(col)
        for ch in res.changes:
            c.add_row(escape(ch.key), _value(ch.before),
                      "(removed)" if ch.source is None else _value(ch.after),
                      escape(ch.source or "-"))
        console.print(c)

    return res, render


@click.command("apply")
@click.option("--node", "node_id", default=None, help="One node.")
@click.option("--selector", default=None, help="Every node matching, e.g. site=plant1.")
@click.option("--all", "all_", is_flag=True, help="Every node that is not revoked.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (--selector, --all).")
@api_command
def apply(client: Any, node_id: str | None, selector: str | None, all_: bool, yes: bool
          ) -> Any:
    """Store the layers' effective config as the next desired version of each node whose
    desired config differs (its pipelines, setpoints and release stay)."""
    from rich.table import Table

    from edgewise.cloud.openapi import ConfigApplyRequest

    if sum((node_id is not None, selector is not None, all_)) != 1:
        raise ConfigError("give exactly one of --node ID, --selector k=v,... and --all")
    if node_id is None and not yes:
        click.confirm(f"Apply the config layers to {'every node' if all_ else selector}?",
                      abort=True)
    res = client.apply_config(ConfigApplyRequest(node=node_id, selector=selector, all=all_))

    def render() -> None:
        t = Table(title=f"new desired version for {len(res.nodes)} node(s); "
                        f"{res.unchanged} up to date already")
        for c in ("node", "version", "keys changed", "session poked"):
            t.add_column(c)
        for a in res.nodes:
            t.add_row(escape(a.node), str(a.version), str(a.changes),
                      "yes" if a.notified else "no (applies at the next connection)")
        for h in res.held:  # quarantined: no config reaches it
            t.add_row(escape(h.node), "held", "-", escape(f"quarantined: {h.reason}"))
        _out().print(t)

    return res, render


@click.command("drift")
@click.option("--selector", default=None, help="Only nodes matching, e.g. site=plant1.")
@api_command
def drift(client: Any, selector: str | None) -> Any:
    """Nodes whose reported state differs from their desired state, and why."""
    from rich.table import Table

    entries = client.drift(selector)

    def render() -> None:
        t = Table(title=f"{len(entries)} node(s) with drift")
        for c in ("node", "state", "desired", "applied", "why"):
            t.add_column(c)
        for e in entries:
            t.add_row(escape(e.node), e.state, str(e.desired_version or "-"),
                      str(e.applied_version or "-"), escape("; ".join(e.reasons)))
        _out().print(t)

    return {"nodes": [e.model_dump(mode="json") for e in entries]}, render


@click.command("quarantine")
@node_target()
@click.option("--reason", required=True, help="Why (shown as the node's state reason).")
@api_command
def quarantine(client: Any, node_id: str, reason: str) -> Any:
    """Quarantine a node: its state is `quarantined` with the reason until lifted."""
    n = client.quarantine(node_id, reason)
    return n, lambda: _out().print(f"{escape(n.id)}: quarantined ({escape(reason)})")


@click.command("unquarantine")
@node_target()
@api_command
def unquarantine(client: Any, node_id: str) -> Any:
    """Lift a node's quarantine."""
    n = client.quarantine(node_id, None)
    return n, lambda: _out().print(f"{escape(n.id)}: {n.state}"
                                   + (f" ({escape('; '.join(n.reasons))})" if n.reasons else ""))
