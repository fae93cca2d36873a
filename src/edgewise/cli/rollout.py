"""`edgewise rollout ...`: staged rollouts of a release (docs/operations.md, *Rollouts*).

    edgewise rollout create --release V --selector k=v [--canary N|P%] [--waves 10%,50%,100%]
        [--bake 10m] [--max-failures 2%] [--max-unavailable-per-site 1] [--site-label site]
        [--gate 'alarm_rate<=2x' ...] [--node-timeout 10m] [--intent-ttl 24h]
    edgewise rollout list
    edgewise rollout status ID [--watch] [--nodes problems|all|none]
    edgewise rollout pause|resume|abort|cancel ID [--reason TEXT]

The server and token are found as for `edgewise node` (``--config``, ``$EDGEWISE_CONFIG``,
``--data DIR``); ``--json`` prints the API's answer. ``status --watch`` redraws the status
(rich, on stderr) until the rollout is completed, paused, aborted or cancelled, then prints
it once more (stdout); its exit code is 0 for completed, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from edgewise.cli.common import escape
from edgewise.cli.operator import _out, _when, api_command
from edgewise.errors import ConfigError

END_STATES = ("completed", "paused", "aborted", "cancelled")
WATCH_INTERVAL_S = 1.0


@click.group()
def rollout() -> None:
    """Staged rollouts of a release: canary, waves, bake, gates, disruption budget."""


def _seconds(value: str, flag: str) -> float:
    from edgewise.pipeline.units import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


@rollout.command("create")
@click.option("--release", required=True, help="The published release to roll out.")
@click.option("--selector", required=True, help="The nodes, by label: k=v[,k=v...].")
@click.option("--canary", default="1", show_default=True,
              help="Nodes of the first wave, alone: a count or a percent (N%).")
@click.option("--waves", default="100%", show_default=True,
              help="Then the waves: cumulative percents of the nodes, the last 100%.")
@click.option("--bake", default="0s", show_default=True,
              help="After a wave has run the release: wait this long, then judge its gates.")
@click.option("--max-failures", default="0", show_default=True,
              help="Failed nodes the rollout tolerates (a count or N%); beyond, it pauses.")
@click.option("--max-unavailable-per-site", type=click.IntRange(min=1), default=None,
              help="Never more nodes than this of one site updating or offline at once.")
@click.option("--site-label", default="site", show_default=True,
              help="The label whose value is a node's site.")
@click.option("--gate", "gates", multiple=True,
              help="A fleet gate, e.g. 'alarm_rate<=2x', 'dropped==0', 'errors==0' "
                   "(repeatable).")
@click.option("--node-timeout", default="10m", show_default=True,
              help="A node not running the release this long after it was assigned has failed.")
@click.option("--intent-ttl", default="24h", show_default=True,
              help="The rollout's desired versions expire after this; late nodes get the "
                   "release until then.")
@api_command
def create(client: Any, release: str, selector: str, canary: str, waves: str, bake: str,
           max_failures: str, max_unavailable_per_site: int | None, site_label: str,
           gates: tuple[str, ...], node_timeout: str, intent_ttl: str) -> Any:
    """Start a rollout of RELEASE to the nodes the selector names now."""
    from edgewise.cloud.rollouts.models import RolloutCreate, RolloutDetail

    body = RolloutCreate(
        release=release, selector=selector, canary=canary, waves=waves,
        bake_s=_seconds(bake, "--bake"), max_failures=max_failures,
        max_unavailable_per_site=max_unavailable_per_site, site_label=site_label,
        gates=list(gates), node_timeout_s=_seconds(node_timeout, "--node-timeout"),
        intent_ttl_s=_seconds(intent_ttl, "--intent-ttl"))
    answer = client.call("POST", "/v1/rollouts", RolloutDetail, body=body,
                         read_timeout=600.0)

    def render() -> None:
        click.echo(f"rollout {answer.id} of release {escape(answer.release)} started: "
                   f"{answer.total} node(s) in {len(answer.waves)} wave(s) ("
                   + ", ".join(f"{w.name}: {w.nodes}" for w in answer.waves) + ")"
                   + (f"; {answer.states['skipped']} quarantined node(s) skipped"
                      if answer.states.get("skipped") else ""))

    return answer, render


@rollout.command("list")
@api_command
def list_(client: Any) -> Any:
    """Rollouts, newest first."""
    from rich.table import Table

    from edgewise.cloud.rollouts.models import RolloutList

    answer = client.call("GET", "/v1/rollouts", RolloutList)

    def render() -> None:
        t = Table(title="rollouts")
        for c in ("id", "release", "state", "wave", "nodes", "healthy", "failed", "created",
                  "reason"):
            t.add_column(c)
        for r in answer.rollouts:
            t.add_row(r.id, escape(r.release), r.state, escape(r.wave_name or "-"),
                      str(r.total), str(r.states.get("healthy", 0)),
                      str(r.states.get("failed", 0)), _when(r.created),
                      escape(r.reason[:80]))
        _out().print(t)

    return answer, render


def status_table(r: Any) -> Any:
    from rich.table import Table

    t = Table(title=f"rollout {r.id}: release {escape(r.release)}, {r.state}"
                    + (f" ({escape(r.reason)})" if r.reason else ""))
    for c in ("wave", "nodes", "pending", "in flight", "healthy", "failed", "deferred",
              "rolled back", "skipped"):
        t.add_column(c)
    for w in r.waves:
        s = w.states
        mark = "▶ " if w.index == r.wave and r.state == "running" else ""
        t.add_row(mark + escape(w.name), str(w.nodes), str(s.get("pending", 0)),
                  str(s.get("assigning", 0) + s.get("assigned", 0)), str(s.get("healthy", 0)),
                  str(s.get("failed", 0)), str(s.get("deferred", 0)),
                  str(s.get("rolled_back", 0) + s.get("rolling_back", 0)),
                  str(s.get("skipped", 0)))
    return t


@rollout.command("status")
@click.argument("rollout_id")
@click.option("--watch", is_flag=True, help="Redraw until the rollout stops moving.")
@click.option("--nodes", type=click.Choice(["problems", "all", "none"]), default="problems",
              show_default=True, help="Which nodes to list.")
@api_command
def status(client: Any, rollout_id: str, watch: bool, nodes: str) -> Any:
    """One rollout: its waves, their nodes by state, and the nodes with a problem."""
    from rich.table import Table

    from edgewise.cli.common import stderr_console
    from edgewise.cloud.client import _seg
    from edgewise.cloud.rollouts.models import RolloutDetail

    def fetch() -> Any:
        return client.call("GET", f"/v1/rollouts/{_seg(rollout_id)}", RolloutDetail,
                           params={"nodes": nodes})

    answer = fetch()
    if watch and answer.state not in END_STATES:
        from rich.live import Live

        with Live(status_table(answer), console=stderr_console(), refresh_per_second=2,
                  transient=True) as live:
            while answer.state not in END_STATES:
                time.sleep(WATCH_INTERVAL_S)
                answer = fetch()
                live.update(status_table(answer))

    def render() -> None:
        _out().print(status_table(answer))
        if answer.nodes:
            t = Table(title="nodes")
            for c in ("node", "wave", "site", "state", "since", "reason"):
                t.add_column(c)
            for n in answer.nodes:
                t.add_row(n.node, str(n.wave), escape(n.site or "-"), n.state,
                          _when(n.changed_at), escape(n.reason))
            _out().print(t)

    if watch:
        def render_and_exit() -> None:
            render()
            if answer.state != "completed":
                sys.exit(1)
        return answer, render_and_exit
    return answer, render


def _command(verb: str, doc: str) -> None:
    @rollout.command(verb, help=doc)
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Why (kept in the audit log).")
    @api_command
    def command(client: Any, rollout_id: str, reason: str) -> Any:
        from edgewise.cloud.client import _seg
        from edgewise.cloud.rollouts.models import Rollout, RolloutCommand

        answer = client.call("POST", f"/v1/rollouts/{_seg(rollout_id)}/{verb}", Rollout,
                             body=RolloutCommand(reason=reason))

        def render() -> None:
            click.echo(f"rollout {answer.id}: {answer.state}")

        return answer, render


for _verb, _doc in (
        ("pause", "Pause a running rollout: nothing more is assigned."),
        ("resume", "Resume a paused rollout (its failures so far and the gate that paused it "
                   "are accepted)."),
        ("abort", "Abort: every node the rollout changed gets its release before again."),
        ("cancel", "Cancel: stop here; nothing more is assigned, nothing is rolled back.")):
    _command(_verb, _doc)
