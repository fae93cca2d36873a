"""`edgewise agent run|status`: the edge node's command line (flags and environment read here)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgewise.errors import ConfigError, EdgewiseError

err_console = Console(stderr=True)


def _fail(exc: EdgewiseError) -> None:
    code = 2 if isinstance(exc, ConfigError) else 1
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    sys.exit(code)


@click.group()
def agent() -> None:
    """Run an edge node connected to a control plane, and see what it is doing."""


@agent.command("run")
@click.option("--cloud", metavar="https://HOST:PORT",
              help="The control plane's device API (remembered after the first run).")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path),
              help="The control plane's CA certificate (remembered after the first run).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="The node's data directory (identity, outbox, twin, status).")
@click.option("--token", envvar="EDGEWISE_ENROL_TOKEN", default=None, show_envvar=True,
              help="Enrolment token, needed on the first run only (prefer the environment "
                   "variable: flags are visible in the process list).")
@click.option("--pipeline", type=click.Path(dir_okay=False, path_type=Path),
              help="Run this pipeline until the control plane assigns one.")
@click.option("--window", "window_bytes", type=click.IntRange(min=1024), default=2 * 1024 * 1024,
              show_default=True, help="Unacknowledged bytes in flight on the uplink.")
@click.option("--backoff-base", type=click.FloatRange(min=0.001), default=0.5,
              show_default=True, help="Reconnect backoff: first ceiling, seconds.")
@click.option("--backoff-cap", type=click.FloatRange(min=0.001), default=30.0,
              show_default=True, help="Reconnect backoff: largest ceiling, seconds.")
@click.option("--heartbeat", type=click.FloatRange(min=0.1), default=15.0, show_default=True,
              help="Seconds between heartbeats on the session.")
def run_cmd(cloud: str | None, ca: Path | None, data_dir: Path, token: str | None,
            pipeline: Path | None, window_bytes: int, backoff_base: float, backoff_cap: float,
            heartbeat: float) -> None:
    """Run the node: its pipeline, the uplink, certificate renewal and desired state.

    First run: --cloud, --ca and --token. Later runs need only --data. Stops cleanly on
    Ctrl-C or SIGTERM; the pipeline keeps running while the cloud is unreachable.
    """
    from edgewise.edge.agent import Agent, AgentConfig
    from edgewise.edge.backoff import Backoff
    from edgewise.edge.uplink import UplinkConfig

    try:
        if pipeline is not None and not pipeline.is_file():
            raise ConfigError(f"--pipeline {pipeline}: no such file")
        config = AgentConfig(
            data_dir=data_dir, cloud=cloud, ca=ca,
            token=SecretStr(token) if token else None, pipeline=pipeline,
            uplink=UplinkConfig(window_bytes=window_bytes,
                                backoff=Backoff(backoff_base, backoff_cap),
                                heartbeat_s=heartbeat),
        )
        node = Agent(config)
        err_console.print(
            f"edgewise agent: data in {escape(str(data_dir))}; "
            f"see `edgewise agent status --data {escape(str(data_dir))}`",
            highlight=False,
        )
        asyncio.run(_run(node))
    except EdgewiseError as exc:
        _fail(exc)


async def _run(node: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, node.stop)
    try:
        await node.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)


@agent.command("status")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="The node's data directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status_cmd(data_dir: Path, as_json: bool) -> None:
    """Per stream produced / acknowledged / pending / dropped, link, bytes, certificate.

    Works whether the agent is running or not (the counts come from the outbox itself).
    """
    from edgewise.edge.status import read_status

    if not data_dir.is_dir():
        _fail(ConfigError(f"--data {data_dir}: no such directory"))
    try:
        st = read_status(data_dir)
    except EdgewiseError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(st, default=str))
        return
    console = Console()
    for table in status_tables(st):
        console.print(table)


def _n(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return ""
    secs = max(datetime.now(UTC).timestamp() - ts, 0)
    return f"{secs:.0f} s ago" if secs < 120 else f"{secs / 60:.0f} min ago"


def status_tables(st: dict[str, Any]) -> list[Table]:
    head = Table(title=f"edgewise agent: {st.get('node_id') or 'not enrolled'}",
                 show_header=False, box=None)
    head.add_row("agent", "running" if st["running"] else f"not running ({st['state']})")
    if st.get("problem"):
        head.add_row("[bold red]needs attention[/]", escape(str(st["problem"])))
    link = st.get("link") or {}
    line = str(link.get("state", "-"))
    if st["running"] and link.get("since"):
        line += f" (since {_ago(link['since'])})"
    head.add_row("link", escape(line))
    if link.get("last_error") and link.get("state") != "connected":
        head.add_row("last error", escape(str(link["last_error"])))
    b = st.get("bytes") or {}
    if b:
        head.add_row("bytes on the wire", f"sent {_n(b.get('wire_sent'))}, "
                                          f"received {_n(b.get('wire_received'))} (TLS incl.)")
        head.add_row("websocket payload", f"sent {_n(b.get('ws_sent'))}, "
                                          f"received {_n(b.get('ws_received'))}")
    cert = st.get("certificate")
    if cert:
        left = st.get("certificate_expires_in_s")
        hours = f"{left / 3600:.1f} h" if isinstance(left, int | float) else "?"
        when = "expired" if isinstance(left, int | float) and left <= 0 else f"in {hours}"
        head.add_row("certificate", f"expires {cert['expires_at']} ({when}), "
                                    f"renews at {cert['renew_at']}")
    else:
        head.add_row("certificate", "none (not enrolled)")
    twin = st.get("twin") or {}
    if twin:
        version = twin.get("applied_version") or 0
        head.add_row("desired state", (f"v{version}: " if version else "")
                     + escape(str(twin.get("status", ""))))
    eng = st.get("engine") or {}
    if eng:
        extra = f", {eng['readings_in']:,} readings, {eng['alarms']:,} alarms" \
            if "readings_in" in eng else ""
        head.add_row("pipeline", f"{eng.get('pipeline') or '-'}: {eng.get('state')}{extra}"
                     + (f" - {escape(str(eng['error']))}" if eng.get("error") else ""))
    streams = Table(title="streams (from the outbox)")
    for col in ("stream", "priority", "produced", "acknowledged", "pending", "dropped",
                "refused"):
        streams.add_column(col, justify="left" if col == "stream" else "right")
    for name, s in st["streams"].items():
        streams.add_row(escape(name), str(s["priority"]), _n(s["produced"]),
                        _n(s["acknowledged"]), _n(s["pending"]), _n(s["dropped"]),
                        _n(s["refused"]))
    return [head, streams]
