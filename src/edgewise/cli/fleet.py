"""``edgewise sim fleet``: virtual nodes against a control plane (`edgewise.testbed.fleet`).

Reads the flags and the environment (``$EDGEWISE_CA``, ``$EDGEWISE_CONFIG`` for the operator
API used by the exact check) and prints the summary: a table, or with ``--json`` one JSON line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path

import click

from edgewise.cli.common import fail, fmt
from edgewise.cli.output import Output, output_options
from edgewise.errors import ConfigError, EdgewiseError


@click.command("fleet")
@click.option("--nodes", type=int, required=True, help="Virtual nodes in all.")
@click.option("--cloud", required=True, help="The control plane, https://HOST:PORT.")
@click.option("--token", "tokens", required=True, multiple=True, envvar="EDGEWISE_TOKEN",
              help="An enrolment token with at least --nodes uses (or $EDGEWISE_TOKEN). "
              "Given K times: node i enrols with the (i mod K)-th (e.g. one token per site).")
@click.option("--ca", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              envvar="EDGEWISE_CA", default=None, help="The control plane's ca.pem.")
@click.option("--processes", type=int, default=1, show_default=True)
@click.option("--duration", type=float, default=60.0, show_default=True,
              help="Seconds to run (SIGTERM or Ctrl-C ends sooner).")
@click.option("--telemetry-every", type=float, default=10.0, show_default=True,
              help="Seconds between a node's telemetry batches.")
@click.option("--records", type=int, default=5, show_default=True,
              help="Readings per telemetry batch.")
@click.option("--ramp", type=float, default=0.0, show_default=True,
              help="Spread node starts over this many seconds.")
@click.option("--link", default=None, help="latency=50ms,loss=0.01 (latency through a link "
              "proxy; loss: a frame waits one TCP retransmission timeout, 200 ms).")
@click.option("--drain", type=float, default=30.0, show_default=True,
              help="At the end, seconds to wait for the last acknowledgements.")
@click.option("--state", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the nodes' keys and certificates (default: a temporary one).")
@click.option("--events", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append one JSON line per node event (enrolled, up, down, desired).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="CLI config file {url, token, ca} for the exact check, "
              "found as by the operator commands (default: $EDGEWISE_CONFIG, then "
              "~/.config/edgewise/cli.json, then .edgewise/cloud/cli.json).")
@click.option("--fetch-only", is_flag=True, help="Ignore a poke's inline desired state and "
              "fetch it over a new connection (as the agent does today).")
@click.option("--heartbeat-every", type=float, default=None,
              help="Seconds between heartbeats (default: the agent's, 30).")
@click.option("--report-every", type=float, default=None,
              help="Seconds between reported states (default: the agent's, 30).")
@click.option("--release-failure-rate", "failure_rates", multiple=True,
              help="Share of the nodes an assigned release fails on: 0.05, 5%, or "
              "VERSION=RATE for one release (repeatable); exact: floor(N x rate) nodes. "
              "Default 0.")
@click.option("--release-failure-phase", type=click.Choice(["gate", "verify", "install"]),
              default="gate", show_default=True, help="gate: switched, on trial, rolled back; "
              "verify/install: refused before the switch.")
@click.option("--apply-seconds", default="1-5", show_default=True,
              help="An update's duration (staging, then the trial), uniform in MIN-MAX.")
@click.option("--release-restart", is_flag=True, help="Reconnect at a switch and a rollback, "
              "as the agent restarts (default: the session goes on).")
@click.option("--source-address", "sources", multiple=True, metavar="ADDR",
              help="Local address the sessions connect from (repeatable: worker process i "
              "uses the (i mod K)-th). One address has about 28,000 source ports toward one "
              "control-plane port; for more nodes on one machine give several, e.g. "
              "127.0.0.2 and 127.0.0.3 for a control plane on 127.0.0.1.")
@click.option("--no-verify", is_flag=True, help="Skip the check against the stored data.")
@output_options()
def fleet(nodes: int, cloud: str, tokens: tuple[str, ...], ca: Path | None, processes: int,
          duration: float, telemetry_every: float, records: int, ramp: float, link: str | None,
          drain: float, state: Path | None, events: Path | None, config_path: Path | None,
          fetch_only: bool, heartbeat_every: float | None, report_every: float | None,
          failure_rates: tuple[str, ...], release_failure_phase: str, apply_seconds: str,
          release_restart: bool, sources: tuple[str, ...], no_verify: bool,
          out: Output) -> None:
    """Run NODES virtual nodes speaking the real device protocol; check every record sent."""
    from dataclasses import replace

    from edgewise.edge.device_http import check_cloud_url
    from edgewise.edge.uplink import UplinkConfig
    from edgewise.testbed.fleet import FleetConfig, NodeSettings, parse_link, run_fleet, verify
    from edgewise.testbed.fleet.release import Behaviour, parse_rate, parse_seconds_range
    from edgewise.testbed.fleet.run import summary

    try:
        if ca is None:
            raise ConfigError("--ca: give the control plane's ca.pem (or $EDGEWISE_CA)")
        if telemetry_every <= 0 or records < 1 or duration <= 0:
            raise ConfigError("--telemetry-every and --duration must be positive, --records "
                              "at least 1")
        latency, loss = parse_link(link)
        uplink = UplinkConfig()
        for value, field, flag in ((heartbeat_every, "heartbeat_s", "--heartbeat-every"),
                                   (report_every, "report_s", "--report-every")):
            if value is not None:
                if not 0.5 <= value <= 3600:
                    raise ConfigError(f"{flag}: 0.5 to 3600 seconds")
                uplink = replace(uplink, **{field: value})
        behaviour = Behaviour(dict(parse_rate(r) for r in failure_rates),
                              release_failure_phase, parse_seconds_range(apply_seconds),
                              release_restart)
        settings = NodeSettings(check_cloud_url(cloud), ca, tokens[0], telemetry_every,
                                records, uplink=uplink, loss=loss, drain_s=drain,
                                fetch_only=fetch_only, tokens=tuple(tokens[1:]),
                                release=behaviour)
        for addr in sources:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ConfigError(f"--source-address {addr!r}: not an IP address") from None
        cfg = FleetConfig(nodes, settings, processes, duration, ramp, latency, state, events,
                          sources)
        client = None
        note = "skipped (--no-verify)"
        if not no_verify:
            from edgewise.cloud.client import OperatorClient, find_config

            try:
                path = find_config(config_path, os.environ.get("EDGEWISE_CONFIG"), Path.home())
                client = OperatorClient.from_file(path, timeout=60.0)
            except ConfigError as exc:
                note = f"skipped: {exc}"
        started = time.time()
        rec = run_fleet(cfg)
        verdict = None
        if client is not None:
            with client:
                verdict = verify(client, rec.nodes)
            note = "every seq via data query, counts via data stats"
        doc = summary(rec, cfg, started, verdict, note)
    except EdgewiseError as exc:
        fail(exc)
    if out.data:
        out.emit(doc)
        return
    from rich.table import Table

    t = Table(title=f"fleet of {nodes:,} virtual nodes")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in doc.items():
        t.add_row(k, json.dumps(v) if isinstance(v, dict | list) else fmt(v))
    out.console().print(t)
