"""`edgewise cloud serve --help` names every limit `--limit NAME=VALUE` accepts (store_wait was
missing: the list is written by hand)."""

from __future__ import annotations

from dataclasses import fields

from click.testing import CliRunner

from edgewise.cli import main
from edgewise.cloud.config import ServerLimits


def test_the_help_lists_every_limit() -> None:
    res = CliRunner().invoke(main, ["cloud", "serve", "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    missing = [f.name for f in fields(ServerLimits) if f.name not in text]
    assert missing == []
