"""`cli.output`: --format table|wide|json|yaml (--json the same as --format json), --utc, and
the same options on every command that prints data."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import click
import pytest
import yaml
from click.testing import CliRunner
from rich.table import Table

from edgewise.cli.main import main
from edgewise.cli.output import Output, output_options

T = datetime(2026, 12, 6, 10, 1, 18, 250_000, tzinfo=UTC)


@click.command()
@output_options(times=True)
def show(out: Output) -> None:
    if out.data:
        out.emit({"when": T, "n": 1})
        return
    t = Table()
    t.add_column("when")
    t.add_column("text")
    t.add_row(out.when(T), "word " * 30)
    out.console().print(t)


def run(*args: str, columns: int = 60) -> str:
    r = CliRunner().invoke(show, list(args), env={"COLUMNS": str(columns), "TZ": "UTC"})
    assert r.exit_code == 0, r.output
    return r.output


def test_formats() -> None:
    assert json.loads(run("--json")) == {"when": "2026-12-06 10:01:18.250000+00:00", "n": 1}
    assert run("--json") == run("--format", "json")
    assert yaml.safe_load(run("--format", "yaml")) == json.loads(run("--json"))
    table = run()
    assert max(len(line) for line in table.splitlines()) <= 60  # fitted: the text wraps
    wide = run("--format", "wide")
    assert max(len(line) for line in wide.splitlines()) > 150  # one line a row, not fitted
    assert "word " * 30 in wide


def test_times_in_utc() -> None:
    assert "2026-12-06 10:01:18 UTC" in run("--utc", "--format", "wide")
    assert Output(utc=True).when(None) == "-"
    assert Output(utc=True).when(T.timestamp()) == "2026-12-06 10:01:18 UTC"


def test_json_and_another_format_is_a_usage_error() -> None:
    r = CliRunner().invoke(show, ["--json", "--format", "yaml"])
    assert r.exit_code == 2
    assert "--json and --format yaml: give one of them" in r.output


def _leaves(cmd: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    if not isinstance(cmd, click.Group):
        return [(" ".join(path), cmd)]
    ctx = click.Context(cmd)
    return [leaf for name in cmd.list_commands(ctx)
            for leaf in _leaves(cmd.get_command(ctx, name), (*path, name))]  # type: ignore[arg-type]


NO_DATA = {
    "agent run": "runs the node until stopped; logs only (--log-format json)",
    "agent launch": "runs `agent run` under the launcher",
    "cloud serve": "runs the control plane until stopped; logs only (--log-format json)",
    "demo": "a guided demonstration, printed for people",
}


@pytest.mark.parametrize("command,cmd", _leaves(main), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_every_command_that_prints_data_has_the_output_options(command: str,
                                                               cmd: click.Command) -> None:
    names = {o for p in cmd.params for o in p.opts}
    if command in NO_DATA:
        assert "--format" not in names
        return
    assert {"--format", "--json"} <= names, command
    fmt = next(p for p in cmd.params if "--format" in p.opts)
    assert isinstance(fmt.type, click.Choice)
    assert list(fmt.type.choices) == ["table", "wide", "json", "yaml"]


def test_node_list_never_cuts_the_node_id() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from edgewise.cli.operator import nodes_table
    from edgewise.cli.output import using

    n = SimpleNamespace(id="node-0123456789ab", decommissioned_at=None, revoked=False,
                        status="online", wipe=False, cert_serial=123, key_fingerprint="ab" * 32,
                        labels={"site": "plant1", "line": "1", "rack": "r17-east-long"},
                        last_seen=T, cert_expiry=T, attestation="none", quarantine=None)
    for fmt, width in (("table", 80), ("table", 64), ("wide", 100_000)):
        console = Console(width=width, record=True, file=io.StringIO())
        with using(Output(fmt, utc=True)):
            console.print(nodes_table([n], "nodes"))
        text = console.export_text()
        assert "node-0123456789ab" in text, (fmt, width, text)
        assert ("ab" * 32 in text) == (fmt == "wide")
