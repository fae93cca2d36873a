"""`edgewise agent run|launch|status`: the edge node's command line (flags and environment read
here)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from edgewise.cli.common import (
    AGENT_DATA,
    err_console,
    escape,
    fail,
)
from edgewise.cli.logs import log_format_option
from edgewise.cli.output import Output, current, output_options
from edgewise.errors import ConfigError, EdgewiseError

if TYPE_CHECKING:
    from rich.table import Table

    from edgewise.edge.status_model import NodeStatus


@click.group()
def agent() -> None:
    """Run an edge node connected to a control plane, and see what it is doing."""


def gate_options(f: Any) -> Any:
    """The health gate's flags, shared by `run` and `launch` (docs/updates.md)."""
    f = click.option("--gate-probe", metavar="COMMAND", default=None,
                     help="A command run at the end of a new release's health gate; it must "
                          "exit 0 (a release's config/edgewise-gate.json may set its own).")(f)
    f = click.option("--gate-attempts", type=click.IntRange(min=1), default=3,
                     show_default=True, help="Starts of a new release before one that has "
                     "not passed its gate rolls it back.")(f)
    f = click.option("--gate-start", type=click.FloatRange(min=0.1, max=3600), default=60.0,
                     show_default=True, help="Seconds a new release's pipeline may take to "
                     "be running.")(f)
    return click.option("--gate-window", type=click.FloatRange(min=0.1, max=3600),
                        default=30.0, show_default=True, help="Seconds of good health that "
                        "commit a new release.")(f)


@agent.command("run")
@click.option("--cloud", metavar="https://HOST:PORT",
              help="The control plane's device API (remembered after the first run).")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path),
              help="The control plane's CA certificate (remembered after the first run).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=AGENT_DATA, show_default=True,
              help="The node's data directory (identity, outbox, twin, status).")
@click.option("--token", envvar="EDGEWISE_ENROL_TOKEN", default=None, show_envvar=True,
              help="Enrolment token, needed on the first run only (prefer the environment "
                   "variable: flags are visible in the process list).")
@click.option("--pipeline", type=click.Path(dir_okay=False, path_type=Path),
              help="Run this pipeline until the control plane assigns one.")
@click.option("--allow-path", "allow_paths", multiple=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="A folder (with everything below it) that pipelines from the control plane "
                   "may read and write files in, besides DATA/pipelines. Repeatable; give it on "
                   "every run (it is not remembered).")
@click.option("--window", "window_bytes", type=click.IntRange(min=1024), default=2 * 1024 * 1024,
              show_default=True, help="Unacknowledged bytes in flight on the uplink.")
@click.option("--backoff-base", type=click.FloatRange(min=0.001), default=0.5,
              show_default=True, help="Reconnect backoff: first ceiling, seconds.")
@click.option("--backoff-cap", type=click.FloatRange(min=0.001), default=30.0,
              show_default=True, help="Reconnect backoff: largest ceiling, seconds.")
@click.option("--heartbeat", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds between heartbeats on the session.")
@gate_options
@click.option("--release-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Take releases from this folder (releases/V/manifest.json, blobs/SHA256: "
                   "not signed, for media checked otherwise) instead of the control plane.")
@click.option("--metrics", metavar="HOST:PORT", default=None,
              help="Serve Prometheus /metrics, /healthz and /readyz over plain HTTP on this "
                   "address (keep it on 127.0.0.1 or a pod network; docs/deploy.md).")
@click.option("--tpm", metavar="TCTI", default=None, envvar="EDGEWISE_TPM", show_envvar=True,
              help="Use a TPM 2.0 (e.g. device:/dev/tpmrm0, swtpm:port=2321): enrolment bound "
                   "to it, measured launch, attestation, outbox key sealed to it "
                   "(docs/security.md; needs the 'tpm' extra).")
@log_format_option
def run_cmd(cloud: str | None, ca: Path | None, data_dir: Path, token: str | None,
            pipeline: Path | None, allow_paths: tuple[Path, ...], window_bytes: int,
            backoff_base: float, backoff_cap: float, heartbeat: float, gate_window: float,
            gate_start: float, gate_attempts: int, gate_probe: str | None,
            release_dir: Path | None, metrics: str | None, tpm: str | None) -> None:
    """Run the node: its pipeline, the uplink, certificate renewal and desired state.

    First run: --cloud, --ca and --token. Later runs need only --data (if not the default).
    Stops cleanly on Ctrl-C or SIGTERM; the pipeline keeps running while the cloud is
    unreachable.
    """
    import asyncio

    from pydantic import SecretStr

    from edgewise.common.backoff import Backoff
    from edgewise.edge.agent import Agent, AgentConfig
    from edgewise.edge.updater.updater import LAUNCHED_ENV, UpdaterConfig
    from edgewise.edge.uplink import UplinkConfig

    try:
        if pipeline is not None and not pipeline.is_file():
            raise ConfigError(f"--pipeline {pipeline}: no such file")
        address = None
        if metrics is not None:
            from edgewise.edge.metrics import parse_address

            address = parse_address(metrics)
        config = AgentConfig(
            data_dir=data_dir, cloud=cloud, ca=ca,
            token=SecretStr(token) if token else None, pipeline=pipeline,
            allowed_paths=tuple(p.absolute() for p in allow_paths),
            uplink=UplinkConfig(window_bytes=window_bytes,
                                backoff=Backoff(backoff_base, backoff_cap),
                                heartbeat_s=heartbeat),
            updater=UpdaterConfig(
                gate=_gate(gate_window, gate_start, gate_attempts, gate_probe),
                launched=os.environ.get(LAUNCHED_ENV) == "1",
                allowed=(data_dir.absolute() / "pipelines",
                         *(p.absolute() for p in allow_paths))),
            release_dir=release_dir.absolute() if release_dir else None, tpm=tpm,
        )
        node = Agent(config)
        err_console.print(
            f"edgewise agent: data in {escape(str(data_dir))}; "
            f"see `edgewise agent status --data {escape(str(data_dir))}`",
            highlight=False,
        )
        asyncio.run(_run(node, address))
    except EdgewiseError as exc:
        fail(exc)
    if node.restart_reason is not None:
        _restart()


def _restart() -> NoReturn:
    """Start `agent run` again (after a slot switch or a rollback): exit 75 for `agent launch`,
    else replace this process with a fresh one (no code of the old release stays loaded)."""
    from edgewise.edge.updater.updater import EXIT_RESTART, LAUNCHED_ENV

    if os.environ.get(LAUNCHED_ENV) == "1":
        sys.exit(EXIT_RESTART)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "edgewise.cli", *sys.argv[1:]])


def _gate(window: float, start: float, attempts: int, probe: str | None) -> Any:
    from edgewise.edge.updater.gate import GateConfig

    return GateConfig(window_s=window, start_s=start, max_attempts=attempts,
                      probe=tuple(shlex.split(probe)) if probe else ())


@agent.command("launch", context_settings={"ignore_unknown_options": True,
                                           "allow_extra_args": True})
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="The node's data directory (no default here: this is "
              "what a service manager runs, and its unit names the directory).")
@gate_options
@click.pass_context
def launch_cmd(ctx: click.Context, data_dir: Path, gate_window: float, gate_start: float,
               gate_attempts: int, gate_probe: str | None) -> None:
    """Run `edgewise agent run` from the active release's slot and keep it healthy.

    What a service manager should run. Every other option is passed to `agent run`. A new
    release's agent that exits or does not pass its health gate in time is rolled back to the
    previous release and started again (docs/updates.md).
    """
    from edgewise.edge.updater.launcher import LaunchConfig, Launcher

    args = [*ctx.args, "--gate-window", str(gate_window), "--gate-start", str(gate_start),
            "--gate-attempts", str(gate_attempts)]
    if gate_probe:
        args += ["--gate-probe", gate_probe]
    try:
        launcher = Launcher(LaunchConfig(
            data_dir=data_dir, run_args=tuple(args),
            gate=_gate(gate_window, gate_start, gate_attempts, gate_probe)))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda _s, _f: launcher.stop())
        code = launcher.run()
    except EdgewiseError as exc:
        fail(exc)
    sys.exit(code if code >= 0 else 128 - code)


async def _run(node: Any, metrics: tuple[str, int] | None = None) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, node.stop)
    try:
        if metrics is None:
            await node.run()
        else:
            from edgewise.edge.metrics import serve

            async with serve(node, *metrics):
                await node.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)


@agent.command("status")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=AGENT_DATA, show_default=True, help="The node's data directory.")
@output_options(times=True)
def status_cmd(data_dir: Path, out: Output) -> None:
    """Per stream produced / acknowledged / pending / dropped, link, bytes, certificate.

    Works whether the agent is running or not (the counts come from the outbox itself).
    """
    from edgewise.edge.decommission import describe as describe_decommission
    from edgewise.edge.status import read_status

    if not data_dir.is_dir():
        fail(ConfigError(f"--data {data_dir}: no such directory"))
    try:
        st = read_status(data_dir)
        damaged = damaged_files(data_dir)
    except EdgewiseError as exc:
        fail(exc)
    for exc in damaged:  # one line each; the view still shows what can be read
        err_console.print(f"[bold yellow]warning:[/] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
    if damaged and st.problem is None:
        st.problem = str(damaged[0])
    with contextlib.suppress(EdgewiseError):  # decommissioned: that says it all
        st.problem = describe_decommission(data_dir) or st.problem
    if out.data:
        out.emit(st.to_json())
        return
    console = out.console()
    for table in status_tables(st):
        console.print(table)


def damaged_files(data_dir: Path) -> list[EdgewiseError]:
    """Every file of the data directory that is present but damaged, each with its fix
    (docs/agent.md, *Damaged files*); reads only."""
    from edgewise.edge import twin, uplink_store
    from edgewise.edge.damaged import DamagedFile, reason
    from edgewise.edge.identity_files import IdentityFiles
    from edgewise.edge.status import STATUS_FILE

    found: list[EdgewiseError] = [*IdentityFiles(data_dir).damaged(),
                                  *twin.damaged_files(data_dir / "twin"),
                                  *uplink_store.damaged_files(data_dir / "uplink")]
    status = data_dir / STATUS_FILE
    try:
        data = status.read_bytes()
        if not isinstance(json.loads(data), dict):
            raise ValueError("not a JSON object")
    except OSError:
        pass
    except ValueError as exc:
        found.append(DamagedFile(status, reason(exc, data), "it is only a view: the agent "
                                 "writes it again every second while it runs"))
    return found


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


def _time(value: Any) -> str:
    """An ISO time from the status file as `cli.output` shows times (--utc)."""
    try:
        return current().when(datetime.fromisoformat(str(value).replace("Z", "+00:00")))
    except ValueError:
        return str(value)


def status_tables(st: NodeStatus) -> list[Table]:
    from rich.table import Table

    head = Table(title=f"edgewise agent: {st.node_id or 'not enrolled'}",
                 show_header=False, box=None)
    head.add_row("agent", "running" if st.running else f"not running ({st.state})")
    if st.problem:
        head.add_row("[bold red]needs attention[/]", escape(str(st.problem)))
    link = st.link
    line = st.link_state
    if st.running and link is not None and link.since:
        line += f" (since {_ago(link.since)})"
    head.add_row("link", escape(line))
    if link is not None and link.last_error and link.state != "connected":
        head.add_row("last error", escape(str(link.last_error)))
    b = st.bytes
    if b is not None:
        head.add_row("bytes on the wire", f"sent {_n(b.wire_sent)}, "
                                          f"received {_n(b.wire_received)} (TLS incl.)")
        head.add_row("websocket payload", f"sent {_n(b.ws_sent)}, "
                                          f"received {_n(b.ws_received)}")
    cert = st.certificate
    if cert:
        left = st.certificate_expires_in_s
        hours = f"{left / 3600:.1f} h" if isinstance(left, int | float) else "?"
        when = "expired" if isinstance(left, int | float) and left <= 0 else f"in {hours}"
        head.add_row("certificate", f"expires {_time(cert.expires_at)} ({when}), "
                                    f"renews at {_time(cert.renew_at)}")
    else:
        head.add_row("certificate", "none (not enrolled)")
    twin = st.twin
    if twin is not None:
        version = twin.applied_version or 0
        head.add_row("desired state", (f"v{version}: " if version else "")
                     + escape(str(twin.status)))
    rel = st.release
    if rel is not None:
        line = f"{rel.running or 'none'} ({rel.state})" if rel.state else str(rel.running)
        if rel.phase and rel.phase != "idle":
            line += f", {rel.phase}"
        head.add_row("release", escape(line))
        f = rel.last_failure
        if f:
            head.add_row("last release failure", escape(
                f"{f.get('version')} ({f.get('phase')}): {f.get('reason')}"))
    eng = st.engine
    if eng is not None:
        extra = f", {eng.readings_in:,} readings, {eng.alarms:,} alarms" \
            if eng.readings_in is not None and eng.alarms is not None else ""
        head.add_row("pipeline", f"{eng.pipeline or '-'}: {eng.state}{extra}"
                     + (f" - {escape(str(eng.error))}" if eng.error else ""))
    streams = Table(title="streams (from the outbox)")
    for col in ("stream", "priority", "produced", "acknowledged", "pending", "dropped",
                "refused"):
        streams.add_column(col, justify="left" if col == "stream" else "right")
    for name, s in st.streams.items():
        streams.add_row(escape(name), str(s.priority), _n(s.produced), _n(s.acknowledged),
                        _n(s.pending), _n(s.dropped), _n(s.refused))
    return [head, streams]
