"""Every command of `edgewise` (walked from the click tree) with bad arguments, a missing file
and an unreachable control plane: never a traceback, always one line saying what to do, exit 2
for the user's input and 1 for a server that cannot be reached.

A command added to the CLI fails `test_every_command_has_its_cases` until it is given a case
in `MISSING_FILE`, `UNREACHABLE` or `NEITHER` (with the reason)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from edgewise.cli.main import main
from edgewise.security.pki import CertificateAuthority


def _walk(cmd: click.Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...],
                                                                         click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):  # imports the lazily loaded groups
            sub = cmd.get_command(ctx, name)
            assert sub is not None, name
            yield from _walk(sub, (*path, name))


ALL = list(_walk(main, ()))
LEAVES = [" ".join(p) for p, c in ALL if not isinstance(c, click.Group)]
NOWHERE = "/nonexistent-edgewise-test"

# command -> (arguments naming a missing file or folder, words the error must contain)
MISSING_FILE: dict[str, tuple[list[str], str]] = {
    "validate": ([f"{NOWHERE}/p.yaml"], "p.yaml: no such file"),
    "run": ([f"{NOWHERE}/p.yaml"], "p.yaml: no such file"),
    "plan": ([f"{NOWHERE}/w.yaml"], "w.yaml: no such file"),
    "sim factory-line": (["--count", "5", "-o", f"{NOWHERE}/x.ndjson"],
                         f"folder {NOWHERE} does not exist; create it first"),
    "sim fleet": (["--nodes", "1", "--cloud", "https://127.0.0.1:1", "--token", "x", "--ca",
                   f"{NOWHERE}/ca.pem"], "does not exist"),
    "dead-letters": (["--data", NOWHERE], "no outbox here; pass the --data directory"),
    "components": (["nosuch"], "no component 'nosuch'; the built-in ones:"),
    "cloud admin-token": (["--data", NOWHERE], "pass the --data directory of `edgewise cloud"),
    "cloud token create": (["--data", NOWHERE], "pass the --data directory of `edgewise cloud"),
    "cloud keys init": ([f"{NOWHERE}/root", "--data", NOWHERE], "pass the --data directory"),
    "cloud keys rotate": ([f"{NOWHERE}/root", "--data", NOWHERE], "does not exist"),
    "agent run": (["--data", "{tmp}/agent", "--pipeline", f"{NOWHERE}/p.yaml"],
                  "--pipeline /nonexistent-edgewise-test/p.yaml: no such file"),
    "agent status": (["--data", NOWHERE], f"--data {NOWHERE}: no such directory"),
    "demo": (["--pipeline", f"{NOWHERE}/p.yaml"], "does not exist"),
    "release build": ([NOWHERE, "--version", "1.0.0"], ""),
    "release publish": ([NOWHERE, "--config", "{down}"], "does not exist"),
    "config set": (["--node", "n1", "--pipeline", f"{NOWHERE}/p.yaml", "--config", "{down}"],
                   "p.yaml: no such file"),
}
for _cmd in ("node list", "node show", "node label", "node revoke", "node decommission",
             "config get", "data query", "data stats", "release list", "release show",
             "token create", "token list", "token revoke", "audit list", "config layer",
             "config layers", "config diff", "config apply", "config drift",
             "node quarantine", "node unquarantine", "cloud pipeline list",
             "cloud pipeline show", "cloud pipeline delete", "rollout create", "rollout list",
             "rollout status", "rollout pause", "rollout resume", "rollout abort",
             "rollout cancel"):
    MISSING_FILE[_cmd] = ([], "")  # filled below: --config pointing nowhere
MISSING_FILE["cloud pipeline set"] = ([f"{NOWHERE}/p.yaml", "--config", "{down}"],
                                      "p.yaml: cannot read")

# command -> its arguments besides --config (the config names https://127.0.0.1:1)
UNREACHABLE: dict[str, list[str]] = {
    "node list": [], "node show": ["n1"], "node label": ["n1", "a=1"],
    "node revoke": ["n1", "--yes"], "node decommission": ["n1", "--yes"],
    "config set": ["--node", "n1", "--set", "a=1"], "config get": ["--node", "n1"],
    "data query": ["--node", "n1", "--stream", "s"], "data stats": [],
    "release list": [], "release show": ["1.0.0"],
    "token create": ["alice", "--role", "viewer"], "token list": [],
    "token revoke": ["ewo_" + "A" * 43], "audit list": [],
    "config layer": ["--fleet", "a=1"], "config layers": [], "config diff": ["--node", "n1"],
    "config apply": ["--node", "n1"], "config drift": [],
    "node quarantine": ["n1", "--reason", "x"], "node unquarantine": ["--node", "n1"],
    "cloud pipeline list": [], "cloud pipeline show": ["p1"], "cloud pipeline delete": ["p1"],
    "rollout create": ["--release", "1.0.0", "--selector", "a=1"], "rollout list": [],
    "rollout status": ["r1"], "rollout pause": ["r1"], "rollout resume": ["r1"],
    "rollout abort": ["r1"], "rollout cancel": ["r1"],
}

NEITHER = {
    "cloud serve": "starts a server (a missing --data folder is created); its errors are "
                   "tested in tests/e2e/test_cloud_serve.py",
    "agent launch": "runs `agent run` under the updater's launcher (tests/e2e/"
                    "test_release_apply.py)",
}


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="edgewise",
                              env={"COLUMNS": "200", "EDGEWISE_CONFIG": None})


def one_clean_error(r: Result) -> str:
    """The output has no traceback and nothing escaped the command."""
    out = r.output
    assert "Traceback" not in out, out
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return out


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLI config for a control plane that is not there (port 1 refuses at once)."""
    d = tmp_path_factory.mktemp("down")
    CertificateAuthority.create(d / "pki", "edgewise.local")
    path = d / "cli.json"
    path.write_text(json.dumps({"url": "https://127.0.0.1:1", "token": "ewo_" + "A" * 43,
                                "ca": str(d / "pki" / "ca.pem")}))
    return path


def test_every_command_has_its_cases() -> None:
    assert sorted(LEAVES) == sorted(set(MISSING_FILE) | set(NEITHER))
    assert set(UNREACHABLE) <= set(LEAVES)


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=lambda p: " ".join(p) or "edgewise")
def test_an_unknown_option_is_a_usage_error(path: tuple[str, ...]) -> None:
    r = run(*path, "--no-such-option")
    out = one_clean_error(r)
    assert r.exit_code == 2, out
    if path == ("agent", "launch"):  # passes options it does not know on to `agent run`
        assert "Error: Missing option '--data'." in out
        assert "Error: No such option" in run("agent", "run", "--no-such-option").output
        return
    assert "Error: No such option '--no-such-option'." in out
    assert f"Try 'edgewise {' '.join(path)} --help' for help.".replace("  ", " ") in out


REQUIRED = [p for p, c in ALL if not isinstance(c, click.Group)
            and any(q.required for q in c.params)]


@pytest.mark.parametrize("path", REQUIRED, ids=" ".join)
def test_a_missing_required_argument_is_a_usage_error(path: tuple[str, ...]) -> None:
    r = run(*path)
    out = one_clean_error(r)
    assert r.exit_code == 2, out
    assert "Error: Missing " in out and "--help' for help." in out


@pytest.mark.parametrize("command", sorted(MISSING_FILE))
def test_a_missing_file_is_one_line_and_exit_2(command: str, tmp_path: Path,
                                               down: Path) -> None:
    args, words = MISSING_FILE[command]
    if not args:  # an operator command: its config file is missing
        args, words = [*UNREACHABLE[command], "--config", f"{NOWHERE}/cli.json"], \
            f"--config {NOWHERE}/cli.json: no such file"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{down}", str(down)) for a in args]
    r = run(*command.split(), *args)
    out = one_clean_error(r)
    assert r.exit_code == 2, out
    assert words in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1, out


@pytest.mark.parametrize("command", sorted(UNREACHABLE))
def test_an_unreachable_control_plane_is_one_line_and_exit_1(command: str, down: Path) -> None:
    r = run(*command.split(), *UNREACHABLE[command], "--config", str(down))
    out = one_clean_error(r)
    assert r.exit_code == 1, out
    assert out.startswith("error: cannot reach the control plane at https://127.0.0.1:1 ("), out
    assert "is it running? Start it with `edgewise cloud serve --data DIR`" in out


def test_the_net_under_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a command lets escape is still one line: a path error exit 2, a bug exit 1."""
    import edgewise.pipeline.reference as reference

    def missing() -> str:
        raise FileNotFoundError(2, "No such file or directory", "/x/y")

    monkeypatch.setattr(reference, "markdown", missing)
    r = run("components")
    assert r.exit_code == 2
    assert one_clean_error(r) == ("error: /x/y: No such file or directory; check the path "
                                  "(and its folder) and try again\n")

    def bug() -> str:
        raise KeyError("boom")

    monkeypatch.setattr(reference, "markdown", bug)
    r = run("components")
    assert r.exit_code == 1
    assert one_clean_error(r).startswith("error: unexpected KeyError: 'boom'; this is a bug")


NODE_COMMANDS = [" ".join(p) for p, c in ALL if not isinstance(c, click.Group)
                 and any(q.name in ("node_id", "node_opt") for q in c.params)]


def test_the_node_is_named_by_the_same_option_everywhere() -> None:
    assert len(NODE_COMMANDS) >= 13, NODE_COMMANDS
    for command in NODE_COMMANDS:
        cmd = next(c for p, c in ALL if " ".join(p) == command)
        assert any("--node" in q.opts for q in cmd.params), command


@pytest.mark.parametrize("command", ["node show", "node label", "node revoke",
                                     "node decommission", "node quarantine",
                                     "node unquarantine"])
def test_a_node_command_without_its_node_is_a_usage_error(command: str, down: Path) -> None:
    extra = ["--reason", "x"] if command == "node quarantine" else []
    r = run(*command.split(), *extra, "--config", str(down))
    out = one_clean_error(r)
    assert r.exit_code == 2, out
    assert "Error: Missing the node: give --node ID (or ID as the first argument)." in out
    r = run(*command.split(), "n1", "--node", "n2", *extra, "--config", str(down))
    out = one_clean_error(r)
    assert r.exit_code == 2, out
    # node label: with --node, a first argument is one of its k=v pairs
    assert ("label 'n1': write key=value" if command == "node label"
            else "give the node once: --node n2 or n1, not both") in out


def test_every_data_directory_has_a_stated_default_or_is_required() -> None:
    for path, cmd in ALL:
        for q in cmd.params:
            if "--data" in q.opts:
                assert isinstance(q, click.Option)
                assert q.required or q.show_default or "default:" in (q.help or ""), \
                    " ".join(path)
